"""Weights that stay quantized: which weight is kept in which form, and the skeleton and checkpoint that hold it.

Recipe (``quantize_model``), run on the skeleton before it is planned:
1. each ``nn.Linear`` and ``nn.Embedding`` weight gets a form from how it is stored and ``quantize``:
   - a GGUF's Q4_0 and Q4_1 weights (embeddings too) stay ``int4h``, Q4_K ones ``int4``, repacked as they are;
   - its Q8_0 weights keep their values exactly as ``int8g`` (int8 in groups of 32, an fp16 scale each), Q5_K and
     Q6_K ones as ``q5k`` and ``q6k`` (their 5- and 6-bit values in int8, fp32 scales);
   - other quantized types (Q2_K, Q3_K, IQ types, ...) are dequantized to the compute dtype, as before;
   - ``quantize=int8|int4`` rounds full-precision weights, embeddings to ``int8``;
2. those modules are swapped for ``QuantLinear`` and ``QuantEmbedding`` on meta (a tied head shares its
   embedding's table), so the planner, the ledger and the offload store count the quantized bytes;
3. the checkpoint is seen through ``QuantizedCheckpoint``, which makes each weight's parts as it is read: one
   weight at a time while the blocks stream in, never the full-precision model.

The plan lists, per stored type, what it is kept as (``Quantization.lines``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from runner.errors import ConfigError
from runner.load.checkpoint.base import Checkpoint
from runner.quant.checkpoint import Kept, QuantizedCheckpoint
from runner.quant.formats import FORMATS
from runner.quant.gguf_blocks import FOUR_BIT
from runner.quant.modules import QuantEmbedding, QuantLinear, tied_head

__all__ = ["Kept", "Quantization", "QuantizedCheckpoint", "quantize_model"]

@dataclass(frozen=True)
class Quantization:
    """What was kept quantized: weight key -> how, and the plan's lines, one per stored type and form."""

    setting: str | None                     # ``quantize``: None, int8 or int4
    kept: dict[str, Kept] = field(default_factory=dict)
    lines: tuple[str, ...] = ()
    kept_bytes: int = 0                     # the kept weights' quantized bytes
    dense_bytes: int = 0                    # the same weights in the compute dtype

    def wrap(self, checkpoint: Checkpoint) -> Checkpoint:
        """``checkpoint`` with the kept weights read as their quantized parts."""
        return QuantizedCheckpoint(checkpoint, self.kept) if self.kept else checkpoint


def quantize_model(model: nn.Module, checkpoint: Checkpoint | None, setting: str | None, keep_gguf: bool,
                   dtype: torch.dtype) -> Quantization:
    """Choose each weight's form, and swap the modules that keep one quantized (in place, on meta).

    ``checkpoint`` is None for synthetic weights (drawn in full precision, so only ``setting`` applies);
    ``keep_gguf``: a GGUF's quantized blocks stay quantized (``dtype: auto``) rather than being dequantized.

    Raises:
        ConfigError: ``quantize`` on a checkpoint whose weights are already quantized, or on a model with no
            ``nn.Linear`` or ``nn.Embedding`` to quantize.
    """
    stored = {key: checkpoint.stored_type(key) for key in checkpoint.entries} if checkpoint is not None else {}
    quantized_types = sorted({t for t in stored.values() if t})
    if setting and quantized_types:
        raise ConfigError(f"quantize: {setting} asks to quantize weights the checkpoint already stores quantized "
                          f"({', '.join(quantized_types)}); leave quantize=null, and they stay as stored")
    if not setting and not (quantized_types and keep_gguf):
        return Quantization(setting)
    kept: dict[str, Kept] = {}
    counts: Counter[str] = Counter()
    owner_of: dict[int, str] = {}  # a weight tensor -> the module whose slot holds it first
    dense = packed = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        weight = f"{name}.weight"
        tied = owner_of.setdefault(id(module.weight), name)
        if tied != name:  # a tied head: it shares its embedding's table, whatever that became
            owner = model.get_submodule(tied)
            if isinstance(owner, QuantEmbedding) and isinstance(module, nn.Linear):
                _swap(model, name, tied_head(owner, module.bias))
            continue
        entry = checkpoint.entries.get(weight) if checkpoint is not None else None
        if checkpoint is not None and entry is None:
            continue  # not in the checkpoint: the key check names it
        source = stored.get(weight) or str(entry.dtype if entry is not None else dtype).removeprefix("torch.")
        form, from_blocks, note = _form(module, stored.get(weight), setting)
        counts[f"{source} -> {note}"] += 1
        if form is None:
            continue
        kept[weight] = Kept(weight, form, from_blocks)
        dense += module.weight.numel() * dtype.itemsize
        packed += sum(p.nbytes for p in FORMATS[form].parts(*module.weight.shape))
        if isinstance(module, nn.Embedding):
            _swap(model, name, QuantEmbedding(FORMATS[form], module.num_embeddings, module.embedding_dim, dtype))
        else:
            _swap(model, name, QuantLinear(FORMATS[form], module.in_features, module.out_features, module.bias))
    if setting and not kept:
        raise ConfigError(f"quantize: {setting}: the model has no nn.Linear or nn.Embedding layer to quantize "
                          f"({type(model).__name__}); leave quantize=null")
    lines = tuple(f"{what}: {n} tensor(s)" for what, n in sorted(counts.items(), key=lambda c: -c[1]))
    return Quantization(setting, kept, lines, packed, dense)


def _form(module: nn.Module, stored_type: str | None, setting: str | None) -> tuple[str | None, bool, str]:
    """(form or None to leave it, from the stored blocks, what the plan says) for one weight."""
    rows, columns = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else \
        (module.num_embeddings, module.embedding_dim)
    if stored_type is None:
        if setting is None:
            return None, False, "as stored"
        if setting == "int4" and isinstance(module, nn.Linear) and FORMATS["int4"].fits(rows, columns):
            return "int4", False, FORMATS["int4"].describe
        return "int8", False, FORMATS["int8"].describe + ("" if setting == "int8" or isinstance(module, nn.Embedding)
                                                          else " (its input width is not whole groups of 32)")
    if stored_type in FOUR_BIT and FORMATS["int4"].fits(rows, columns):
        form = "int4" if stored_type == "Q4_K" else "int4h"  # Q4_K's scales are products: not fp16 numbers
        return form, True, FORMATS[form].describe + ", repacked"
    form = {"Q8_0": "int8g", "Q5_K": "q5k", "Q6_K": "q6k"}.get(stored_type)
    if form is not None and FORMATS[form].fits(rows, columns):
        return form, True, FORMATS[form].describe + ", the stored values"
    return None, False, "dequantized (no kept form)"


def _swap(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, replacement)
