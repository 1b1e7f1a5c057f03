"""A checkpoint seen under the model's own tensor names.

Checkpoints of one architecture come in several layouts (Hugging Face GPT-2 stores its
linear weights transposed as Conv1D, with or without a ``transformer.`` prefix, and carries
legacy mask buffers). A model class may say how its names map onto a checkpoint's by
defining ``checkpoint_names(stored) -> NameMap``; the rest of the runner then only ever
sees the model's names and shapes.

A stored layout is read as it is: a transposed weight becomes a transposed *view* of the
stored bytes (``F.linear`` takes it as it is), never a copy. So a mapped file's pages are
the weight itself, and a disk block is read straight from the checkpoint like any other.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from runner.load.checkpoint.base import Checkpoint, SeenThrough, TensorEntry
from runner.load.checkpoint.reads import Located

@dataclass(frozen=True)
class Source:
    """Where one model tensor comes from: a stored key, read as it is or as a transposed view of it."""

    key: str
    transposed: bool = False  # a 2-D ``[in, out]`` weight seen as ``[out, in]`` (Conv1D -> Linear)


@dataclass(frozen=True)
class NameMap:
    sources: dict[str, Source]                             # model name -> where it comes from
    ignored: dict[str, str] = field(default_factory=dict)  # stored key -> why it is knowingly skipped


def _view(tensor: torch.Tensor, src: Source) -> torch.Tensor:
    return tensor.t() if src.transposed else tensor


class RenamedCheckpoint(SeenThrough):
    """Any checkpoint under a ``NameMap``: tensors by the model's names, everything else the inner one's."""

    def __init__(self, inner: Checkpoint, names: NameMap):
        self.inner = inner
        self.sources = names.sources
        self.ignored = {**inner.ignored, **names.ignored}
        self.entries: dict[str, TensorEntry] = {}
        for name, src in names.sources.items():
            stored = inner.entries.get(src.key)
            if stored is not None:
                shape = tuple(reversed(stored.shape)) if src.transposed else stored.shape
                self.entries[name] = replace(stored, shape=shape)

    def read(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        return _view(self.inner.read(src.key), src)

    def stored_type(self, name: str) -> str | None:
        src = self.sources[name]
        return None if src.transposed else self.inner.stored_type(src.key)

    def read_blocks(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.inner.read_blocks(self.sources[name].key, start, stop)

    def read_ahead(self, names: list[str]) -> None:
        self.inner.read_ahead([self.sources[n].key for n in names if n in self.sources])

    def locate(self, names: list[str]) -> dict[str, Located] | None:
        """Where each tensor's bytes sit, under the model's names (a transposed one as stored, marked to be viewed)."""
        sources = [self.sources[n] for n in names]
        located = self.inner.locate([src.key for src in sources])
        if located is None:
            return None
        return {n: replace(located[src.key], transposed=src.transposed) for n, src in zip(names, sources)}

    def read_uncached(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        return _view(self.inner.read_uncached(src.key), src)
