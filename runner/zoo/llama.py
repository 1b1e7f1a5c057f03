"""Llama: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU, tied or untied head.

Module names are Hugging Face's (``model.layers.N.self_attn.q_proj``), so Llama, SmolLM and
TinyLlama checkpoints load unchanged. ``LlamaDecoderLayer`` holds the residual connections:
the planner never splits one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from runner.infer.column import Steps, run_steps
from runner.infer.kv_cache import KVCache, LayerCache, ZooCausalLM, attend, step


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean of squares in fp32, as Hugging Face does, then back to the compute dtype
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; ``inv_freq`` is a non-persistent buffer, computed, never loaded."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [B or 1, T]`` -> cos, sin ``[B or 1, 1, T, head_dim]``, computed in fp32 as Hugging Face does."""
        freqs = positions.to(self.inv_freq.device).float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.kv_width = n_kv_heads * head_dim  # cached keys (and as many values) per token
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = attend(q, k, v, cache, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = LlamaAttention(hidden, n_heads, n_kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = LlamaMLP(hidden, intermediate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, intermediate: int, n_layers: int, n_heads: int,
                 n_kv_heads: int, eps: float, theta: float):
        super().__init__()
        head_dim = hidden // n_heads
        self.embed_tokens = nn.Embedding(vocab_size, hidden)
        self.rotary_emb = RotaryEmbedding(head_dim, theta)
        self.layers = nn.ModuleList(LlamaDecoderLayer(hidden, intermediate, n_heads, n_kv_heads, head_dim, eps)
                                    for _ in range(n_layers))
        self.norm = RMSNorm(hidden, eps)


class Llama(ZooCausalLM, nn.Module):
    """A Llama-family causal LM: token ids ``[B, T]`` in, logits ``[B, T, vocab]`` out.

    Arguments carry Hugging Face ``LlamaConfig`` names, so a ``config.json`` maps onto them directly.
    ``forward`` follows the runner's causal-LM contract (see ``GPT.forward``).
    """


    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,  # None: as many as query heads (no grouping)
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        tie_word_embeddings: bool = False,
    ):
        super().__init__()
        kv_heads = num_key_value_heads or num_attention_heads
        sizes = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                     num_key_value_heads=kv_heads, max_position_embeddings=max_position_embeddings)
        bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: sizes must be positive integers")
        if hidden_size % num_attention_heads or num_attention_heads % kv_heads:
            raise ValueError(f"hidden_size {hidden_size} must divide into num_attention_heads {num_attention_heads}, "
                             f"and those into num_key_value_heads {kv_heads}")
        self.block_size = max_position_embeddings
        self.width = hidden_size  # of the hidden states, which pipeline stages pass on
        self.vocab_size = vocab_size
        self.model = LlamaModel(vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                                kv_heads, rms_norm_eps, rope_theta)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_to_keep: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
        return run_steps(self.forward_steps(idx, attention_mask, positions, cache, logits_to_keep, hidden))

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, cache: KVCache | None = None,
                      keep: int = 0) -> torch.Tensor:
        """The final hidden states ``[B, T, hidden_size]`` (after the final norm, before the head), of the last
        ``keep`` positions only (0: all); see ``GPT.hidden_states``."""
        return run_steps(self.hidden_steps(idx, attention_mask, positions, cache, keep))

    def hidden_steps(self, idx: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor | None,
                     cache: KVCache | None, keep: int, hidden: torch.Tensor | None = None) -> Steps:
        """``hidden_states``, yielding after each block (of this pipeline stage's, when it is one)."""
        s = step(idx, attention_mask, positions, cache)
        layers = self.own_layers(len(self.model.layers))
        if self.embeds():
            x = self.model.embed_tokens(idx)
            yield
        else:
            x = self.stage_input(idx, hidden, self.model.layers[layers[0]])
        cos, sin = self.model.rotary_emb(x, s.positions)
        yield
        for i in layers:
            x = self.model.layers[i](x, cos, sin, s.mask, s.layer_cache(cache, i))
            yield
        return self.stage_output(x, keep, self.model.norm)

    @staticmethod
    def arch_from_config(config: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from a Hugging Face ``config.json`` (or GGUF metadata in its names)."""
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                 "tie_word_embeddings")
        arch = {k: config[k] for k in names if config.get(k) is not None}
        rope = config.get("rope_parameters")  # transformers 5 writes rope_theta there, not at the top
        if "rope_theta" not in arch and isinstance(rope, dict) and rope.get("rope_theta") is not None:
            arch["rope_theta"] = rope["rope_theta"]
        return arch
