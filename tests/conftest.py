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
    """The config ``python -m runner <overrides>`` would run with, typed; planned for 256-token sequences unless
    ``runtime.seq_len`` is among the overrides (a run derives it from the prompts; tests of the stages fix it)."""
    if not any(o.startswith("runtime.seq_len=") for o in overrides):
        overrides = ("runtime.seq_len=256", *overrides)
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


def write_byte_tokenizer(folder: Path) -> Path:
    """A real ``tokenizer.json`` whose ids are UTF-8 bytes (0-255), for hand-sized models saved as local checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    to_char = {b: c for b, c in _bytes_to_unicode().items() if c in alphabet}
    tokenizer = Tokenizer(models.BPE({to_char[b]: b for b in range(256)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, which byte-level tokenizers use as their alphabet."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def generate_run(cfg: RunConfig, run_dir: Path):
    """Load an engine for ``cfg`` and complete the config's prompts: (engine, completions)."""
    from runner.infer.engine import Engine

    engine = Engine(cfg, run_dir)
    return engine, engine.generate(cfg.data.prompts)
