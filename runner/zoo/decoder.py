"""One decoder-only causal LM for every zoo family, its variations in a typed ``DecoderShape``.

Llama, Mistral, Qwen, Gemma, Phi-3 and the mixtures of experts differ in switches, not in structure: a
bias on q/k/v, a norm on q and k, a fused projection, sandwich norms, a sliding window on some layers,
a soft cap, experts in place of the MLP. ``runner.zoo.families`` reads each family's ``config.json`` into
a ``DecoderShape``; this module builds and runs it from ``runner.zoo.parts``.

Module names are Hugging Face's (``model.layers.N.self_attn.q_proj``), so checkpoints load unchanged.
``DecoderLayer`` holds the residual connections: the planner never splits one.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from runner.infer.column import Steps
from runner.infer.kv_cache import KVCache, LayerCache, ZooCausalLM, step
from runner.load.checkpoint.base import TensorEntry
from runner.load.checkpoint.names import NameMap, Source
from runner.zoo.native_layer import UNDECIDED, NativeLayer, NativeStack
from runner.zoo.parts import (AttentionShape, Attention, ExpertsShape, GatedMLP, RMSNorm, Rope, RotaryEmbedding,
                              SparseMoE)


@dataclass(frozen=True)
class DecoderShape:
    """Everything a zoo family varies in. Per-layer tuples have one entry per layer."""

    vocab_size: int
    hidden: int
    intermediate: int                   # of the dense MLP
    layers: int
    attention: AttentionShape
    context: int                        # max_position_embeddings
    norm_eps: float
    tie_embeddings: bool
    windows: tuple[int | None, ...]     # each layer's sliding window (None: it sees the whole context)
    ropes: tuple[Rope, ...]             # each layer's rotary embedding
    activation: str = "silu"
    fused_gate_up: bool = False         # Phi-3
    norm_offset: float = 0.0            # Gemma: x * (1 + weight)
    sandwich_norms: bool = False        # Gemma 2/3: norms after attention and around the MLP too
    scale_embeddings: bool = False      # Gemma: embeddings times sqrt(hidden)
    final_softcap: float | None = None  # Gemma 2: logits pass through cap * tanh(logits / cap)
    experts: ExpertsShape | None = None
    sparse: tuple[bool, ...] = ()       # which layers hold experts rather than the dense MLP (with ``experts``)


class DecoderLayer(nn.Module):
    def __init__(self, shape: DecoderShape, index: int):
        super().__init__()
        s = shape
        self.sandwich = s.sandwich_norms
        self.input_layernorm = RMSNorm(s.hidden, s.norm_eps, s.norm_offset)
        self.self_attn = Attention(s.attention)
        self.post_attention_layernorm = RMSNorm(s.hidden, s.norm_eps, s.norm_offset)
        if s.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(s.hidden, s.norm_eps, s.norm_offset)
            self.post_feedforward_layernorm = RMSNorm(s.hidden, s.norm_eps, s.norm_offset)
        if s.experts is not None and s.sparse[index]:
            self.mlp: nn.Module = SparseMoE(s.hidden, s.experts)
        else:
            self.mlp = GatedMLP(s.hidden, s.intermediate, s.activation, s.fused_gate_up)
        self.native: NativeLayer | None | object = UNDECIDED

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        if self.native is UNDECIDED and not x.is_meta:  # decided once the weights are real
            self.native = NativeLayer.of(self)
        if isinstance(self.native, NativeLayer) and self.native.takes(x, rope, cache):
            return self.native.step(x, rope, mask, cache)  # a decode step in one C call (runner/native/decode.c)
        attended = self.self_attn(self.input_layernorm(x), rope, mask, cache)
        if not self.sandwich:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class DecoderModel(nn.Module):
    def __init__(self, shape: DecoderShape, ropes: list[Rope]):
        super().__init__()
        s = shape
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden)
        self.rotary_emb = RotaryEmbedding(s.attention.head_dim, ropes[0])
        self.local_rope = len(ropes) > 1
        if self.local_rope:  # Gemma 3: its sliding layers rotate with another base
            self.rotary_emb_local = RotaryEmbedding(s.attention.head_dim, ropes[1])
        self.layers = nn.ModuleList(DecoderLayer(s, i) for i in range(s.layers))
        self.norm = RMSNorm(s.hidden, s.norm_eps, s.norm_offset)

    def rotary_tables(self, x: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for this step's positions, from each rotary embedding, in the order ``Decoder`` indexes them."""
        tables = [self.rotary_emb(x, positions)]
        if self.local_rope:
            tables.append(self.rotary_emb_local(x, positions))
        return tables


# Names older exports use for the same tensors: Mixtral's experts were ``block_sparse_moe.experts.N.w1/w2/w3``.
_STORED_AS = ((re.compile(r"\.block_sparse_moe\."), ".mlp."), (re.compile(r"\.experts\.(\d+)\.w1\."), r".experts.\1.gate_proj."),
              (re.compile(r"\.experts\.(\d+)\.w2\."), r".experts.\1.down_proj."),
              (re.compile(r"\.experts\.(\d+)\.w3\."), r".experts.\1.up_proj."))


