"""Seeded random weights for lab runs, written once as a real sharded safetensors checkpoint.

The folder is named by a fingerprint of the architecture, seed, dtype and shard size,
so a later run with the same settings reuses it, and it is renamed into place only once
complete, so an interrupted write never looks finished.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from runner.load.checkpoint.files import INDEX_NAME
from runner.config import CheckpointSpec, ModelSpec
from runner.errors import CheckpointError, interrupted
from runner.data.writes import disk_full, is_disk_full, reclaim

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the way weights are drawn changes
TEMP_FOLDER = re.compile(r"^\.tmp-[0-9a-f]+-(?P<pid>\d+)$")  # a write under way, or a dead run's
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, getattr(nn, "RMSNorm", nn.LayerNorm))


def synthetic_checkpoint(spec: CheckpointSpec, model_spec: ModelSpec, model: nn.Module) -> Path:
    """The folder of the synthetic checkpoint for this model and spec, written now if not cached."""
    key = json.dumps({"arch": model_spec.arch, "seed": spec.seed, "dtype": spec.dtype,
                      "shard_size": spec.shard_size, "format": FORMAT}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    assert spec.cache_dir is not None  # the schema requires it for this source
    folder = spec.cache_dir / f"{model_spec.name}-{digest}"
    if (folder / INDEX_NAME).exists():
        log.info("Reusing synthetic checkpoint %s", folder)
        return folder
    tmp = spec.cache_dir / f".tmp-{digest}-{os.getpid()}"  # the pid tells a later run whether its writer lives
    reclaim(spec.cache_dir, TEMP_FOLDER)
    try:
        spec.cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log.info("Writing synthetic checkpoint to %s", folder)
        _write(tmp, model, getattr(torch, spec.dtype), spec.seed, spec.shard_size)
        if folder.exists() and not (folder / INDEX_NAME).exists():
            log.warning("Replacing damaged synthetic checkpoint %s", folder)
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / INDEX_NAME).exists():
                raise
            log.info("Another run wrote %s first; using it", folder)  # same seed, same bytes
    except KeyboardInterrupt as e:
        raise interrupted(e, f"the synthetic checkpoint {folder.name} was left unfinished and its partial folder "
                             "removed; the next run writes it again") from None
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own type
        if is_disk_full(e):
            shutil.rmtree(tmp, ignore_errors=True)  # so the free space said is what the next try would have
            raise disk_full("checkpoint.cache_dir", spec.cache_dir, f"the synthetic checkpoint {folder.name}",
                            _nbytes(model, getattr(torch, spec.dtype))) from e
        raise CheckpointError(f"checkpoint.cache_dir: cannot write the synthetic checkpoint under {spec.cache_dir} "
                              f"({getattr(e, 'strerror', None) or e}); set checkpoint.cache_dir or RUNNER_CACHE to a "
                              "writable folder") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
    return folder


def _nbytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The bytes of tensor data the checkpoint holds (its headers add a few KiB)."""
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.dtype.itemsize)
               for t, _ in _persistent_tensors(model).values())


def _write(folder: Path, model: nn.Module, dtype: torch.dtype, seed: int, shard_size: int) -> None:
    tensors = _persistent_tensors(model)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (t, _) in tensors.items():
        nbytes = t.numel() * (dtype.itemsize if t.is_floating_point() else t.dtype.itemsize)
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: _draw(name, *tensors[name], dtype, seed) for name in names}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _persistent_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, nn.Module]]:
    """What a checkpoint of this model holds: parameters and persistent buffers, each tied tensor once."""
    seen: set[int] = set()
    out = {}
    for prefix, module in model.named_modules():
        local = list(module._parameters.items())
        local += [(n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for attr, t in local:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out[f"{prefix}.{attr}" if prefix else attr] = (t, module)
    return out


def _draw(name: str, t: torch.Tensor, module: nn.Module, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """GPT-2's init: N(0, 0.02) weights, zero biases, unit norm scales; each tensor from its own seed."""
    if t.device.type != "meta":  # a persistent buffer built for real: keep its value
        return t.to(dtype) if t.is_floating_point() else t.clone()
    if name.endswith("bias"):
        return torch.zeros(t.shape, dtype=dtype)
    if isinstance(module, _NORMS):
        return torch.ones(t.shape, dtype=dtype)
    generator = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16))
    return torch.empty(t.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator).to(dtype)
