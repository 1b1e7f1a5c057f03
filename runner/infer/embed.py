"""Embeddings: one forward over a right-padded batch, its final hidden states pooled into one vector per sequence.

An ``Encoder`` turns token ids and their attention mask into final hidden states. The zoo's GPT-2 and Llama are
encoders themselves (``hidden_states``: after the final norm, before the head). A transformers model goes through
``TransformersEncoder``: an encoder such as ``BertModel`` as it is, a causal LM through its base model, whose
``last_hidden_state`` is likewise after the final norm. ``embed`` pools the real tokens' states: their mean
(sentence-transformers' mean pooling), the last one (decoder embedders) or the first (BERT's ``[CLS]``).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from runner.errors import EmbedError
from runner.infer.finite import check_rows
from runner.infer.model import context_length

Pooling = Literal["mean", "last", "cls"]


@runtime_checkable
class Encoder(Protocol):
    """A model that turns right-padded token ids into final hidden states."""

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``idx [B, T]`` and ``attention_mask [B, T]`` (1: a real token, 0: padding) -> ``[B, T, H]``."""
        ...


class TransformersEncoder:
    """A transformers model whose forward returns ``last_hidden_state`` (an encoder, or a causal LM's base model)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.block_size = context_length(model)  # None: the model does not say
        # A causal base model would otherwise build a KV cache that one forward never reads.
        self._kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, attention_mask=attention_mask, **self._kwargs).last_hidden_state


def encoder(model: nn.Module, model_name: str) -> Encoder:
    """The model as something ``embed`` can run, or a one-line error saying what would fit.

    Raises:
        EmbedError: the model gives no final hidden states (neither a zoo model nor a transformers
            encoder or causal LM).
    """
    if isinstance(model, Encoder):
        return model
    base = _transformers_base(model)
    if base is not None:
        return TransformersEncoder(base)
    raise EmbedError(f"model: {model_name} ({type(model).__name__}) gives no hidden states to embed; an embedding "
                     "task needs a zoo GPT-2 or Llama, or a transformers encoder or causal LM (e.g. model=minilm)")


def _transformers_base(model: nn.Module) -> nn.Module | None:
    """The transformers model whose ``last_hidden_state`` is the final one: the model itself for an encoder such as
    ``BertModel``, the base model of a ``*ForCausalLM``; None for anything else (encoder-decoders included)."""
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", None)  # every PreTrainedModel: its base model, or itself
    if config is None or not isinstance(base, nn.Module) or getattr(config, "is_encoder_decoder", False):
        return None
    try:
        accepted = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return None
    return base if "input_ids" in accepted and "attention_mask" in accepted else None


@torch.inference_mode()
def embed(enc: Encoder, batch: Sequence[Sequence[int]], *, pooling: Pooling, normalize: bool,
          pad_id: int) -> torch.Tensor:
    """One vector per sequence of ``batch``: float32 ``[B, H]`` on the CPU, rows in the input order.

    One forward over the whole batch (the caller sizes it), right-padded with ``pad_id`` under an attention mask,
    so every real token sees what it would see alone; ``pooling`` then reads the real tokens only, and
    ``normalize`` scales each row to unit L2 norm.

    Raises:
        EmbedError: the batch is empty, a sequence has no tokens, or one is longer than the model's context.
    """
    if pooling not in ("mean", "last", "cls"):
        raise EmbedError(f"pooling: {pooling!r} is not a pooling; expected mean, last or cls")
    if not batch:
        raise EmbedError("nothing to embed: the batch holds no sequences")
    lengths = [len(s) for s in batch]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise EmbedError(f"sequence {empty[0]} of the batch has no tokens to embed; drop empty texts before "
                         "embedding")
    context = getattr(enc, "block_size", None)
    if isinstance(context, int) and max(lengths) > context:
        longest = max(range(len(batch)), key=lengths.__getitem__)
        raise EmbedError(f"sequence {longest} of the batch has {lengths[longest]} tokens, past the model's context "
                         f"of {context}; truncate it to {context} tokens")
    ids, mask = right_pad(batch, pad_id)
    hidden = enc.hidden_states(ids, mask)
    mask = mask.to(hidden.device)
    if pooling == "mean":  # summed in float32, whatever the compute dtype
        weights = mask.to(torch.float32)[:, :, None]
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1)
    elif pooling == "last":
        last = torch.tensor(lengths, device=hidden.device) - 1
        pooled = hidden[torch.arange(len(batch), device=hidden.device), last].float()
    else:  # cls
        pooled = hidden[:, 0].float()
    check_rows(pooled, lambda row: (lambda: enc.hidden_states(ids[row:row + 1, :lengths[row]],
                                                              mask[row:row + 1, :lengths[row]].cpu())),
               "the pooled hidden states")
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.cpu()


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, longest]`` ids left-aligned, ``pad_id`` after them, and the mask of real tokens (1) against padding (0)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask
