"""Where the runner's folders are: the configs and schemas inside the installed package (a wheel maps the
repository's top-level ``conf/`` and ``schemas/`` in) or beside it in a source checkout, and the cache."""
from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # runner/


def _resource(name: str) -> Path:
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


CONF_DIR = _resource("conf")
SCHEMA_DIR = _resource("schemas")


def runner_cache() -> Path:
    """The runner's cache folder, as the configs name it: ``$RUNNER_CACHE``, else ``~/.cache/runner``."""
    return Path(os.environ.get("RUNNER_CACHE") or "~/.cache/runner").expanduser()