class Decoder(ZooCausalLM, nn.Module):
    """A zoo causal LM: token ids ``[B, T]`` in, logits ``[B, T, vocab]`` out (the contract is ``ZooCausalLM.forward``).

    It is built from a Hugging Face ``config.json``'s keys, as keyword arguments; each family subclass says how
    they read (``shape_of``), which ``model_type`` values it serves and which configs it leaves to transformers.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]  # residual blocks: never split across devices

    def __init__(self, **config: Any):
        super().__init__()
        shape = self.shape_of(config)
        check_shape(shape)
        self.shape = shape
        self.block_size = shape.context
        self.width = shape.hidden  # of the hidden states, which pipeline stages pass on
        self.vocab_size = shape.vocab_size
        ropes = list(dict.fromkeys(shape.ropes))
        self._rope_of = [ropes.index(r) for r in shape.ropes]
        self.model = DecoderModel(shape, ropes)
        self._stack: NativeStack | None = None
        self.lm_head = nn.Linear(shape.hidden, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def shape_of(cls, config: dict[str, Any]) -> DecoderShape:
        raise NotImplementedError

    @classmethod
    def arch_from_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from a Hugging Face ``config.json``: its keys, less what names no size."""
        return {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE and not k.startswith("_")}

    @classmethod
    def checkpoint_names(cls, stored: dict[str, TensorEntry]) -> NameMap:
        """Every stored tensor under the name this model gives it (older MoE exports renamed)."""
        sources = {}
        for key in stored:
            name = key
            for pattern, replacement in _STORED_AS:
                name = pattern.sub(replacement, name)
            sources[name] = Source(key)
        return NameMap(sources)


    def hidden_steps(self, idx: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor | None,
                     cache: KVCache | None, keep: int, hidden: torch.Tensor | None = None) -> Steps:
        """``hidden_states``, yielding after each block (of this pipeline stage's, when it is one)."""
        s = step(idx, attention_mask, positions, cache)
        layers = self.own_layers(len(self.model.layers))
        if self.embeds():
            x = self.model.embed_tokens(idx)
            if self.shape.scale_embeddings:  # the factor rounded to the compute dtype first, as Gemma does
                x = x * torch.tensor(math.sqrt(self.shape.hidden), dtype=x.dtype)
            yield
        else:
            x = self.stage_input(idx, hidden, self.model.layers[layers[0]])
        ropes = self.model.rotary_tables(x, s.positions)
        yield
        calls = [(ropes[self._rope_of[i]], s.mask_for(self.shape.windows[i]), s.layer_cache(cache, i)) for i in layers]
        stack = self._native_stack(layers)
        if stack is not None and stack.takes(x, [c[0] for c in calls], [c[2] for c in calls]):
            x = stack.step(x, *map(list, zip(*calls)))  # the decode step of every layer in one C call
            for _ in layers:
                yield
        else:
            for i, call in zip(layers, calls):
                x = self.model.layers[i](x, *call)
                yield
        return self.stage_output(x, keep, self.model.norm)

    def _native_stack(self, layers: list[int]) -> NativeStack | None:
        """The C form of ``layers``' decode steps together, when each has one and none is hooked (kept while the
        same layers qualify)."""
        natives = NativeStack.bare([self.model.layers[i] for i in layers])
        if natives is None:
            return None
        if self._stack is None or self._stack.layers != natives:
            self._stack = NativeStack(natives)
        return self._stack

    def shares_prefixes(self) -> bool:
        return all(w is None for w in self.shape.windows)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        cap = self.shape.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


_NOT_ARCHITECTURE = {"architectures", "transformers_version", "auto_map", "torch_dtype", "dtype", "use_cache",
                     "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "attention_dropout",
                     "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "embd_pdrop", "resid_pdrop",
                     "id2label", "label2id", "tokenizer_class", "task_specific_params"}


def check_shape(s: DecoderShape) -> None:
    """Sizes that can build a model, each named by its ``config.json`` key when it cannot.

    Raises:
        ValueError: a size that is not a positive integer, or heads that do not divide as attention needs.
    """
    a = s.attention
    sizes = dict(vocab_size=s.vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
                 num_hidden_layers=s.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                 head_dim=a.head_dim, max_position_embeddings=s.context)
    bad = [f"{k}={v}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: sizes must be positive integers")
    figures = dict(rms_norm_eps=s.norm_eps, rope_theta=min((r.theta for r in s.ropes), default=1.0),
                   **{"rope scaling factor": min((r.factor for r in s.ropes), default=1.0)},
                   partial_rotary_factor=min((r.rotary_share for r in s.ropes), default=1.0),
                   query_pre_attn_scalar=a.scale if a.scale is not None else 1.0,
                   attn_logit_softcapping=a.softcap if a.softcap is not None else 1.0,
                   final_logit_softcapping=s.final_softcap if s.final_softcap is not None else 1.0)
    bad = [f"{k}={v}" for k, v in figures.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf]
    if bad:
        raise ValueError(f"{', '.join(bad)}: expected positive numbers")
    if not all(w is None or (isinstance(w, int) and not isinstance(w, bool) and w > 0) for w in s.windows):
        raise ValueError(f"sliding_window {next(w for w in s.windows if w is not None)!r}: expected a positive "
                         "whole number of positions")
    if a.heads % a.kv_heads:
        raise ValueError(f"num_attention_heads {a.heads} must be a multiple of num_key_value_heads {a.kv_heads}")
    if len(s.windows) != s.layers or len(s.ropes) != s.layers:
        raise ValueError(f"layer_types lists {len(s.windows)} layers and num_hidden_layers is {s.layers}")
    e = s.experts
    if e is not None and not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                 for n in (e.experts, e.per_token, e.intermediate, e.shared_intermediate)):
        raise ValueError("num_experts, num_experts_per_tok and the experts' intermediate sizes must be whole numbers")
    if e is not None and (e.intermediate < 1 or len(s.sparse) != s.layers):
        raise ValueError(f"expert intermediate size {e.intermediate} must be positive and mlp_only_layers name layers")
    if s.experts is not None and not 0 < s.experts.per_token <= s.experts.experts:
        raise ValueError(f"num_experts_per_tok {s.experts.per_token} must be between 1 and the {s.experts.experts} "
                         "experts")
