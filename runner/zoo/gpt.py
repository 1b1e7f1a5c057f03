"""GPT-2 in the minGPT style, with GPT-2's module names (``transformer.h.N.attn.c_attn``).

``Block`` holds the residual connections, so the planner must never split one.
The head is tied to the token embedding, as in GPT-2: one tensor, stored once.

``GPT.checkpoint_names`` reads both GPT-2 checkpoint layouts: minGPT-style (this module's own
names, ``nn.Linear`` weights ``[out, in]``) and Hugging Face's (``Conv1D`` weights ``[in, out]``,
with or without the ``transformer.`` prefix, legacy mask buffers).
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from runner.load.checkpoint.files import TensorEntry
from runner.infer.column import Steps
from runner.infer.attention import attend
from runner.infer.kv_cache import KVCache, LayerCache, ZooCausalLM, step
from runner.load.checkpoint.names import NameMap, Source
from runner.errors import CheckpointError


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head = n_head
        self.kv_width = n_embd  # cached keys (and as many values) per token
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: LayerCache | None = None
                ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, cache, mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, layer_norm_epsilon: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: LayerCache | None = None
                ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(ZooCausalLM, nn.Module):
    """GPT-2 language model: token ids ``[B, T]`` in, next-token logits ``[B, T, vocab]`` out.

    ``forward`` follows the runner's causal-LM contract (``runner.infer.model.CausalLM``): an attention mask
    over cached and new tokens for left padding, per-row positions, a ``KVCache`` that the attention layers
    fill, and logits for the last ``logits_to_keep`` positions only (0: all).
    """


    def __init__(
        self,
        vocab_size: int = 50257,
        block_size: int = 1024,  # the longest context the position table covers
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        layer_norm_epsilon: float = 1e-5,
    ):
        super().__init__()
        sizes = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: sizes must be positive integers")
        self.block_size = block_size
        self.width = n_embd  # of the hidden states, which pipeline stages pass on
        self.vocab_size = vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList(Block(n_embd, n_head, layer_norm_epsilon) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd, eps=layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2

    def hidden_steps(self, idx: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor | None,
                     cache: KVCache | None, keep: int, hidden: torch.Tensor | None = None) -> Steps:
        """``hidden_states``, yielding after each block (of this pipeline stage's, when it is one)."""
        s = step(idx, attention_mask, positions, cache)
        if s.reach > self.block_size:
            raise ValueError(f"sequence of {s.reach} tokens is longer than block_size {self.block_size}")
        layers = self.own_layers(len(self.transformer.h))
        if self.embeds():
            tok = self.transformer.wte(idx)
            yield
            x = tok + self.transformer.wpe(s.positions).to(tok.device)  # the two tables may sit on different devices
            yield
        else:
            x = self.stage_input(idx, hidden, self.transformer.h[layers[0]])
        for i in layers:
            x = self.transformer.h[i](x, s.mask, s.layer_cache(cache, i))
            yield
        return self.stage_output(x, keep, self.transformer.ln_f)

    @classmethod
    def checkpoint_names(cls, stored: dict[str, TensorEntry]) -> NameMap:
        """This model's names on a GPT-2 checkpoint in either layout, decided once for the whole checkpoint.

        Every stored key is accounted for: mapped to the model name it holds (the four Conv1D weights of a
        Hugging Face checkpoint as transposed views), ignored with a reason (legacy mask buffers), or kept
        under its own name, so that the key check reports it as unexpected. A model tensor the checkpoint
        lacks gets no source, so the key check reports it as missing.

        Raises:
            CheckpointError: the checkpoint mixes ``[in, out]`` and ``[out, in]`` linear weights.
        """
        conv1d = _stored_as_conv1d(stored)
        sources: dict[str, Source] = {}
        ignored: dict[str, str] = {}
        # Prefixed keys first: if a checkpoint holds a tensor under both spellings, the bare one is unexpected.
        for key in sorted(stored, key=lambda k: not k.startswith(_PREFIX)):
            if _LEGACY_MASK.fullmatch(key):
                ignored[key] = "legacy attention mask buffer, rebuilt by the model"
                continue
            rest = key.removeprefix(_PREFIX)
            name = _PREFIX + rest if _TRANSFORMER_KEY.fullmatch(rest) else key
            if name in sources:
                name = key
            shape = stored[key].shape
            if conv1d and name.endswith(_CONV1D) and len(shape) == 2:
                sources[name] = Source(key, transposed=True)
            else:
                sources[name] = Source(key)
        return NameMap(sources, ignored)


_PREFIX = "transformer."
# The model's tensors under ``transformer.``, as both layouts name them (Hugging Face's GPT2Model drops the prefix).
_TRANSFORMER_KEY = re.compile(r"(?:wte|wpe)\.weight|ln_f\.(?:weight|bias)"
                              r"|h\.\d+\.(?:ln_[12]|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(?:weight|bias)")
# Causal-mask buffers older checkpoints carry (minGPT's and Hugging Face's ``attn.bias``, HF's ``attn.masked_bias``).
_LEGACY_MASK = re.compile(r"(?:transformer\.)?h\.\d+\.attn\.(?:bias|masked_bias)")
# The weights Hugging Face stores as Conv1D ``[in, out]``; ours are nn.Linear ``[out, in]``.
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Output width over input width of the two non-square ones, when no bias tells the output width.
_WIDENING = {".attn.c_attn.weight": 3, ".mlp.c_fc.weight": 4}


def _stored_as_conv1d(stored: dict[str, TensorEntry]) -> bool:
    """Whether the checkpoint's linear weights are ``[in, out]`` (Hugging Face Conv1D), for all four kinds at once.

    Each non-square weight votes: its bias gives its output width, else c_attn/c_fc widen by 3/4. A square one
    (``attn.c_proj``) cannot tell, so the decision is per checkpoint, never per tensor. With no vote (no such
    weight, or none of a telling shape) the checkpoint is read as stored, and the key check reports the shapes.
    """
    votes: dict[bool, str] = {}
    for key, entry in stored.items():
        suffix = next((s for s in _CONV1D if key.endswith(s)), None)
        if suffix is None or len(entry.shape) != 2:
            continue
        rows, cols = entry.shape
        bias = stored.get(key.removesuffix("weight") + "bias")
        if bias is not None and len(bias.shape) == 1:
            out = bias.shape[0]
            if rows == cols or out not in (rows, cols):
                continue
            votes.setdefault(cols == out, key)
        elif suffix in _WIDENING and rows != cols:
            if cols == _WIDENING[suffix] * rows:
                votes.setdefault(True, key)
            elif rows == _WIDENING[suffix] * cols:
                votes.setdefault(False, key)
    if len(votes) == 2:
        raise CheckpointError(f"{votes[True]} is stored [in, out] (Hugging Face Conv1D) but {votes[False]} is "
                              "[out, in] (nn.Linear); a GPT-2 checkpoint must use one layout throughout")
    return votes.get(True, False)
