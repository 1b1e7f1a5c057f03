"""Shared fixtures: real Hydra composition of the shipped configs, and one synthetic-weights cache per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from runner.config import RunConfig, load_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@pytest.fixture(scope="session", autouse=True)
def runner_cache(tmp_path_factory) -> Path:
    """Synthetic checkpoints are written once per session, into a temporary cache."""
    cache = tmp_path_factory.mktemp("runner-cache")
    os.environ["RUNNER_CACHE"] = str(cache)
    return cache


def compose_config(*overrides: str) -> RunConfig:
    """The config ``python -m runner <overrides>`` would run with, typed."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return load_config(compose(config_name="config", overrides=list(overrides)))


def evict_page_cache(files) -> None:
    """Drop the files' clean pages from the page cache, so the next read of them comes from the device."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
