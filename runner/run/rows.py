"""What a task does with a batch job's rows (``RowTask``), and what passes between the job and the task: a row
ready to run (``Item``) and what running a batch of them gave (``Batch``). ``generate.py``, ``score.py`` and
``embed.py`` in this folder are the three tasks; ``job.py`` runs any of them over the data."""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from runner.data.rows import Row


@dataclass
class Item:
    """A row ready to run: its tokenized request, its length, and the batch group it belongs to."""

    row: Row
    request: Any
    tokens: int
    group: Hashable = None  # rows of different groups (sampling settings) never share a batch


@dataclass
class Batch:
    """What running one batch gave: a result per item, in order, and its token counts and times."""

    results: list[Any]
    input_tokens: int
    output_tokens: int = 0
    first_token_s: float | None = None  # generation: the prefill, until every row has its first token
    decode_s: float = 0.0


class RowTask(Protocol):
    """What a task does with rows."""

    def prepare(self, row: Row) -> Item:
        """Tokenize and check one row. Raises ``RunnerError`` (its first line says what is wrong)."""
        ...

    def run(self, items: list[Item]) -> Batch: ...

    def line(self, row: Row, result: Any) -> dict[str, Any]:
        """The output line of a row that ran."""
        ...

    def error_line(self, row: Row) -> dict[str, Any]:
        """The output line of a row skipped for ``row.error``."""
        ...
