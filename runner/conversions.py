"""Disk blocks that need converting (another dtype, GGUF, pickle), written once into the offload folder.

The folder of ``offload.folder`` for a checkpoint and dtype is keyed by the checkpoint's fingerprint: one
safetensors file per block, each written atomically, the manifest last. A block whose file is there, whole and
holding the same keys is reused, whatever the map or budget of the run that wrote it, so a second run of the same
checkpoint and dtype writes nothing; a missing, stale or cut-short file is written again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from runner.checkpoint import Checkpoint
from runner.checkpoint.files import SafetensorsCheckpoint, safetensors_header
from runner.errors import OffloadError

log = logging.getLogger(__name__)

MANIFEST = "offload-manifest.json"


class OffloadFolder(SafetensorsCheckpoint):
    """The converted disk blocks: safetensors in the compute dtype, with no model metadata beside them."""

    @property
    def metadata_dir(self) -> Path | None:
        return None


def converted(checkpoint: Checkpoint, blocks: dict[str, list[str]], dtype: torch.dtype,
               root: Path) -> OffloadFolder:
    """The converted disk blocks, in a folder of ``root`` keyed by the checkpoint's fingerprint and the dtype.

    A block whose file is there, whole, and holding the same keys is reused, whatever the map or budget of the run
    that wrote it; any other is written now (each file atomically, the manifest last), so a second run of the same
    checkpoint and dtype writes nothing.
    """
    identity = {"checkpoint": checkpoint.fingerprint(), "dtype": str(dtype)}
    folder = root / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    files = {name: folder / f"{name or 'model'}.safetensors" for name in blocks}
    manifest = folder / MANIFEST
    recorded = _recorded_blocks(manifest, identity)
    todo = {name: keys for name, keys in blocks.items()
            if recorded.get(name) != keys or not _whole(files[name], keys)}
    if todo:
        if recorded:
            log.warning("Offload folder %s lacks or holds stale or cut-short files for %d block(s); converting them",
                        folder, len(todo))
        written = _write(checkpoint, todo, dtype, folder, files)
        # Read again just before writing: a run beside this one may have recorded blocks of its own meanwhile.
        _write_manifest(manifest, identity, {**_recorded_blocks(manifest, identity), **recorded, **todo})
        log.info("Converted %d disk block(s) into %s (%.2f GB written)", len(todo), folder, written / 1e9)
    else:
        log.info("Reusing converted disk weights in %s", folder)
    return OffloadFolder(list(files.values()), source="offload")


def _recorded_blocks(manifest: Path, identity: dict) -> dict[str, list[str]]:
    """The blocks a manifest says were written for this checkpoint and dtype; none if it is missing or another's."""
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict) or recorded.get("identity") != identity:
        return {}
    blocks = recorded.get("blocks")
    return blocks if isinstance(blocks, dict) else {}


def _whole(file: Path, keys: list[str]) -> bool:
    """The file is a complete safetensors file holding exactly ``keys``: its header parses and its length is the
    header's. A file cut short after its manifest was written (a full disk, a copy stopped half-way) is not."""
    try:
        data, tensors = safetensors_header(file)
        end = max((meta["data_offsets"][1] for meta in tensors.values()), default=0)
        return sorted(tensors) == sorted(keys) and file.stat().st_size == data + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False


def _write(checkpoint, blocks: dict[str, list[str]], dtype, folder: Path, files: dict[str, Path]) -> int:
    """Write each block's converted file atomically; the bytes written."""
    written = 0
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, keys in blocks.items():
            tmp = files[name].with_name(f".{files[name].name}.{os.getpid()}.tmp")  # a run beside this one has its own
            try:
                save_file({k: converted_tensor(checkpoint, k, dtype) for k in keys}, str(tmp))
                written += tmp.stat().st_size
                tmp.replace(files[name])  # atomic: a half-written file never carries the final name
            finally:
                tmp.unlink(missing_ok=True)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own type
        raise _write_error(folder, e) from e
    return written


def _write_manifest(manifest: Path, identity: dict, blocks: dict[str, list[str]]) -> None:
    tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"identity": identity, "blocks": blocks}, sort_keys=True))
        tmp.replace(manifest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(manifest.parent, e) from e


def _write_error(folder: Path, e: Exception) -> OffloadError:
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
    hint = ("the disk is full; free space or set offload.folder to a larger disk" if full
            else "set offload.folder to a writable folder with room for the disk blocks")
    return OffloadError(f"offload.folder: cannot write {folder} ({getattr(e, 'strerror', None) or e}); {hint}")


def converted_tensor(checkpoint, key: str, dtype: torch.dtype) -> torch.Tensor:
    return cast(checkpoint.read(key), dtype).contiguous()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor in ``dtype`` (its strides kept); any other as it is."""
    return t.to(dtype) if t.is_floating_point() else t
