#!/usr/bin/env python
"""Checkpoints written by transformers itself (``save_pretrained``), for the benches that load checkpoints.

The runner's synthetic checkpoint is in its own layout (``nn.Linear`` weights ``[out, in]``); users bring
checkpoints written by transformers, where GPT-2's linear weights are Conv1D ``[in, out]``. These are the
real thing: transformers' own class, its own random init (seeded), ``save_pretrained(max_shard_size="500MB",
safe_serialization=True)``: shards + ``model.safetensors.index.json`` + ``config.json``, fp32.

- ``hf-gpt2``: ``GPT2LMHeadModel``, gpt2-large's shape (36 layers, 1280 wide, 20 heads; 3.10 GB, 7 shards),
  in ``<cache>/hf/gpt2-large``; the runner loads it with ``model=gpt2large checkpoint=local``.
- ``tinyllama``: ``LlamaForCausalLM``, TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
  intermediate 5632, vocab 32000, untied head; 4.40 GB), in ``<cache>/hf/tinyllama``; ``model=llama``.

``<cache>`` is ``RUNNER_CACHE`` (else ``~/.cache/runner``). A checkpoint is written into a temporary folder
beside its own and renamed into place when complete, so a cut-short write is never taken for a checkpoint.
Run ``python bench/hf_checkpoint.py hf-gpt2`` to write one ahead of a bench (it prints the folder).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 0
SHARD = "500MB"


@dataclass(frozen=True)
class HFCheckpoint:
    folder: str                      # under <cache>/hf
    cls: str                         # transformers' class: what Accelerate loads it into
    block: str                       # that class's residual block, which Accelerate must not split
    runner: tuple[str, ...]          # the runner's model, for checkpoint=local checkpoint.path=<folder>
    config: dict[str, Any]           # the config class's arguments
    config_cls: str


CHECKPOINTS = {
    "hf-gpt2": HFCheckpoint(
        "gpt2-large", "GPT2LMHeadModel", "GPT2Block", ("model=gpt2large",),
        dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024), "GPT2Config"),
    "tinyllama": HFCheckpoint(
        "tinyllama", "LlamaForCausalLM", "LlamaDecoderLayer", ("model=llama",),
        dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
             intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False), "LlamaConfig"),
    # Qwen3-MoE-shaped, 2.4 GB in fp32: 32 experts of 6.3 MB per layer, 4 per token; its config.json picks the class.
    "qwen3moe": HFCheckpoint(
        "qwen3-moe-2b", "Qwen3MoeForCausalLM", "Qwen3MoeDecoderLayer", (),
        dict(hidden_size=1024, num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             intermediate_size=2048, moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=32000,
             max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False), "Qwen3MoeConfig"),
}


def root() -> Path:
    return Path(os.environ.get("RUNNER_CACHE") or "~/.cache/runner").expanduser() / "hf"


def folder_of(name: str) -> Path:
    return root() / CHECKPOINTS[name].folder


def runner_overrides(name: str, folder: Path) -> list[str]:
    """The runner's overrides that load ``folder`` (``name``'s checkpoint, or a copy of it) as a local checkpoint."""
    return [*CHECKPOINTS[name].runner, "checkpoint=local", f"checkpoint.path={folder}"]


# -- writing (in this process: torch and transformers are imported here) --------------------------------------------

def write(name: str) -> Path:
    """``name``'s checkpoint, written with transformers if not there yet; its folder."""
    final = folder_of(name)
    if (final / "model.safetensors.index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _drop_stale(final)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        partial.chmod(0o755)  # mkdtemp makes it private; the finished checkpoint is an ordinary folder
        _save(CHECKPOINTS[name], partial)
        try:
            partial.rename(final)
        except OSError:  # another process finished first (a non-empty folder is there): keep theirs
            if not (final / "model.safetensors.index.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _save(spec: HFCheckpoint, to: Path) -> None:
    """Build transformers' class with its own random init (seeded, fp32) and save it sharded, as a user would.

    The plain build holds the whole model in memory (3.1 GB for gpt2-large, 4.4 GB for TinyLlama), once."""
    import torch
    import transformers
    config = getattr(transformers, spec.config_cls)(**spec.config)
    torch.manual_seed(SEED)
    model = getattr(transformers, spec.cls)(config).float().eval()
    model.save_pretrained(to, max_shard_size=SHARD, safe_serialization=True)
    if not (to / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"save_pretrained wrote no index into {to}: {sorted(p.name for p in to.iterdir())}")


def _drop_stale(final: Path) -> None:
    """Remove temporary folders of ``final`` left by writers that died (their process is gone)."""
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        pid = stale.name.removeprefix(f".{final.name}.partial-").split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def ensure(name: str) -> Path:
    """``name``'s checkpoint folder, written in a subprocess if not there yet (the caller imports no torch)."""
    final = folder_of(name)
    if (final / "model.safetensors.index.json").is_file():
        return final
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), name], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FOLDER ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"cannot write the {name} checkpoint: "
                           + ((proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]))
    return Path(lines[-1].split(" ", 1)[1])


# -- loading it the transformers way (in a bench's child process) ----------------------------------------------------

def hf_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def empty_model(name: str, folder: Path):
    """transformers' class for ``folder`` under Accelerate's ``init_empty_weights()``, its head tied (if the
    config ties it) by ``tie_weights()``, as ``load_checkpoint_and_dispatch`` expects it."""
    import transformers
    from accelerate import init_empty_weights
    config = transformers.AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = getattr(transformers, CHECKPOINTS[name].cls)(config)
    model.tie_weights()
    return model.eval()


def plain_model(name: str, folder: Path):
    """transformers' class for ``folder`` built on the CPU with its random init: the plain way's skeleton."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, CHECKPOINTS[name].cls)(config).eval()


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKPOINTS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(CHECKPOINTS)}}}  (writes into $RUNNER_CACHE/hf)")
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(f"FOLDER {write(sys.argv[1])}", flush=True)


if __name__ == "__main__":
    main()
