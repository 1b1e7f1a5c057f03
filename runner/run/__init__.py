"""One short recipe per task or mode: what ``python -m runner`` runs, top to bottom."""
