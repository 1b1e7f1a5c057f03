"""PyTorch pickle checkpoints (``.bin``/``.pt``/``.pth``): one file, or shards with ``pytorch_model.bin.index.json``.

A pickle can run arbitrary code when it is unpickled. Files are loaded with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers; a file
that needs more is refused unless ``checkpoint.allow_pickle=true`` says it is trusted.

Files are memory-mapped (``mmap=True``): opening one reads its pickle, not its tensor data,
which is paged in when a tensor is read. The loaded dicts are kept for the whole run.
"""
from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.load.checkpoint.base import Checkpoint, TensorEntry, from_index, one_line
from runner.errors import CheckpointError

log = logging.getLogger(__name__)

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Files a training run leaves beside its weights: pickles of optimizer state, arguments and RNG state, not weights.
NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.bin", "scheduler.pt", "scaler.pt",
               "rng_state")
# torch's weights_only refusals of a class or function the pickle names (anything else is a damaged file).
_GLOBAL = re.compile(r"GLOBAL (\S+?)(?: was not an allowed global| whose module \S+ is blocked)")


def is_pickle_path(path: Path) -> bool:
    """A PyTorch pickle file or the index of pickle shards (``*.bin.index.json``)."""
    return path.suffix in PICKLE_SUFFIXES or any(path.name.endswith(f"{s}.index.json") for s in PICKLE_SUFFIXES)


def pickle_files_in(folder: Path) -> list[Path]:
    """The weight pickles of a folder: its index's shards, ``pytorch_model.bin``, or every other pickle in it."""
    if (folder / PICKLE_INDEX_NAME).exists():
        return [folder / PICKLE_INDEX_NAME]
    if (folder / "pytorch_model.bin").exists():
        return [folder / "pytorch_model.bin"]
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix in PICKLE_SUFFIXES and not p.name.startswith(NOT_WEIGHTS))


def open_pickle(path: Path, allow_pickle: bool = False, source: str = "local") -> PickleCheckpoint:
    """A ``.bin``/``.pt`` file, a folder of them (with or without the index), or the index file itself.

    Raises:
        CheckpointError: a file needs full unpickling and ``allow_pickle`` is off, a file is corrupt or truncated,
            holds no tensors, or the index names a missing shard or a tensor its shard lacks.
    """
    if path.is_dir():
        found = pickle_files_in(path)
        if not found:
            raise CheckpointError(f"checkpoint.path: {path} holds no .bin/.pt files")
        if found[0].name != PICKLE_INDEX_NAME:
            return PickleCheckpoint(found, source, allow_pickle)
        path = found[0]
    if path.name.endswith(".index.json"):
        return from_index(path, lambda files: PickleCheckpoint(files, source, allow_pickle))
    return PickleCheckpoint([path], source, allow_pickle)


class PickleCheckpoint(Checkpoint):
    """The tensors of PyTorch pickle files, by name, memory-mapped. No byte offsets to locate: every read,
    ``read_uncached`` too, goes through the mapping.

    Entries that are not tensors (an ``int`` version, a string, a trusted custom object) are no weights: they
    are listed in ``ignored`` with what they are, and the report shows them.
    """

    def __init__(self, files: list[Path], source: str, allow_pickle: bool = False):
        self.files = files
        self.source = source
        self.revision: str | None = None
        self.ignored: dict[str, str] = {}
        self.entries: dict[str, TensorEntry] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._loaded: dict[Path, dict[str, Any]] = {}  # one mmap'd dict per file, kept for the run
        for file in files:
            state = _load(file, allow_pickle)
            self._loaded[file] = state
            for key, value in state.items():
                if not isinstance(key, str):
                    self.ignored[str(key)] = f"a {type(key).__name__} key, not a tensor name, in {file.name}"
                    continue
                if key in self.entries or key in self.ignored:
                    first = self.entries[key].file.name if key in self.entries else "another file"
                    raise CheckpointError(f"{key}: stored twice, in {first} and {file.name}")
                if not isinstance(value, torch.Tensor):
                    self.ignored[key] = f"not a tensor but a {type(value).__name__} object, in {file.name}"
                    continue
                if value.device.type == "meta":
                    raise CheckpointError(f"{file}: tensor {key} was saved on the meta device and has no data; "
                                          "re-export the checkpoint from a model with real weights")
                self.entries[key] = TensorEntry(file, value.dtype, tuple(value.shape))
                self._tensors[key] = value
        if self.ignored:
            log.warning("Ignoring %d non-tensor entr%s of %s: %s", len(self.ignored),
                        "y" if len(self.ignored) == 1 else "ies", ", ".join(f.name for f in files),
                        ", ".join(sorted(self.ignored)))

    def read(self, key: str) -> torch.Tensor:
        """One tensor, as stored, on the CPU: backed by the file's mapping, its pages are read as it is used."""
        return self._tensors[key].detach().contiguous()  # contiguous like a safetensors tensor; no copy if it is


