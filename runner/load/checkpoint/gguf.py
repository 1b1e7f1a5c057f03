"""GGUF files (llama.cpp's format): the zoo's families' weights, dequantized per tensor, under Hugging Face names.

The ``gguf`` package reads the file (memory-mapped) and dequantizes one tensor at a time. What llama.cpp's
converter (``convert_hf_to_gguf.py``) changed is undone on read: Q and K rows permuted for its rotary layout (the
``llama`` architecture only), Gemma norms stored as ``1 + weight``, and each projection's experts stacked into one
``[experts, rows, columns]`` tensor (each expert is exposed on its own and dequantized from its own slice of the
bytes). The file also carries the architecture, read here as a Hugging Face config (``model_type`` included, as
llama.cpp reads the same keys), and the tokenizer.
"""
from __future__ import annotations

import functools
import logging
import math
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.load.checkpoint.base import Checkpoint, TensorEntry
from runner.errors import CheckpointError

log = logging.getLogger(__name__)

# A block's tensors, by the name after ``blk.N.``; families that name some otherwise say so in ``_Family.renames``.
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{g}.{p}": f"self_attn.{h}_proj.{p}" for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
       for p in ("weight", "bias")},
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    **{f"ffn_{p}.{s}": f"mlp.{p}_proj.{s}" for p in ("gate", "up", "down") for s in ("weight", "bias")},
    "ffn_gate_inp.weight": "mlp.gate.weight",  # the router
    **{f"ffn_{p}_shexp.weight": f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")},
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# Gemma's sandwich norms: llama.cpp's ffn_norm is the norm before the MLP, not the one after attention.
_GEMMA = {"post_attention_norm.weight": "post_attention_layernorm.weight",
          "ffn_norm.weight": "pre_feedforward_layernorm.weight",
          "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
_PHI3 = {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"}  # fused
_STACKED = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj", "ffn_down_exps.weight": "down_proj"}
_PER_EXPERT = re.compile(r"ffn_(gate|up|down)\.(\d+)\.weight")  # files converted before experts were stacked
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
# Rope factors llama.cpp's converter stores as tensors (Llama 3.1, Phi-3 long context): config() reads them.
_ROPE_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_EXPERTS = 1 << 12  # as model=auto allows


@dataclass(frozen=True)
class _Family:
    """How one GGUF architecture reads as a Hugging Face model."""

    name: str                                   # for messages
    model_type: str                             # the Hugging Face config's
    renames: dict[str, str] = field(default_factory=dict)  # block tensors named otherwise than in _LAYER
    permuted_qk: bool = False                   # llama: Q/K rows stored in llama.cpp's rotary order
    norms_plus_one: bool = False                # Gemma: norm weights stored as 1 + weight


_FAMILIES = {
    "llama": _Family("Llama", "llama", permuted_qk=True),  # Mistral too; Mixtral when it has experts
    "qwen2": _Family("Qwen2", "qwen2"),
    "qwen3": _Family("Qwen3", "qwen3"),
    "gemma2": _Family("Gemma 2", "gemma2", _GEMMA, norms_plus_one=True),
    "gemma3": _Family("Gemma 3", "gemma3_text", _GEMMA, norms_plus_one=True),
    "phi3": _Family("Phi-3", "phi3", _PHI3),
    "qwen2moe": _Family("Qwen2-MoE", "qwen2_moe"),
    "qwen3moe": _Family("Qwen3-MoE", "qwen3_moe"),
}
_MIXTRAL = _Family("Mixtral", "mixtral", permuted_qk=True)


@dataclass(frozen=True)
class _Stored:
    """Where a Hugging Face tensor's bytes are: a file tensor, or one expert's slice of a stacked one."""

    tensor: Any               # gguf's ReaderTensor
    expert: int | None = None


class GGUFCheckpoint(Checkpoint):
    """The tensors of a ``.gguf`` file under Hugging Face names, dequantized when read."""

    def __init__(self, path: Path):
        reader = _reader(path)
        self.files = [path]
        self.source = "gguf"
        self.revision = None
        self.ignored: dict[str, str] = {}
        self.metadata = {name: value for name, value in reader.values.items()
                         if not name.startswith("tokenizer.ggml.") or name.endswith("_id")}
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in _FAMILIES:
            raise CheckpointError(f"{path}: a GGUF of architecture {str(self.arch)[:40]!r}; the runner reads GGUF "
                                  f"architectures {', '.join(_FAMILIES)}; for another, use the model's safetensors "
                                  "(checkpoint=local or checkpoint=hub)")
        experts = self.metadata.get("llama.expert_count")
        mixtral = self.arch == "llama" and isinstance(experts, int) and not isinstance(experts, bool) and experts > 0
        self.family = _MIXTRAL if mixtral else _FAMILIES[self.arch]
        self._tensors = {t.name: t for t in reader.tensors}
        self._stored: dict[str, _Stored] = {}
        self.entries: dict[str, TensorEntry] = {}
        for t in reader.tensors:
            dtype = _FLOAT.get(t.tensor_type.name, torch.float32)  # quantized types dequantize to float32
            shape = tuple(int(n) for n in reversed(t.shape))
            names = self._hf_names(t, shape)
            if t.name in _ROPE_TENSORS:
                self.ignored[t.name] = "read into the config's rope_scaling"
            elif not names:
                self.ignored[t.name] = f"no counterpart in the {self.family.name} model"
            if names:
                _check_computable(t, path)
            for name, expert in names:
                self._stored[name] = _Stored(t, expert)
                own = shape if expert is None else shape[1:]
                if name.endswith("shared_expert_gate.weight") and len(own) == 1:
                    own = (1, *own)  # older converters squeezed its [1, hidden]
                self.entries[name] = TensorEntry(path, dtype, own)
        self._reader = reader

    def _hf_names(self, t, shape: tuple[int, ...]) -> list[tuple[str, int | None]]:
        """The Hugging Face names a file tensor stands for (one per expert for a stacked one); [] for none."""
        if t.name in _TOP:
            return [(_TOP[t.name], None)]
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if match is None:
            return []
        layer, part = f"model.layers.{int(match.group(1))}.", match.group(2)
        if part in _STACKED:
            if len(shape) != 3 or not 0 < shape[0] <= _MAX_EXPERTS:
                raise CheckpointError(f"{self.files[0]}: tensor {t.name} has shape {list(shape)}; expected "
                                      f"[experts, rows, columns] with 1 to {_MAX_EXPERTS} experts; the file is "
                                      "damaged, re-convert or re-download it")
            return [(f"{layer}mlp.experts.{e}.{_STACKED[part]}.weight", e) for e in range(shape[0])]
        per_expert = _PER_EXPERT.fullmatch(part)
        if per_expert:
            return [(f"{layer}mlp.experts.{int(per_expert.group(2))}.{per_expert.group(1)}_proj.weight", None)]
        name = self.family.renames.get(part, _LAYER.get(part))
        return [(layer + name, None)] if name else []

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def dtype(self) -> torch.dtype:
        embed = self.entries.get("model.embed_tokens.weight")  # absent from a file missing it: check_keys says so
        return embed.dtype if embed is not None else torch.float32

    @property
    def metadata_dir(self) -> Path | None:
        return None  # the file carries its own config and tokenizer

    def config(self) -> dict[str, Any]:
        """The architecture in Hugging Face config names, ``model_type`` included, from the keys llama.cpp reads.

        Keys the file does not set are left out where the family's own default is the same, or take llama.cpp's
        default. What llama.cpp hard-codes per family (which layers slide, how experts are weighed) is written out.

        Raises:
            CheckpointError: a key the family needs is missing or not a positive number.
        """
        a = self.arch
        hidden, heads = self._count(f"{a}.embedding_length"), self._count(f"{a}.attention.head_count")
        layers = self._count(f"{a}.block_count")
        tokens = self._reader.values.get("tokenizer.ggml.tokens")
        embed = self.entries.get("model.embed_tokens.weight")
        vocab = len(tokens) if isinstance(tokens, list) else embed.shape[0] if embed is not None and embed.shape else None
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "vocab_size": self._count(f"{a}.vocab_size", vocab),
            "hidden_size": hidden,
            "intermediate_size": self._count(f"{a}.feed_forward_length", self._expert_rows("gate_proj")),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self._count(f"{a}.attention.head_count_kv", None, optional=True),
            "rms_norm_eps": self._number(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._number(f"{a}.rope.freq_base", 10000.0),
            "max_position_embeddings": self._count(f"{a}.context_length", 2048),
            "tie_word_embeddings": "lm_head.weight" not in self.entries,
        }
        head_dim = self._count(f"{a}.attention.key_length", None, optional=True)
        if head_dim is not None:
            config["head_dim"] = head_dim
        head_dim = head_dim or hidden // heads
        rotated = self._count(f"{a}.rope.dimension_count", None, optional=True)
        if rotated is not None and rotated < head_dim:  # Phi-3.5/Phi-4-mini rotate part of each head
            config["partial_rotary_factor"] = rotated / head_dim
        scaling = self._rope_scaling()
        if scaling is not None:
            config["rope_scaling"] = scaling
        if "model.layers.0.self_attn.q_proj.bias" in self.entries and a == "llama":
            config["attention_bias"] = True
        if "model.layers.0.mlp.gate_proj.bias" in self.entries and a == "llama":
            config["mlp_bias"] = True
        if self.family.norms_plus_one:
            config.update(self._gemma(hidden, heads, head_dim, layers))
        elif a == "phi3":
            config["sliding_window"] = self._window()
        if self.model_type == "mixtral":
            config.update(num_local_experts=self._count("llama.expert_count"),
                          num_experts_per_tok=self._count("llama.expert_used_count"))
        elif a in ("qwen2moe", "qwen3moe"):
            config.update(self._qwen_experts(layers))
        return config

    def _gemma(self, hidden: int, heads: int, head_dim: int, layers: int) -> dict[str, Any]:
        """Gemma 2 and 3: what llama.cpp reads or fixes for them (GeGLU, query scale, which layers slide)."""
        a, gemma2 = self.arch, self.arch == "gemma2"
        big = layers == (46 if gemma2 else 62)  # the 27B models: llama.cpp scales queries by hidden / heads there
        window = self._window(4096 if gemma2 else None)
        pattern = self.metadata.get(f"{a}.attention.sliding_window_pattern", 2 if gemma2 else 6)
        if isinstance(pattern, list) and len(pattern) == layers:  # each layer's flag
            sliding = [bool(p) for p in pattern]
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:  # the last of each n is full
            sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
        else:
            raise CheckpointError(f"{self.files[0]}: GGUF metadata {a}.attention.sliding_window_pattern is "
                                  f"{str(pattern)[:40]!r}; expected a whole number or one flag per layer ({layers}); "
                                  "re-convert or re-download the file")
        out = {"hidden_activation": "gelu_pytorch_tanh", "head_dim": head_dim,
               "query_pre_attn_scalar": hidden // heads if big else head_dim, "sliding_window": window,
               "layer_types": ["sliding_attention" if s and window else "full_attention" for s in sliding]}
        if gemma2:
            out["attn_logit_softcapping"] = self._number(f"{a}.attn_logit_softcapping", 50.0)
            out["final_logit_softcapping"] = self._number(f"{a}.final_logit_softcapping", 30.0)
        else:
            out["rope_local_base_freq"] = self._number(f"{a}.rope.freq_base_swa", 10000.0)
            if f"{a}.final_logit_softcapping" in self.metadata:
                out["final_logit_softcapping"] = self._number(f"{a}.final_logit_softcapping", 0.0)
        return out

    def _qwen_experts(self, layers: int) -> dict[str, Any]:
        """Qwen-MoE: experts in every layer holding a router; llama.cpp renormalises the top-k weights for Qwen3
        only (unless the file says otherwise)."""
        a = self.arch
        out = {"num_experts": self._count(f"{a}.expert_count"),
               "num_experts_per_tok": self._count(f"{a}.expert_used_count"),
               "moe_intermediate_size": self._count(f"{a}.expert_feed_forward_length", self._expert_rows("gate_proj")),
               "norm_topk_prob": bool(self.metadata.get(f"{a}.expert_weights_norm", a == "qwen3moe")),
               "decoder_sparse_step": 1,
               "mlp_only_layers": [i for i in range(layers)
                                   if f"model.layers.{i}.mlp.gate.weight" not in self.entries]}
        if a == "qwen2moe":
            shared = self.entries.get("model.layers.0.mlp.shared_expert.gate_proj.weight")
            out["shared_expert_intermediate_size"] = self._count(f"{a}.expert_shared_feed_forward_length",
                                                                 shared.shape[0] if shared is not None else None)
        return out

    def _rope_scaling(self) -> dict[str, Any] | None:
        """``rope_scaling`` from ``rope.scaling.*`` (llama.cpp's scaling type defaults to linear, used with a factor),
        Llama 3's from its ``rope_freqs`` tensor, Phi-3's long-context one from its ``rope_factors_*`` tensors."""
        a = self.arch
        if "rope_freqs.weight" in self._tensors:
            return self._llama3_scaling()
        if "rope_factors_long.weight" in self._tensors:
            return {"rope_type": "longrope", "long_factor": self._floats("rope_factors_long.weight"),
                    "short_factor": self._floats("rope_factors_short.weight"),
                    "original_max_position_embeddings": self._count(f"{a}.rope.scaling.original_context_length")}
        kind = self.metadata.get(f"{a}.rope.scaling.type", "linear")
        factor_key = next((k for k in (f"{a}.rope.scaling.factor", f"{a}.rope.scale_linear") if k in self.metadata),
                          None)  # the second, the older name
        factor = self._number(factor_key, 1.0) if factor_key is not None else None
        if kind == "none" or factor is None or (kind == "linear" and factor == 1.0):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
                    self._count(f"{a}.rope.scaling.original_context_length")}
        raise CheckpointError(f"{self.files[0]}: GGUF metadata {a}.rope.scaling.type is {str(kind)[:40]!r}; the "
                              "runner reads none, linear or yarn; use the model's safetensors (checkpoint=local or "
                              "checkpoint=hub)")

    def _llama3_scaling(self) -> dict[str, Any] | None:
        """Llama 3.1's rope scaling, recovered from the per-frequency divisors llama.cpp's converter stores.

        Long wavelengths are divided by ``factor``, short ones kept; between them the divisor is
        ``1 / ((1 - s) / factor + s)`` with ``s`` linear in the frequency, so a straight-line fit of ``s`` gives the
        band's edges, stated against an original context of 8192 (only their ratio to it matters).
        """
        divisors = np.asarray(self._floats("rope_freqs.weight"), dtype=np.float64)
        factor = float(divisors.max())
        if factor <= 1.0:
            return None
        dims, original = 2 * len(divisors), 8192
        inv_freq = self._number(f"{self.arch}.rope.freq_base", 10000.0) ** (-np.arange(0, dims, 2) / dims)
        band = (divisors > 1.0 + 1e-6) & (divisors < factor * (1 - 1e-6))
        fitted = None
        if band.sum() >= 2:
            s = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
            slope, intercept = np.polyfit(inv_freq[band] * original / (2 * math.pi), s, 1)
            low, high = -intercept / slope, (1 - intercept) / slope
            smooth = np.clip((original * inv_freq / (2 * math.pi) - low) / (high - low), 0.0, 1.0)
            if np.allclose(1 / ((1 - smooth) / factor + smooth), divisors, rtol=1e-4):
                fitted = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                          "high_freq_factor": float(high), "original_max_position_embeddings": original}
        if fitted is None:
            raise CheckpointError(f"{self.files[0]}: tensor rope_freqs.weight holds rope divisors that are not Llama "
                                  "3.1's scaling; the runner cannot reproduce them: use the model's safetensors "
                                  "(checkpoint=local or checkpoint=hub)")
        return fitted

    def _window(self, default: int | None = None) -> int | None:
        """The sliding window; None where it is 0 or absent (with no default): every layer sees the whole context."""
        key = f"{self.arch}.attention.sliding_window"
        if self.metadata.get(key, default) in (0, None):
            return None
        return self._count(key, default)

    def _expert_rows(self, projection: str) -> int | None:
        """An expert's rows of ``projection`` (its intermediate size), from the first layer with experts."""
        entry = next((e for n, e in self.entries.items() if n.endswith(f".experts.0.{projection}.weight")), None)
        return entry.shape[0] if entry is not None and entry.shape else None

    def _floats(self, stored: str) -> list[float]:
        """A small tensor the config is read from (rope factors), as numbers."""
        from gguf import quants

        t = self._tensors.get(stored)
        if t is None:
            raise CheckpointError(f"{self.files[0]}: tensor {stored} is missing; the file's rope tensors come in "
                                  "pairs; re-convert or re-download the file")
        values = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all() or (values <= 0).any():
            raise CheckpointError(f"{self.files[0]}: tensor {stored} holds values that are not positive numbers; "
                                  "the file is damaged, re-download it")
        return values.tolist()

    def _count(self, key: str, default: int | None = None, optional: bool = False) -> int | None:
        """A positive whole-number metadata value (a dimension, a count); ``default`` where it is absent.

        Raises:
            CheckpointError: it is absent with no default (and not ``optional``), or not a positive integer.
        """
        value = self.metadata.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            found = "missing" if value is None else f"{str(value)[:40]!r}"
            raise CheckpointError(f"{self.files[0]}: GGUF metadata {key} is {found}; expected a positive integer, "
                                  "as llama.cpp's converter writes it; re-convert or re-download the file")
        return value

    def _number(self, key: str, default: float) -> float:
        """A positive finite metadata figure (an epsilon, a base); ``default`` where it is absent."""
        value = self.metadata.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise CheckpointError(f"{self.files[0]}: GGUF metadata {key} is {str(value)[:40]!r}; expected a positive "
                                  "number, as llama.cpp's converter writes it; re-convert or re-download the file")
        return float(value)

    def read(self, name: str) -> torch.Tensor:
        from gguf import quants

        stored = self._stored[name]
        t, shape, dtype = stored.tensor, self.entries[name].shape, self.entries[name].dtype
        data = t.data if stored.expert is None else t.data[stored.expert]  # one expert: only its own bytes
        try:
            array = np.ascontiguousarray(quants.dequantize(data, t.tensor_type)).reshape(shape)
        except (ValueError, NotImplementedError, IndexError) as e:  # a size or quantization the header got wrong
            raise CheckpointError(f"{self.files[0]}: tensor {t.name} cannot be decoded as {t.tensor_type.name} of "
                                  f"shape {list(shape)} ({e}); the file is damaged, re-download it") from e
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # F32 data is the read-only map
        self._release(t)
        if self.family.norms_plus_one and name.endswith("norm.weight"):
            tensor = tensor.float() - 1  # the zoo's Gemma norms hold the offset from one
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return self._in_order(tensor, name, t.name)

    def stored_type(self, name: str) -> str | None:
        kind = self._stored[name].tensor.tensor_type.name
        return None if kind in _FLOAT else kind

    def read_blocks(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a quantized tensor's blocks, ``[rows, bytes per row]``, with llama's Q and K rows
        put back in order; only those rows' bytes are copied out of the map."""
        stored = self._stored[name]
        t = stored.tensor
        data = t.data if stored.expert is None else t.data[stored.expert]
        rows = self.entries[name].shape[0]
        if data.ndim != 2 or data.shape[0] != rows:
            raise CheckpointError(f"{self.files[0]}: tensor {t.name} holds {list(data.shape)} bytes of "
                                  f"{t.tensor_type.name} blocks; expected {rows} rows; the file is damaged, "
                                  "re-download it")
        if self._heads_of(name):  # its rows move: all of them are read to put them back in order
            blocks = self._in_order(torch.from_numpy(np.array(data)), name, t.name)[start:stop]
        else:
            blocks = torch.from_numpy(np.array(data[start:stop]))
        if stop is None or stop >= rows:
            self._release(t)
        return blocks

    def _release(self, t) -> None:
        """Drop the file's pages of tensor ``t`` from this process once its bytes are copied: mapped pages count in
        RSS, and a model read whole through the map would otherwise hold the file beside its own copy."""
        region = getattr(self._reader.mapped, "_mmap", None)
        if region is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        try:
            region.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
        except (OSError, ValueError):  # an advice is only that
            pass

    def _heads_of(self, name: str) -> str | None:
        """The metadata key with the head count that tensor ``name``'s rows are permuted by: Q and K of the
        ``llama`` architecture (llama.cpp permutes them); None for any other tensor."""
        heads = f"{self.arch}.attention.head_count"
        if not self.family.permuted_qk:
            return None
        if ".self_attn.q_proj." in name:
            return heads
        if ".self_attn.k_proj." in name:
            return heads + "_kv" if self.metadata.get(heads + "_kv") else heads
        return None

    def _in_order(self, tensor: torch.Tensor, name: str, stored: str) -> torch.Tensor:
        """Q and K rows of the ``llama`` architecture back in the model's order."""
        heads = self._heads_of(name)
        return tensor if heads is None else self._unpermute(tensor, stored, heads)

    def _unpermute(self, w: torch.Tensor, stored: str, key: str) -> torch.Tensor:
        """``_unpermute`` by the head count in metadata ``key``, which must split the rows into pairs per head."""
        heads = self._count(key)
        if w.dim() not in (1, 2) or w.shape[0] % (2 * heads):
            raise CheckpointError(f"{self.files[0]}: tensor {stored} of shape {list(w.shape)} does not split into "
                                  f"{heads} heads ({key}) of row pairs; the metadata and tensors disagree, "
                                  "re-convert the file")
        return _unpermute(w, heads)

    def tokenizer_fields(self) -> dict[str, Any] | None:
        """Vocabulary, merges, token types, special ids and chat template, for ``runner.infer.tokenizer``; None
        for a file with no vocabulary."""
        values = self._reader.values
        if "tokenizer.ggml.tokens" not in values:
            return None
        bad = next((v for v in values.values() if isinstance(v, _NotText)), None)
        if bad is not None:
            raise CheckpointError(f"{self.files[0]}: tokenizer field {bad.name} is not UTF-8 text ({bad.error.reason} "
                                  f"at byte {bad.error.start}); set tokenizer.path to the model's tokenizer.json")
        return {name.removeprefix("tokenizer."): value for name, value in values.items() if name.startswith("tokenizer.")}


def _check_computable(t, path: Path) -> None:
    """A tensor the runner can hold: a float type, or a quantized one it keeps or can dequantize.

    Raises:
        CheckpointError: a type nothing here reads (Q8_K, Q1_0, ...), naming the tensor and the types that work.
    """
    from gguf import quants

    kind = t.tensor_type
    if kind.name in _FLOAT or kind in quants._type_traits:  # gguf's table of the types it can dequantize
        return
    raise CheckpointError(f"{path}: tensor {t.name} is stored as GGUF type {kind.name}, which the runner cannot "
                          "compute (it keeps Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and Q8_0 quantized and dequantizes the "
                          "other types llama.cpp writes for models); re-quantize the file with llama.cpp's "
                          "llama-quantize (e.g. Q4_K_M or Q8_0)")


def open_gguf(path: Path | None) -> GGUFCheckpoint:
    if path is None or not path.is_file():
        raise CheckpointError(f"checkpoint.path: {path} is not a file; point it at a .gguf file")
    return GGUFCheckpoint(path)


@functools.lru_cache(maxsize=4)
def _reader(path: Path):
    """One memory-mapped reader per file and process."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError("checkpoint.source=gguf needs the gguf package: pip install gguf") from e

    class Reader(GGUFReader):
        """gguf's reader over a plain array view of its map: parsing slices the map once per key and per
        vocabulary word, and numpy's memmap subclass costs more per slice than the parse itself (SmolLM2's
        49k-word vocabulary: 3.1 s through the memmap, 1.4 s through the view). ``values``: its metadata fields
        as plain Python values (the fields themselves are dropped once read)."""

        values: dict[str, Any]

        @property
        def data(self):
            return self._view

        @data.setter
        def data(self, value):
            self.mapped = value  # the memmap itself: pages are released through it (``_release``)
            self._view = value.view(np.ndarray)

    try:
        reader = Reader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from e
    # gguf holds every field as numpy arrays, one per vocabulary word and merge (~70 MB for SmolLM2's 49k words);
    # the plain values take a tenth of that, and nothing reads the arrays again
    reader.values = {}
    for name, entry in reader.fields.items():
        try:
            reader.values[name] = _value(entry)
        except UnicodeDecodeError as e:
            if not name.startswith("tokenizer."):
                raise CheckpointError(f"{path}: metadata field {name} is not UTF-8 text ({e.reason} at byte "
                                      f"{e.start}); re-convert the file") from e
            reader.values[name] = _NotText(name, e)  # refused only if the vocabulary is used (tokenizer_fields)
    reader.fields.clear()
    return reader


@dataclass(frozen=True)
class _NotText:
    """A tokenizer field whose strings are not UTF-8: the file's vocabulary cannot be used."""

    name: str
    error: UnicodeDecodeError


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of Q/K rows (weights or biases): (heads, 2, half) <- (heads, half, 2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _value(field) -> Any:
    """A GGUF metadata field as a plain Python value."""
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 -- older gguf releases lack contents(); fall back to the raw parts
        parts = [field.parts[i] for i in field.data]
        if len(parts) == 1:
            value = parts[0]
            return bytes(value).decode("utf-8") if value.dtype == np.uint8 else value.tolist()[0]
        return [bytes(p).decode("utf-8") if p.dtype == np.uint8 else p.tolist()[0] for p in parts]
