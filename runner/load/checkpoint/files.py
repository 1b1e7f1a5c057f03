"""Safetensors checkpoints on disk: one file, or shards with ``model.safetensors.index.json``.

Only headers are read when a checkpoint is opened; tensors are read one at a time, on
demand, through file handles kept open for the whole run.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from runner.load.checkpoint.base import Checkpoint, TensorEntry, from_index, one_line
from runner.load.checkpoint.pickled import is_pickle_path, open_pickle, pickle_files_in
from runner.load.checkpoint.reads import Located, close_all, pread_full
from runner.errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64}


class SafetensorsCheckpoint(Checkpoint):
    """The tensors of a safetensors checkpoint, by name, read lazily."""

    def __init__(self, files: list[Path], source: str):
        self.files = files
        self.source = source
        self.revision: str | None = None   # the resolved commit, for a Hub repo
        self.ignored: dict[str, str] = {}  # stored key -> why it is knowingly skipped
        self._handles = {}
        self._fds: dict[Path, int] = {}
        weakref.finalize(self, close_all, self._fds)  # descriptors go with the checkpoint
        self._located: dict[str, tuple[Path, int, int]] | None = None
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            handle = self._open(file)
            for key in handle.keys():
                s = handle.get_slice(key)
                if s.get_dtype() not in _DTYPES:
                    raise CheckpointError(f"{file}: tensor {key} is stored as {s.get_dtype()}, which the runner "
                                          f"cannot load; supported: {', '.join(_DTYPES)}")
                if key in self.entries:
                    raise CheckpointError(f"{key}: stored twice, in {self.entries[key].file.name} and {file.name}")
                self.entries[key] = TensorEntry(file, _DTYPES[s.get_dtype()], tuple(s.get_shape()))

    def read_uncached(self, key: str) -> torch.Tensor:
        """One tensor, as stored, read with ``pread`` into its own buffer rather than through the memory map.

        For tensors that are cast or copied to a GPU on the way: a mapped read leaves the file's pages
        mapped into this process, so they stay counted in its resident memory next to the result; a
        plain read does not, and the buffer goes when the tensor does.
        """
        located = self.locate([key])
        if located is None:  # a file without safetensors offsets: the ordinary read
            return self.read(key)
        loc = located[key]
        buffer = torch.empty(loc.nbytes, dtype=torch.uint8)
        try:
            fd = self._fds.get(loc.file)
            if fd is None:
                fd = self._fds[loc.file] = os.open(loc.file, os.O_RDONLY)
            if pread_full(fd, memoryview(buffer.numpy()), loc.start, loc.nbytes) != loc.nbytes:
                raise OSError(f"short read of {loc.nbytes} bytes at {loc.start}")
        except OSError as e:
            raise CheckpointError(f"{loc.file}: cannot read tensor {key} ({e}); the file may be truncated") from e
        return buffer.view(loc.dtype).view(loc.shape)

    def locate(self, keys: list[str]) -> dict[str, Located] | None:
        """Where each tensor's bytes sit in its file, for reads that bypass the memory map
        (``runner.load.checkpoint.reads``); None if any is not a plain safetensors tensor."""
        offsets = self._offsets()
        if not all(k in offsets for k in keys):
            return None
        return {k: Located(*offsets[k], self.entries[k].dtype, self.entries[k].shape) for k in keys}

    def read_ahead(self, keys: list[str], chunk: int = 1 << 20) -> None:
        """Ask the kernel, from a background thread, to page in these tensors' bytes in file order, so that
        reading overlaps building, planning and the first forward. One advice call per MiB: a single call
        for a whole range only starts its first readahead window."""
        ranges = sorted(self._offsets()[k] for k in keys if k in self._offsets())

        def advise() -> None:
            for file, start, nbytes in ranges:
                try:
                    fd = os.open(file, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    for offset in range(start, start + nbytes, chunk):
                        os.posix_fadvise(fd, offset, min(chunk, start + nbytes - offset), os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)

        if ranges and hasattr(os, "posix_fadvise"):
            threading.Thread(target=advise, name="read-ahead", daemon=True).start()

    def _offsets(self) -> dict[str, tuple[Path, int, int]]:
        """key -> (file, absolute byte offset, byte count), from each file's JSON header, parsed once."""
        if self._located is None:
            self._located = {}
            for file in self.files:
                if file.suffix != ".safetensors":
                    continue
                try:
                    data, tensors = safetensors_header(file)
                except (OSError, ValueError) as e:  # changed on disk since it was opened
                    raise CheckpointError(f"{file}: not a readable safetensors file ({one_line(e)}); "
                                          "re-download or re-export it") from e
                for key, meta in tensors.items():
                    begin, end = meta["data_offsets"]
                    self._located[key] = (file, data + begin, end - begin)
        return self._located

    def read(self, key: str) -> torch.Tensor:
        """One tensor, as stored, in CPU memory."""
        entry = self.entries[key]
        try:
            return self._handles[entry.file].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{entry.file}: cannot read tensor {key} ({e}); the file may be truncated") from e

    def _open(self, file: Path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({one_line(e)}); "
                                  "re-download or re-export it") from e
        self._handles[file] = handle
        return handle