def _load(file: Path, allow_pickle: bool) -> dict[str, Any]:
    """The file's top-level dict of name -> tensor (or other values), memory-mapped where the format allows."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint.path: {file} does not exist or is not a file")
    kind = _format(file)
    if kind == "lfs-pointer":
        raise CheckpointError(f"{file}: a Git LFS pointer, not the weights; fetch them (git lfs pull) or download "
                              "the file itself")
    if kind is None:
        raise CheckpointError(f"{file}: not a PyTorch checkpoint (neither torch.save's zip format nor the legacy "
                              "pickle format): empty, truncated or corrupt; re-download or re-export it")
    mmap = kind == "zip"
    if not mmap:  # torch cannot memory-map the legacy format
        log.warning("%s is in PyTorch's legacy (pre-1.6) format, which cannot be memory-mapped: it is read into "
                    "memory whole; re-save it with torch.save, or convert it to safetensors", file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        needs = _GLOBAL.search(str(e))
        if "weights only" not in str(e).lower() or needs is None or not _pickle_intact(file):
            raise _corrupt(file, e) from e
        if not allow_pickle:
            raise CheckpointError(
                f"{file}: refused: it needs full unpickling (it names {needs.group(1)}, which is not a tensor or "
                "a plain container), which can run arbitrary code; convert it to safetensors, or set "
                "checkpoint.allow_pickle=true if the file is trusted") from None
        log.warning("%s needs full unpickling (it names %s); loading it with weights_only=False because "
                    "checkpoint.allow_pickle=true: this runs whatever code the file holds", file, needs.group(1))
        obj = _load_trusted(file, mmap)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            ImportError, MemoryError) as e:
        raise _corrupt(file, e) from e
    if isinstance(obj, nn.Module):  # torch.save(model) rather than torch.save(model.state_dict())
        log.warning("%s holds a whole %s module; using its state_dict()", file, type(obj).__name__)
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a state dict of tensor name -> tensor; "
                              "save model.state_dict() instead")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [str(k) for k, v in obj.items() if isinstance(v, dict)]
        hint = (f"; its tensors may be nested under {', '.join(repr(k) for k in nested[:3])}: save that dict on its "
                "own" if nested else "")
        raise CheckpointError(f"{file}: holds no tensors at its top level{hint}")
    return obj


def _load_trusted(file: Path, mmap: bool) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except (ImportError, AttributeError) as e:  # a class the pickle names cannot be found here
        raise CheckpointError(f"{file}: cannot be unpickled: {one_line(e)}; the file needs code that is not "
                              "installed, convert it to safetensors where it loads") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
            TypeError) as e:
        raise _corrupt(file, e) from e


def _format(file: Path) -> str | None:
    """``zip`` (torch.save since 1.6), ``legacy`` (a bare pickle), ``lfs-pointer``, or None: neither."""
    try:
        with open(file, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from e
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80") and len(head) > 1 and 2 <= head[1] <= 5:  # a pickle's PROTO opcode
        return "legacy"
    if head.startswith(b"version https://git-lfs"):
        return "lfs-pointer"
    return None


def _pickle_intact(file: Path) -> bool:
    """In the zip format, the pickle's CRC: a damaged pickle can name garbage "globals" that look like classes."""
    if _format(file) != "zip":
        return True  # the legacy format has no checksum
    try:
        with zipfile.ZipFile(file) as z:
            for name in z.namelist():
                if name.endswith("data.pkl"):
                    z.read(name)  # raises BadZipFile on a CRC mismatch
        return True
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _corrupt(file: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{file}: not a readable PyTorch checkpoint, truncated or corrupt "
                           f"({type(e).__name__}: {_short(e)}); re-download or re-export it")


def _short(e: BaseException, limit: int = 160) -> str:
    """The first sentence of torch's error messages, which run to paragraphs."""
    text = one_line(e).split(". ")[0]
    return text if len(text) <= limit else text[:limit].rstrip() + "..."
