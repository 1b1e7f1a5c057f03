"""The parts every decoder-only family is built from: norms, rotary embeddings, attention, MLPs, a mixture of experts.

Each part takes its switches as arguments (a bias here, a norm there, a window, a soft cap) rather than being
copied per family, as llama.cpp builds each architecture's graph from shared ops. Module and parameter names
are Hugging Face's, so a family's checkpoints load under their own keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from runner.infer.attention import attend
from runner.infer.kv_cache import LayerCache
from runner.plan.blocks import Experts


class RMSNorm(nn.Module):
    """Root-mean-square norm, its mean of squares in fp32 as Hugging Face computes it. ``offset`` 1.0 is Gemma's
    ``x * (1 + weight)``, whose weights are stored as the difference from one (and multiplied in fp32)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0.0 else torch.zeros(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding: its base, the share of each head it rotates, and how a long-context checkpoint
    stretches it (``kind`` ``default``, ``linear`` or ``llama3``, as transformers' ``rope_type``)."""

    theta: float = 10000.0
    rotary_share: float = 1.0        # Phi-4-mini rotates 3/4 of each head and passes the rest
    kind: str = "default"
    factor: float = 1.0              # linear, llama3
    low_freq_factor: float = 1.0     # llama3
    high_freq_factor: float = 4.0    # llama3
    original_context: int = 8192     # llama3


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; ``inv_freq`` is a non-persistent buffer, computed, never loaded."""

    def __init__(self, head_dim: int, rope: Rope):
        super().__init__()
        self.rotated = int(head_dim * rope.rotary_share) // 2 * 2
        inv_freq = 1.0 / (rope.theta ** (torch.arange(0, self.rotated, 2, dtype=torch.float32) / self.rotated))
        if rope.kind == "linear":
            inv_freq = inv_freq / rope.factor
        elif rope.kind == "llama3":
            inv_freq = _llama3_frequencies(inv_freq, rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [B or 1, T]`` -> cos, sin ``[B or 1, 1, T, rotated]``, computed in fp32 as Hugging Face does."""
        freqs = positions.to(self.inv_freq.device).float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _llama3_frequencies(inv_freq: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Llama 3.1's long-context frequencies: long wavelengths slowed by ``factor``, short ones kept, a smooth
    blend between."""
    low_wavelen = rope.original_context / rope.low_freq_factor
    high_wavelen = rope.original_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, H, T, D]``; where the tables are narrower than a head, the rest passes as is."""
    rotated = cos.shape[-1]
    if rotated == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head, rest = x[..., :rotated], x[..., rotated:]
    return torch.cat([head * cos + _rotate_half(head) * sin, rest], dim=-1)


@dataclass(frozen=True)
class AttentionShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False            # Qwen2
    out_bias: bool = False
    fused_qkv: bool = False           # Phi-3: one qkv_proj
    qk_norm: str | None = None        # "head": RMSNorm per head (Qwen3, Gemma 3); "full": over the projection (OLMoE)
    norm_eps: float = 1e-6
    norm_offset: float = 0.0          # Gemma 3's q/k norms are Gemma norms
    scale: float | None = None        # None: 1/sqrt(head_dim); Gemma: query_pre_attn_scalar ** -0.5
    softcap: float | None = None      # Gemma 2: scores pass through cap * tanh(scores / cap)


class Attention(nn.Module):
    """Grouped-query attention with the switches of ``AttentionShape``, over the layer's KV cache."""

    def __init__(self, shape: AttentionShape):
        super().__init__()
        s = shape
        self.shape = s
        self.kv_width = s.kv_heads * s.head_dim  # cached keys (and as many values) per token
        q_width = s.heads * s.head_dim
        if s.fused_qkv:
            self.qkv_proj = nn.Linear(s.hidden, q_width + 2 * self.kv_width, bias=s.qkv_bias)
        else:
            self.q_proj = nn.Linear(s.hidden, q_width, bias=s.qkv_bias)
            self.k_proj = nn.Linear(s.hidden, self.kv_width, bias=s.qkv_bias)
            self.v_proj = nn.Linear(s.hidden, self.kv_width, bias=s.qkv_bias)
        self.o_proj = nn.Linear(q_width, s.hidden, bias=s.out_bias)
        if s.qk_norm == "head":
            self.q_norm = RMSNorm(s.head_dim, s.norm_eps, s.norm_offset)
            self.k_norm = RMSNorm(s.head_dim, s.norm_eps, s.norm_offset)
        elif s.qk_norm == "full":
            self.q_norm = RMSNorm(q_width, s.norm_eps, s.norm_offset)
            self.k_norm = RMSNorm(self.kv_width, s.norm_eps, s.norm_offset)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        s = self.shape
        B, T, _ = x.shape
        if s.fused_qkv:
            q, k, v = self.qkv_proj(x).split([s.heads * s.head_dim, self.kv_width, self.kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, T, -1, s.head_dim) for t in (q, k, v))
        if s.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = attend(q, k, v, cache, mask, scale=s.scale, softcap=s.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU with SiLU, GeGLU with GELU; ``fused`` keeps gate and up in one
    ``gate_up_proj`` (Phi-3), the gate's rows first."""

    def __init__(self, hidden: int, intermediate: int, activation: str = "silu", fused: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.fused = fused
        if fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        else:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
            self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


@dataclass(frozen=True)
class ExpertsShape:
    experts: int
    per_token: int                     # top-k
    intermediate: int                  # of each expert
    normalize: bool = True             # top-k weights renormalised to sum to one (Mixtral; Qwen3-MoE's norm_topk_prob)
    shared_intermediate: int = 0       # Qwen2-MoE: an always-on expert, scaled by a sigmoid gate
    activation: str = "silu"


class SparseMoE(nn.Module):
    """A router picks ``per_token`` experts per token (softmax over all experts, then top-k); each expert is a
    gated MLP; the token's output is their weighted sum (plus the shared expert's, where there is one)."""

    def __init__(self, hidden: int, shape: ExpertsShape):
        super().__init__()
        self.shape = shape
        self.gate = nn.Linear(hidden, shape.experts, bias=False)
        self.experts = Experts((GatedMLP(hidden, shape.intermediate, shape.activation) for _ in range(shape.experts)),
                               shape.per_token)
        if shape.shared_intermediate:
            self.shared_expert = GatedMLP(hidden, shape.shared_intermediate, shape.activation)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(weights, self.shape.per_token, dim=-1)
        if self.shape.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        if flat.is_meta:  # tracing, where nothing is chosen: every expert runs once so the trace sees them all
            for expert in self.experts:
                out = out + expert(flat)
        else:
            # The (token, slot) pairs grouped by expert in one sort, their counts in one sync; each chosen expert then
            # runs once over its tokens, in ascending order.
            per_token = self.shape.per_token
            order = chosen.reshape(-1).argsort(stable=True)
            counts = torch.bincount(chosen.reshape(-1), minlength=self.shape.experts).tolist()
            tokens, slot_weights = order // per_token, weights.reshape(-1)[order, None]
            self.experts.route([e for e, n in enumerate(counts) if n])
            start = 0
            for e, n in enumerate(counts):
                if n:
                    rows = tokens[start:start + n]
                    # An expert placed apart (runner.plan.blocks.Experts) computes where it sits; its output comes back.
                    computed = self.experts[e](flat[rows]).to(out.device)
                    out.index_add_(0, rows, computed * slot_weights[start:start + n])
                    start += n
        self.experts.done()
        if self.shape.shared_intermediate:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view_as(x)
