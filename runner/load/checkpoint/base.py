"""What every checkpoint source offers the runner: tensors by name, read lazily, and the metadata beside them.

The sources: safetensors files (``files``), PyTorch pickles (``pickled``), GGUF (``gguf``), the offload
folder (``runner.load.offload``), and any of them under the model's own names (``names``). A source keeps the
defaults here where it has nothing better: no cheaper read than ``read``, no bytes to locate, no tokenizer.
"""
from __future__ import annotations

import abc
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runner.load.checkpoint.reads import Located
from runner.errors import CheckpointError

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


class Checkpoint(abc.ABC):
    """The tensors of a checkpoint, by name, read one at a time."""

    source: str                      # where it came from: local, hub, synthetic, gguf or offload
    revision: str | None             # the resolved commit of a Hub repo; None elsewhere
    ignored: dict[str, str]          # stored key -> why it is knowingly skipped
    entries: dict[str, TensorEntry]  # tensor name -> its file, dtype and shape as stored
    files: list[Path]                # the files the tensors are read from

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of its floating-point bytes are stored in."""
        counts: Counter[torch.dtype] = Counter()
        for e in self.entries.values():
            if e.dtype.is_floating_point:
                counts[e.dtype] += math.prod(e.shape) * e.dtype.itemsize
        return counts.most_common(1)[0][0] if counts else torch.float32

    @abc.abstractmethod
    def read(self, key: str) -> torch.Tensor:
        """One tensor, as stored (or as the model uses it, for a transformed source), in CPU memory."""

    def read_uncached(self, key: str) -> torch.Tensor:
        """One tensor read into its own buffer rather than through a memory map; sources without a cheaper path
        just read."""
        return self.read(key)

    def stored_type(self, key: str) -> str | None:
        """The quantized type a tensor is stored in (a GGUF's ``Q4_1``...); None for a plain dtype."""
        return None

    def read_blocks(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a quantized tensor's bytes as stored, one ``uint8`` row of blocks per output row
        (``stored_type``)."""
        raise NotImplementedError(f"{key} is not stored quantized")

    def locate(self, keys: list[str]) -> dict[str, Located] | None:
        """Where each tensor's bytes sit in a safetensors file, exactly as ``read`` returns them; None where any
        cannot be read straight from the file (another format, or transformed on the way)."""
        return None

    def read_ahead(self, keys: list[str]) -> None:
        """Start paging these tensors in, in the background; a no-op where that means nothing."""

    def fingerprint(self) -> dict:
        """What identifies these bytes, for the report and for reusing the offload folder."""
        return {"source": self.source, "revision": self.revision,
                "files": [{"path": str(f), "bytes": f.stat().st_size} for f in self.files]}

    @property
    def metadata_dir(self) -> Path | None:
        """The folder where ``config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and
        ``generation_config.json`` would sit beside the weights; None where there is no such folder."""
        return self.files[0].parent

    def config(self) -> dict[str, Any] | None:
        """The architecture as a Hugging Face config dict: here the ``config.json`` in ``metadata_dir``, if any."""
        config = self.metadata_dir / CONFIG_NAME if self.metadata_dir is not None else None
        if config is None or not config.is_file():
            return None
        try:
            return json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config}: not a readable config.json ({type(e).__name__}); fix or remove it") from e

    def tokenizer_fields(self) -> dict[str, Any] | None:
        """The tokenizer carried in the checkpoint's own metadata (GGUF's), for ``runner.infer.tokenizer``; None if none."""
        return None


class SeenThrough(Checkpoint):
    """A checkpoint seen through another (``inner``): renamed, or with some weights quantized. Whatever the view
    does not change (files, identity, metadata, tokenizer) is the inner checkpoint's."""

    inner: Checkpoint

    @property
    def files(self) -> list[Path]:
        return self.inner.files

    @property
    def source(self) -> str:
        return self.inner.source

    @property
    def revision(self) -> str | None:
        return self.inner.revision

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    @property
    def metadata_dir(self) -> Path | None:
        return self.inner.metadata_dir

    def config(self) -> dict[str, Any] | None:
        return self.inner.config()

    def tokenizer_fields(self) -> dict[str, Any] | None:
        return self.inner.tokenizer_fields()


def from_index(index: Path, open_files) -> Checkpoint:
    """A sharded checkpoint through its index (``*.index.json``): ``open_files(shards)`` opens the shards,
    then every tensor the index names must be in the shard it names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        weight_map = e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid index; expected JSON with a 'weight_map' object "
                              "of tensor name -> shard file name")
    files = sorted({shard_path(index, name) for name in set(weight_map.values())})
    missing = [_shown(f.name) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index}: names shard(s) {', '.join(missing)} that are not in {index.parent}; "
                              "the download is incomplete")
    not_files = [_shown(f.name) for f in files if not f.is_file()]  # a FIFO or device would hang or feed the reader
    if not_files:
        raise CheckpointError(f"{index}: shard {not_files[0]} is not a regular file; an index names shard files")
    checkpoint = open_files(files)
    absent = [key for key, name in weight_map.items()
              if key not in checkpoint.entries or checkpoint.entries[key].file.name != name]
    if absent:
        example = f"{_shown(absent[0])} in {_shown(weight_map[absent[0]])}"
        raise CheckpointError(f"{index}: lists {len(absent)} tensor(s) its shards do not hold, e.g. {example}; "
                              "the index and shards do not match")
    return checkpoint


def shard_path(index: Path, name: str) -> Path:
    """A shard the index names, confined to the index's folder: a plain relative name, which stays inside the
    folder once symlinks are resolved (a Hub snapshot's links resolve into its repo's ``blobs``).

    Raises:
        CheckpointError: an absolute name, a ``..`` in it, or a link out of the checkpoint's folder.
    """
    folder = index.parent
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise CheckpointError(f"{index}: names shard {name!r}, outside its folder; an index names files beside it")
    path = folder / relative
    home = folder.parent.parent if folder.parent.name == "snapshots" else folder  # a Hub repo: links to ../../blobs
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the name
        return path  # reported with the other missing shards
    except OSError as e:  # a name too long for the filesystem, a link loop, no permission
        raise CheckpointError(f"{index}: names shard {name[:60]!r}, which cannot be looked up ({e.strerror}); "
                              "an index names the shard files beside it") from e
    if not path.resolve().is_relative_to(home.resolve()):
        raise CheckpointError(f"{index}: shard {name!r} links to {path.resolve()}, outside {home}; "
                              "copy the file into the checkpoint folder if you trust it")
    return path


def _shown(name: str) -> str:
    """A name from a file as a message names it: as written, or quoted where a newline or another unprintable
    character in it would break the line."""
    return name if name and name.isprintable() else repr(name)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__