HEADER_LIMIT = 100_000_000  # safetensors' own cap on a header's size


def safetensors_header(file: Path) -> tuple[int, dict[str, dict]]:
    """Where a safetensors file's data starts, and its header's tensor entries (``__metadata__`` left out).

    Raises:
        OSError: the file cannot be read. ValueError: its header is not one (too long, not JSON, not an object
            of tensor entries each with two whole-number ``data_offsets``).
    """
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > HEADER_LIMIT:
            raise ValueError(f"{file}: a header of {size} bytes is past safetensors' limit")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the header is JSON {type(header).__name__}, not an object of tensor entries")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, meta in tensors.items():  # callers slice by these offsets: anything else would escape as a TypeError
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in offsets)):
            raise ValueError(f"{file}: tensor {key[:80]!r} has no data_offsets [begin, end] of byte counts")
    return 8 + size, tensors


def open_local(path: Path, allow_pickle: bool = False, source: str = "local") -> Checkpoint:
    """A checkpoint on disk: safetensors (see ``open_safetensors``) or PyTorch ``.bin``/``.pt`` pickles.

    A folder holding both kinds is read as safetensors, which cannot run code. Pickles load with
    ``torch.load(weights_only=True)`` only, unless ``allow_pickle`` (see ``pickled.open_pickle``).

    Raises:
        CheckpointError: the path is missing, holds no checkpoint, or a file in it cannot be read.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint.path: {path} does not exist; point it at a .safetensors file, "
                              f"a folder of shards or its {INDEX_NAME}, or a PyTorch .bin/.pt file")
    if path.is_dir():
        if (path / INDEX_NAME).exists() or any(path.glob("*.safetensors")):
            if pickle_files_in(path):
                log.info("%s holds both safetensors and PyTorch pickle files: reading the safetensors", path)
            return open_safetensors(path, source)
        if pickle_files_in(path):
            return open_pickle(path, allow_pickle, source)
        raise CheckpointError(f"checkpoint.path: {path} holds no .safetensors or .bin/.pt files")
    if is_pickle_path(path):
        return open_pickle(path, allow_pickle, source)
    if path.suffix not in (".safetensors", ".json"):
        hint = "; for a GGUF file use checkpoint=gguf" if path.suffix == ".gguf" else ""
        raise CheckpointError(f"checkpoint.path: {path.name} is not a .safetensors or PyTorch .bin/.pt file, "
                              f"nor the index of either{hint}")
    return open_safetensors(path, source)


def open_safetensors(path: Path, source: str = "local") -> SafetensorsCheckpoint:
    """A ``.safetensors`` file, a folder of shards (with or without the index), or the index file itself.

    Raises:
        CheckpointError: the path is missing or holds no safetensors, or the index names a missing shard
            or a tensor its shard lacks.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint.path: {path} does not exist; point it at a .safetensors file, "
                              f"a folder of shards or its {INDEX_NAME}")
    if path.is_dir() and (path / INDEX_NAME).exists():
        path = path / INDEX_NAME
    if path.suffix == ".json":
        return from_index(path, lambda files: SafetensorsCheckpoint(files, source))
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint.path: {path} holds no .safetensors files")
        return SafetensorsCheckpoint(files, source)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint.path: {path.name} is not a .safetensors file or index; "
                              "only safetensors checkpoints are read")
    return SafetensorsCheckpoint([path], source)
