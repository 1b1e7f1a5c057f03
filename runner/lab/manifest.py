"""``manifest.json``: everything a run folder needs to be replayed exactly, and to tell what changed since.

The resolved config and the command-line overrides; the runner's version and git commit; Python's, torch's and
every core package's versions; the hardware profile and the devices found; the checkpoint's files with their
sizes and a content hash; the input data's hash; the tokenizer's and chat template's hashes; the seed; the
final device map. ``python -m runner.lab.replay`` reruns from it alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import runner
from runner.config import RunConfig
from runner.plan.hardware import Hardware
from runner.infer.tokenizer import Tokenizer

MANIFEST = "manifest.json"
PACKAGES = ("torch", "hydra-core", "omegaconf", "safetensors", "huggingface_hub", "jsonschema", "psutil", "gguf",
            "tokenizers", "jinja2", "numpy", "transformers")
SAMPLE = 1 << 20  # a cheap hash reads this much at the start, middle and end of each file


def manifest(config: RunConfig, *, checkpoint: dict[str, Any], hardware: Hardware, tokenizer: Tokenizer | None,
             device_map: dict[str, str], dtype: str) -> dict[str, Any]:
    """The manifest of a run; ``checkpoint`` is the checkpoint's fingerprint (source, revision, files); ``dtype``
    the type it computed in (``dtype: auto`` resolves by hardware, and a replay pins what the run chose)."""
    full = config.full_hash
    return {
        "config": config.resolved,
        "overrides": list(config.overrides),
        "dtype": dtype,
        "cwd": os.getcwd(),  # relative paths in the config (data.path, checkpoint.path) are read from here
        "runner": {"version": runner.__version__, **git_commit(Path(runner.__file__).parent)},
        "versions": versions(),
        "hardware": {"profile": config.resolved.get("hardware"), "devices": [
            {"name": d.name, "kind": d.kind, "budget": d.budget, "simulated": d.simulated} for d in hardware.devices],
            "detected": detected_hardware()},
        "checkpoint": {**checkpoint, "files": [{**f, "hash": file_hash(Path(f["path"]), full=full)}
                                               for f in checkpoint["files"]]},
        "data": data_hash(config),
        "tokenizer": None if tokenizer is None else {
            "name": tokenizer.name, "hash": tokenizer.content_hash(),
            "chat_template_hash": None if tokenizer.chat_template is None
            else hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()},
        "seed": config.seed,
        "device_map": device_map,
    }


def write_manifest(run_dir: Path, config: RunConfig, **parts: Any) -> dict[str, Path]:
    from runner.run.report import write_documents

    return write_documents(run_dir, {MANIFEST: (manifest(config, **parts), "manifest")})


def versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{p: version(p) for p in PACKAGES}}


def detected_hardware() -> dict[str, Any]:
    import psutil
    import torch

    gpus = [{"name": torch.cuda.get_device_name(i), "bytes": torch.cuda.get_device_properties(i).total_memory}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "gpus": gpus}


def git_commit(folder: Path) -> dict[str, Any]:
    """The commit of the checkout the runner runs from, and whether it has uncommitted changes; {} if none."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def file_hash(path: Path, *, full: bool = False) -> str:
    """``sha256:<hex>`` of the whole file, or ``sampled:<hex>`` of its size and its first, middle and last MiB
    (cheap on a 100 GB checkpoint, and it still changes when a file is re-exported or cut short)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if full:
            while chunk := f.read(16 * SAMPLE):
                digest.update(chunk)
            return f"sha256:{digest.hexdigest()}"
        size = os.fstat(f.fileno()).st_size
        digest.update(str(size).encode())
        for offset in sorted({0, max(size // 2 - SAMPLE // 2, 0), max(size - SAMPLE, 0)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE))
    return f"sampled:{digest.hexdigest()}"


def data_hash(config: RunConfig) -> dict[str, Any]:
    """The input rows' hash: the whole data file, or the inline prompts."""
    if config.data.path is not None:
        path = Path(config.data.path)
        return {"path": str(path), "hash": data_hash_of(path) if path.is_file() else None}
    text = json.dumps(list(config.data.prompts), ensure_ascii=False, sort_keys=True).encode("utf-8")
    return {"path": None, "hash": f"sha256:{hashlib.sha256(text).hexdigest()}"}


def data_hash_of(path: Path) -> str:
    return file_hash(path, full=True)
