"""Attention over a layer's cache: the fused kernel where it serves, a decode step's single query as grouped matrix
products on the CPU (with a shared prefix's keys read once for all rows: cascade attention), and soft-capped scores
written out."""
from __future__ import annotations

import torch

from runner.infer.kv_cache import LayerCache, PrefixView
from runner.plan.arithmetic import cpu_bf16


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache | None,
           mask: torch.Tensor | None, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention of ``q [B, H, T, D]`` over the cached and new keys (grouped-query when
    there are fewer key heads). ``mask`` from ``Step.mask_for``; None means causal. ``scale``: None is
    1/sqrt(D). ``softcap``: scores pass through ``softcap * tanh(scores / softcap)`` before the softmax (Gemma 2),
    which the fused kernel cannot do."""
    prefix = None
    if cache is not None:
        k, v = cache.append(k, v)
        prefix = cache.prefix()
    if prefix is not None and (softcap is not None or q.shape[2] != 1 or q.device.type != "cpu"):
        k, v, mask = prefix.joined(k, v, mask, q.shape[2])
        prefix = None
    if softcap is not None:
        return _capped_attention(q, k, v, mask, scale, softcap)
    if q.shape[2] == 1 and q.device.type == "cpu":
        return _one_query(q, k, v, mask, scale, prefix)
    gqa = k.shape[1] != q.shape[1]
    if mask is not None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device),
                                                                enable_gqa=gqa, scale=scale)
    # Without a mask, T > 1 only happens on a fresh sequence (k is as long as q): plain causal.
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa,
                                                            scale=scale)


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float | None, prefix: PrefixView | None = None) -> torch.Tensor:
    """A decode step's attention on the CPU: each key head's query heads as the rows of one matrix product over
    the cache. The fused kernel walks (row, head) pairs one query at a time and costs ~1.5x this at 64 rows.
    A shared prefix's keys are multiplied by every row's queries at once, so they are read once per step, not
    once per row; one softmax then spans the prefix and each row's own columns."""
    B, H, _, D = q.shape
    kv = k.shape[1]
    if q.dtype in (torch.bfloat16, torch.float16) and not cpu_bf16():  # emulated half products: ~4x slower
        up = PrefixView(prefix.keys.float(), prefix.values.float(), prefix.rows) if prefix is not None else None
        return _one_query(q.float(), k.float(), v.float(), mask, scale, up).to(q.dtype)
    scale = scale if scale is not None else D ** -0.5
    grouped = q.view(B, kv, H // kv, D)  # query heads that share a key head, side by side
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * scale
    if mask is not None:  # [B, 1, 1, S] booleans: masked-out keys weigh nothing
        scores = scores.masked_fill(~mask.to(q.device).view(B, 1, 1, -1), float("-inf"))
    if prefix is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v).view(B, H, 1, D)
    P = prefix.keys.shape[2]
    by_head = grouped.transpose(0, 1).reshape(kv, -1, D)  # [kv, B * groups, D]: every row's queries at once
    shared = (torch.matmul(by_head, prefix.keys[0].transpose(-1, -2)) * scale).view(kv, B, -1, P).transpose(0, 1)
    shared = shared.masked_fill(~prefix.rows.view(B, 1, 1, 1), float("-inf"))
    weights = torch.softmax(torch.cat([shared, scores], dim=-1), dim=-1)
    own = torch.matmul(weights[..., P:], v)
    from_prefix = torch.matmul(weights[..., :P].transpose(0, 1).reshape(kv, -1, P), prefix.values[0])
    return (own + from_prefix.view(kv, B, -1, D).transpose(0, 1)).reshape(B, H, 1, D)


def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float | None, softcap: float) -> torch.Tensor:
    """Attention with soft-capped scores, written out; the softmax in fp32, as Hugging Face's eager path does."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    T, S = q.shape[2], k.shape[2]
    if mask is None:  # a fresh sequence (causal) or one new token (sees everything)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
