"""Where the configs and schemas are: inside the installed package (a wheel maps the repository's top-level
``conf/`` and ``schemas/`` in), or beside it in a source checkout."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # runner/


def _resource(name: str) -> Path:
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


CONF_DIR = _resource("conf")
SCHEMA_DIR = _resource("schemas")
