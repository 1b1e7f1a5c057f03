"""A checkpoint seen with some of its weights quantized: ``<module>.weight`` read as ``<module>.qweight`` and
``<module>.scales``, made when first read, one weight at a time.

A GGUF's 4-bit blocks are repacked straight into the ``int4`` form; any other weight is read as the inner
checkpoint reads it (dequantized, for a GGUF) and rounded. Every other tensor passes through. The offload store
and the fingerprint see the quantized parts, so converted disk blocks are keyed by how they were quantized.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import torch

from runner.errors import CheckpointError
from runner.load.checkpoint.base import Checkpoint, SeenThrough, TensorEntry
from runner.load.checkpoint.reads import Located
from runner.quant.formats import FORMATS, WeightFormat
from runner.quant.gguf_blocks import block_values


@dataclass(frozen=True)
class Kept:
    """How one stored weight is kept: its form, and whether its stored 4-bit blocks are repacked as they are."""

    weight: str            # the stored weight's key, ``<module>.weight``
    form: str              # a name in ``formats.FORMATS``
    from_blocks: bool      # a GGUF's blocks, their values repacked; else read as floats and rounded

    @property
    def module(self) -> str:
        return self.weight.removesuffix(".weight")

    @property
    def format(self) -> WeightFormat:
        return FORMATS[self.form]


LAYOUT = "panels-16"  # the quantized parts' layout, in the fingerprint: converted disk blocks of another are not reused
CHUNK = 1024  # rows packed at a time: whole panels, so chunks pack alike


class QuantizedCheckpoint(SeenThrough):
    """``inner`` with the weights of ``kept`` (weight key -> how) replaced by their quantized parts."""

    def __init__(self, inner: Checkpoint, kept: dict[str, Kept]):
        self.inner, self.kept = inner, kept
        self.ignored = inner.ignored
        self.entries: dict[str, TensorEntry] = {k: e for k, e in inner.entries.items() if k not in kept}
        self._part_of: dict[str, tuple[Kept, str]] = {}  # part key -> (its weight, part name)
        for keep in kept.values():
            stored = inner.entries[keep.weight]
            rows, columns = stored.shape
            for part in keep.format.parts(rows, columns):
                key = f"{keep.module}.{part.name}"
                self.entries[key] = TensorEntry(stored.file, part.dtype, part.shape)
                self._part_of[key] = (keep, part.name)
        self._lock = threading.Lock()
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None  # a weight's parts are read one after another

    def fingerprint(self) -> dict:
        forms = "\n".join(sorted(f"{k.weight}:{k.form}:{int(k.from_blocks)}" for k in self.kept.values()))
        return {**self.inner.fingerprint(),
                "quantized": {"layout": LAYOUT, "forms": hashlib.sha256(forms.encode()).hexdigest()[:16]}}

    def read(self, key: str) -> torch.Tensor:
        if key not in self._part_of:
            return self.inner.read(key)
        keep, part = self._part_of[key]
        with self._lock:
            if self._last is None or self._last[0] != keep.weight:
                self._last = (keep.weight, self._quantized(keep))
            return self._last[1][part]

    def read_uncached(self, key: str) -> torch.Tensor:
        return self.read(key) if key in self._part_of else self.inner.read_uncached(key)

    def locate(self, keys: list[str]) -> dict[str, Located] | None:
        return None if any(k in self._part_of for k in keys) else self.inner.locate(keys)

    def read_ahead(self, keys: list[str]) -> None:
        # Only what passes through: a weight to be quantized is read once, into its own buffer, and paging all of
        # them in ahead would map the whole full-precision checkpoint beside the quantized model.
        self.inner.read_ahead([k for k in keys if k not in self._part_of])

    def stored_type(self, key: str) -> str | None:
        return None if key in self._part_of else self.inner.stored_type(key)

    def _quantized(self, keep: Kept) -> dict[str, torch.Tensor]:
        """The weight's parts, made ``CHUNK`` rows at a time into tensors of their final size: what a weight costs
        beyond its parts is one chunk's transients (and, rounding floats, the weight as read)."""
        rows, columns = self.inner.entries[keep.weight].shape
        if keep.from_blocks:
            kind = self.inner.stored_type(keep.weight)
            def make(start: int, stop: int) -> dict[str, torch.Tensor]:
                try:
                    return keep.format.pack(*block_values(kind, self.inner.read_blocks(keep.weight, start, stop), columns))
                except ValueError as e:
                    raise CheckpointError(f"{self.inner.files[0]}: tensor {keep.weight}: {e}; the file is damaged, "
                                          "re-download it") from e
        else:
            weight = self.inner.read_uncached(keep.weight)

            def make(start: int, stop: int) -> dict[str, torch.Tensor]:
                return keep.format.quantize(weight[start:stop])
        parts = {p.name: (p, torch.empty(p.shape, dtype=p.dtype)) for p in keep.format.parts(rows, columns)}
        for start in range(0, rows, CHUNK):
            stop = min(start + CHUNK, rows)
            for name, made in make(start, stop).items():
                part, out = parts[name]
                out.narrow(0, start // part.rows_per_index, len(made)).copy_(made)
        return {name: out for name, (_, out) in parts.items()}
