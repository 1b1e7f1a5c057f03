"""The contract generation drives a model through, and the adapter that gives transformers models the same one.

A ``CausalLM`` takes token ids ``[B, T]`` with an attention mask over cached and new tokens (left
padding), optional positions, and a cache it fills; it returns logits for the last ``logits_to_keep``
positions (0: all). The zoo's GPT-2 and Llama implement it directly; a transformers causal LM is
wrapped in ``TransformersLM`` and generates through its own ``past_key_values``.
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from runner.errors import GenerateError


class Cache(Protocol):
    """What the decode loop needs of a cache: its length, dropping finished rows, and sharing a prefix."""

    @property
    def length(self) -> int: ...

    def keep(self, rows: torch.Tensor) -> None: ...

    def repeat_rows(self, n: int) -> None: ...


@runtime_checkable
class SlotCache(Cache, Protocol):
    """A cache whose rows are slots (continuous batching): a finished row's slot takes the keys and values of a
    request prefilled apart, right-aligned on the cache's length (``runner.infer.kv_cache.KVCache``)."""

    capacity: int  # positions each row can hold

    def share(self, tokens: tuple[int, ...], source: Any) -> bool: ...

    def place(self, source: Any, slots: torch.Tensor, columns: torch.Tensor, rows: int,
              continues: bool = False) -> None: ...

    def rebase(self, width: int) -> None: ...

    def seeded(self, rows: int, capacity: int) -> Any: ...


@runtime_checkable
class CausalLM(Protocol):
    """A model the generation loop can drive (see the module docstring)."""

    block_size: int  # the longest context it takes

    def new_cache(self, capacity: int) -> Cache: ...

    def __call__(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, cache: Cache | None = None,
                 logits_to_keep: int = 0) -> torch.Tensor: ...


class TransformersCache:
    """A transformers ``DynamicCache``: it grows with every step, on each layer's device."""

    def __init__(self, model: nn.Module):
        from transformers import DynamicCache

        try:
            self.inner = DynamicCache(config=model.config)
        except TypeError:  # transformers before 4.56 takes no config
            self.inner = DynamicCache()

    @property
    def length(self) -> int:
        return int(self.inner.get_seq_length())

    def keep(self, rows: torch.Tensor) -> None:
        self.inner.batch_select_indices(rows)

    def repeat_rows(self, n: int) -> None:
        self.inner.batch_repeat_interleave(n)


class TransformersLM:
    """A transformers causal LM (``can_generate()``) behind the runner's contract."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.block_size = context_length(model) or 1 << 30
        # Arguments that transformers renamed or added over its versions: pass what this one takes.
        accepted = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._keeps_logits = "logits_to_keep" in accepted

    def new_cache(self, capacity: int) -> TransformersCache:
        return TransformersCache(self.model)

    def __call__(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, cache: TransformersCache | None = None,
                 logits_to_keep: int = 0) -> torch.Tensor:
        kwargs = {self._cache_arg: cache.inner} if cache is not None else {}
        if positions is None and attention_mask is not None:
            start = cache.length if cache is not None else 0
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + idx.shape[1]]
        if self._keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(input_ids=idx, attention_mask=attention_mask, position_ids=positions, use_cache=cache is not None,
                         **kwargs)
        return out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model takes, when it says (a zoo model's ``block_size``, a transformers config)."""
    if isinstance(model, CausalLM):
        return model.block_size
    config = getattr(model, "config", None)  # a transformers model, causal or not
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def causal_lm(model: nn.Module, model_name: str) -> CausalLM:
    """The model as something generation can drive, or a one-line error saying which task fits it."""
    if isinstance(model, CausalLM):
        return model
    can_generate = getattr(type(model), "can_generate", None)  # transformers' own answer, on every PreTrainedModel
    if callable(can_generate) and can_generate() and hasattr(model, "config"):
        return TransformersLM(model)
    raise GenerateError(f"model: {model_name} ({type(model).__name__}) is not a causal language model and cannot "
                        "generate text; an encoder fits an embedding task (task=embed), not task=generate")
