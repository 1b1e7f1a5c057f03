"""The layers that hold a quantized weight in place of ``nn.Linear`` and ``nn.Embedding``.

Their weight is a set of integer buffers (``<module>.qweight``, ``<module>.scales``): the planner counts their
real bytes, the loader and the offload store move them as they are. A bias stays a floating parameter under its
own name. A tied head shares its embedding's buffers, so the tie is found as for any model.
"""
from __future__ import annotations

import torch
from torch import nn

from runner.quant.formats import Part, RowFormat, WeightFormat


def _meta_buffers(module: nn.Module, parts: tuple[Part, ...]) -> None:
    for p in parts:
        module.register_buffer(p.name, torch.empty(p.shape, dtype=p.dtype, device="meta"))


class QuantLinear(nn.Module):
    """``nn.Linear`` with its weight kept in ``format``'s integers, computed by that format's kernel."""

    def __init__(self, fmt: WeightFormat, in_features: int, out_features: int, bias: nn.Parameter | None):
        super().__init__()
        self.format, self.in_features, self.out_features = fmt, in_features, out_features
        self.parts = tuple(p.name for p in fmt.parts(out_features, in_features))
        _meta_buffers(self, fmt.parts(out_features, in_features))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # tracing the forward order: only the shape matters
            out = x.new_empty(*x.shape[:-1], self.out_features)
        else:
            out = self.format.linear(x, {p: getattr(self, p) for p in self.parts}, self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.format.name}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` whose table is kept in ``fmt`` (one whose rows are read by id), dequantized on lookup."""

    def __init__(self, fmt: RowFormat, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        self.format, self.num_embeddings, self.embedding_dim, self.dtype = fmt, num_embeddings, embedding_dim, dtype
        self.parts = tuple(p.name for p in fmt.parts(num_embeddings, embedding_dim))
        _meta_buffers(self, fmt.parts(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_meta:
            return torch.empty(*ids.shape, self.embedding_dim, dtype=self.dtype, device="meta")
        return self.format.rows(ids, {p: getattr(self, p) for p in self.parts}, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format.name}"


def tied_head(embedding: QuantEmbedding, bias: nn.Parameter | None) -> QuantLinear:
    """The output layer that shares ``embedding``'s table (GPT-2's, SmolLM2's tied head): the same buffers."""
    head = QuantLinear(embedding.format, embedding.embedding_dim, embedding.num_embeddings, bias)
    for part in head.parts:
        setattr(head, part, getattr(embedding, part))
    return head
