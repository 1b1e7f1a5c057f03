"""Disk blocks that need converting (another dtype, GGUF, pickle), written once into the offload folder.

The folder of ``offload.folder`` for a checkpoint and dtype is keyed by the checkpoint's fingerprint: one
safetensors file per block, each written atomically, the manifest last. A block whose file is there, whole and
holding the same keys is reused, whatever the map or budget of the run that wrote it, so a second run of the same
checkpoint and dtype writes nothing; a missing, stale or cut-short file is written again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from runner.load.checkpoint import Checkpoint
from runner.load.checkpoint.files import SafetensorsCheckpoint, safetensors_header
from runner.errors import DiskFull, OffloadError, interrupted
from runner.data.writes import atomic_write, disk_full, is_disk_full, reclaim, temp_path

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
        reclaim(folder)  # temp files of runs killed while converting
        done: dict[str, list[str]] = {}
        try:
            written = _write(checkpoint, todo, dtype, folder, files, done)
        except KeyboardInterrupt as e:  # keep what is whole: the next run converts only the rest
            _record_kept(manifest, identity, {**recorded, **done})
            raise interrupted(e, f"converting disk blocks: {len(done)} of {len(todo)} are kept in {folder} and "
                                 "reused by the next run") from None
        except DiskFull:
            _record_kept(manifest, identity, {**recorded, **done})  # if the manifest still fits
            raise
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


def _write(checkpoint, blocks: dict[str, list[str]], dtype, folder: Path, files: dict[str, Path],
           done: dict[str, list[str]]) -> int:
    """Write each block's converted file atomically, adding it to ``done`` once in place; the bytes written."""
    written = 0
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, keys in blocks.items():
            tmp = temp_path(files[name])  # a run beside this one has its own
            try:
                save_file({k: converted_tensor(checkpoint, k, dtype) for k in keys}, str(tmp))
                written += tmp.stat().st_size
                tmp.replace(files[name])  # atomic: a half-written file never carries the final name
                done[name] = keys
            finally:
                tmp.unlink(missing_ok=True)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own type
        if is_disk_full(e):
            left = {name: keys for name, keys in blocks.items() if name not in done}
            raise disk_full("offload.folder", folder, f"converting {len(left)} more disk block(s)",
                            _converted_bytes(checkpoint, left, dtype)) from e
        raise _write_error(folder, e) from e
    return written


def _converted_bytes(checkpoint, blocks: dict[str, list[str]], dtype: torch.dtype) -> int:
    """The tensor bytes of these blocks once cast to ``dtype`` (from the entries: no tensor read)."""
    total = 0
    for keys in blocks.values():
        for key in keys:
            entry = checkpoint.entries.get(key)
            if entry is not None:
                itemsize = dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize
                total += math.prod(entry.shape) * itemsize
    return total


def _record_kept(manifest: Path, identity: dict, blocks: dict[str, list[str]]) -> None:
    """On the way out of an interrupted conversion: record the blocks that are whole; a failure only costs a
    rewrite next time."""
    try:
        _write_manifest(manifest, identity, {**_recorded_blocks(manifest, identity), **blocks})
    except (OffloadError, DiskFull):
        pass


def _write_manifest(manifest: Path, identity: dict, blocks: dict[str, list[str]]) -> None:
    try:
        atomic_write(manifest, json.dumps({"identity": identity, "blocks": blocks}, sort_keys=True), "offload.folder")
    except OSError as e:
        raise _write_error(manifest.parent, e) from e


def _write_error(folder: Path, e: Exception) -> OffloadError:
    return OffloadError(f"offload.folder: cannot write {folder} ({getattr(e, 'strerror', None) or e}); "
                        "set offload.folder to a writable folder with room for the disk blocks")


def converted_tensor(checkpoint, key: str, dtype: torch.dtype) -> torch.Tensor:
    return cast(checkpoint.read(key), dtype).contiguous()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor in ``dtype`` (its strides kept); any other as it is."""
    return t.to(dtype) if t.is_floating_point() else t
