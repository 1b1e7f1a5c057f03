"""A checkpoint seen under the model's own tensor names.

Checkpoints of one architecture come in several layouts (Hugging Face GPT-2 stores its
linear weights transposed as Conv1D, with or without a ``transformer.`` prefix, and carries
legacy mask buffers). A model class may say how its names map onto a checkpoint's by
defining ``checkpoint_names(stored) -> NameMap``; the rest of the runner then only ever
sees the model's names and shapes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from runner.checkpoint.base import Checkpoint, TensorEntry
from runner.checkpoint.reads import Located

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Source:
    """Where one model tensor comes from: a stored key, and how to turn the stored tensor into it."""

    key: str
    transform: Transform | None = None
    shape: tuple[int, ...] | None = None  # the shape after ``transform``; None: as stored


@dataclass(frozen=True)
class NameMap:
    sources: dict[str, Source]                             # model name -> where it comes from
    ignored: dict[str, str] = field(default_factory=dict)  # stored key -> why it is knowingly skipped


def transpose(t: torch.Tensor) -> torch.Tensor:
    """Conv1D ``[in, out]`` -> Linear ``[out, in]``; contiguous, so it streams like any other tensor."""
    return t.t().contiguous()


class RenamedCheckpoint(Checkpoint):
    """Any checkpoint under a ``NameMap``: tensors by the model's names, everything else the inner one's."""

    def __init__(self, inner: Checkpoint, names: NameMap):
        self.inner = inner
        self.sources = names.sources
        self.ignored = {**inner.ignored, **names.ignored}
        self.entries: dict[str, TensorEntry] = {}
        for name, src in names.sources.items():
            stored = inner.entries.get(src.key)
            if stored is not None:
                self.entries[name] = replace(stored, shape=src.shape or stored.shape)

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

    def read(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        tensor = self.inner.read(src.key)
        return src.transform(tensor) if src.transform else tensor

    def read_ahead(self, names: list[str]) -> None:
        self.inner.read_ahead([self.sources[n].key for n in names if n in self.sources])

    def locate(self, names: list[str]) -> dict[str, Located] | None:
        """Where each tensor's bytes sit, under the model's names; None if any is transformed on the way."""
        sources = [self.sources[n] for n in names]
        if any(src.transform for src in sources):
            return None
        located = self.inner.locate([src.key for src in sources])
        if located is None:
            return None
        return {n: replace(located[src.key], shape=self.entries[n].shape) for n, src in zip(names, sources)}

    def read_uncached(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        tensor = self.inner.read_uncached(src.key)
        return src.transform(tensor) if src.transform else tensor

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    @property
    def metadata_dir(self) -> Path | None:
        return self.inner.metadata_dir

    def config(self) -> dict[str, Any] | None:
        return self.inner.config()

    def tokenizer_fields(self) -> dict[str, Any] | None:
        return self.inner.tokenizer_fields()
