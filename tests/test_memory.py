"""Peak memory is a test, not only a benchmark: a GPT-2 written by transformers (``save_pretrained``), run by
``python -m runner`` in a fresh process with the default settings, whole-process peak RSS against the plan.

A change that makes the skeleton or the load touch memory it should not (torch's deterministic mode filling
every fresh allocation did: +1.87 GB on gpt2-large) fails here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_byte_tokenizer

# GPT-2's shape, narrowed: 12 blocks of 512 wide, 50257 tokens (about 254 MB in fp32, half of it the embedding).
SHAPE = dict(n_layer=12, n_embd=512, n_head=8, vocab_size=50257, n_positions=1024)
RUN = ("model=gpt2", "checkpoint=local", "hardware=cpu", "task.max_new_tokens=4", "data.prompts=[Hello there]",
       *(f"model.arch.{k}={v}" for k, v in SHAPE.items() if k not in ("vocab_size", "n_positions")))
MB = 10**6


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """GPT2LMHeadModel's own random init, saved by transformers in safetensors shards."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder = tmp_path_factory.mktemp("hf-gpt2")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE))
    model.save_pretrained(folder, max_shard_size="100MB", safe_serialization=True)
    write_byte_tokenizer(folder)
    return folder


def weights_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def import_baseline() -> int:
    """Peak RSS of a process that imports what a run imports, and does nothing else. Planning traces the model on
    meta, and torch's first meta kernel imports its compiler stack: one op on meta stands for that."""
    code = ("import torch, runner.__main__, runner.infer.engine, runner.load.loaded, runner.run.job, safetensors.torch, "
            "tokenizers\ntorch.ones(1, device='meta') + 1\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) * 1024


def test_all_on_cpu_peak_is_the_imports_plus_the_weights(cli, gpt2, tmp_path):
    proc = cli(*RUN, f"checkpoint.path={gpt2}", f"hydra.run.dir={tmp_path / 'run'}", peak=True)
    assert proc.returncode == 0, proc.stderr
    peak, baseline, weights = cli.peak_of(proc), import_baseline(), weights_of(gpt2)
    assert peak <= (baseline + weights) * 1.10, (
        f"peak {peak / MB:.0f} MB > 1.10 x (imports {baseline / MB:.0f} MB + weights {weights / MB:.0f} MB)")


def test_half_on_disk_peak_is_the_budget_plus_two_blocks(cli, gpt2, tmp_path):
    budget = weights_of(gpt2) // 2
    proc = cli(*RUN, f"checkpoint.path={gpt2}", f"max_memory.cpu={budget}B", f"offload.folder={tmp_path / 'off'}",
               f"hydra.run.dir={tmp_path / 'run'}", peak=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    cpu = next(d for d in report["devices"] if d["name"] == "cpu")
    disk = next(d for d in report["devices"] if d["name"] == "disk")
    assert disk["planned_bytes"] > weights_of(gpt2) // 4  # a real share of the model streams from disk
    block = 12 * SHAPE["n_embd"] ** 2 * 4 + 13 * SHAPE["n_embd"] * 4  # one GPT-2 block's fp32 bytes
    bound = budget + 2 * block + cpu["reserve"] + 600 * MB
    peak = cli.peak_of(proc)
    assert peak <= bound, f"peak {peak / MB:.0f} MB > budget {budget / MB:.0f} MB + 2 blocks + reserves + 600 MB"
