"""GGUF files (llama.cpp's format): Llama-family weights, dequantized per tensor, under Hugging Face names.

The ``gguf`` package reads the file (memory-mapped) and dequantizes one tensor at a time.
llama.cpp stores Q and K rows permuted for its rotary layout; they are un-permuted on read.
The file also carries the architecture (read as a Hugging Face config) and the tokenizer.
"""
from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.load.checkpoint.base import Checkpoint, TensorEntry
from runner.errors import CheckpointError

log = logging.getLogger(__name__)

_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class GGUFCheckpoint(Checkpoint):
    """The tensors of a ``.gguf`` file under Hugging Face Llama names, dequantized when read."""

    def __init__(self, path: Path):
        reader = _reader(path)
        self.files = [path]
        self.source = "gguf"
        self.revision = None
        self.ignored: dict[str, str] = {}
        self.metadata = {name: _value(field) for name, field in reader.fields.items()
                         if not name.startswith("tokenizer.ggml.") or name.endswith("_id")}
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{path}: a GGUF of architecture {arch!r}; the runner reads Llama-family GGUF files")
        self._tensors = {}
        self.entries: dict[str, TensorEntry] = {}
        for t in reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                self.ignored[t.name] = "no counterpart in the Llama model"
                continue
            self._tensors[name] = t
            dtype = _FLOAT.get(t.tensor_type.name, torch.float32)  # quantized types dequantize to float32
            self.entries[name] = TensorEntry(path, dtype, tuple(int(n) for n in reversed(t.shape)))
        self._reader = reader

    @property
    def dtype(self) -> torch.dtype:
        embed = self.entries.get("model.embed_tokens.weight")  # absent from a file missing it: check_keys says so
        return embed.dtype if embed is not None else torch.float32

    @property
    def metadata_dir(self) -> Path | None:
        return None  # the file carries its own config and tokenizer

    def config(self) -> dict[str, Any]:
        """The architecture, in Hugging Face ``LlamaConfig`` names."""
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        return {
            "model_type": "llama",
            "vocab_size": self._count("llama.vocab_size", len(tokens.data) if tokens is not None else None),
            "hidden_size": self._count("llama.embedding_length"),
            "intermediate_size": self._count("llama.feed_forward_length"),
            "num_hidden_layers": self._count("llama.block_count"),
            "num_attention_heads": self._count("llama.attention.head_count"),
            "num_key_value_heads": self._count("llama.attention.head_count_kv", None, optional=True),
            "rms_norm_eps": self._number("llama.attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._number("llama.rope.freq_base", 10000.0),
            "max_position_embeddings": self._count("llama.context_length", 2048),
            "tie_word_embeddings": "lm_head.weight" not in self.entries,
        }

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

        t = self._tensors[name]
        shape = self.entries[name].shape
        try:
            array = np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type)).reshape(shape)
        except (ValueError, NotImplementedError) as e:  # a size or quantization the header got wrong
            raise CheckpointError(f"{self.files[0]}: tensor {t.name} cannot be decoded as {t.tensor_type.name} of "
                                  f"shape {list(shape)} ({e}); the file is damaged, re-download it") from e
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # F32 data is the read-only map
        if tensor.dtype != self.entries[name].dtype:
            tensor = tensor.to(self.entries[name].dtype)
        if name.endswith("q_proj.weight"):
            tensor = self._unpermute(tensor, t.name, "llama.attention.head_count")
        elif name.endswith("k_proj.weight"):
            key = "llama.attention.head_count_kv"
            tensor = self._unpermute(tensor, t.name, key if self.metadata.get(key) else "llama.attention.head_count")
        return tensor

    def _unpermute(self, w: torch.Tensor, stored: str, key: str) -> torch.Tensor:
        """``_unpermute`` by the head count in metadata ``key``, which must split the rows into pairs per head."""
        heads = self._count(key)
        if w.dim() != 2 or w.shape[0] % (2 * heads):
            raise CheckpointError(f"{self.files[0]}: tensor {stored} of shape {list(w.shape)} does not split into "
                                  f"{heads} heads ({key}) of row pairs; the metadata and tensors disagree, "
                                  "re-convert the file")
        return _unpermute(w, heads)

    def tokenizer_fields(self) -> dict[str, Any]:
        """Vocabulary, merges, token types, special ids and chat template, for ``runner.infer.tokenizer``."""
        f = self._reader.fields
        out = {name.removeprefix("tokenizer."): _value(field) for name, field in f.items()
               if name.startswith("tokenizer.")}
        return out


def open_gguf(path: Path | None) -> GGUFCheckpoint:
    if path is None or not path.is_file():
        raise CheckpointError(f"checkpoint.path: {path} is not a file; point it at a .gguf file")
    return GGUFCheckpoint(path)


@functools.lru_cache(maxsize=4)
def _reader(path: Path):
    """One memory-mapped reader per file and process: opening parses every key (~2 s for 100 MB)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError("checkpoint.source=gguf needs the gguf package: pip install gguf") from e
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from e


def _hf_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}"
    return None


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of Q/K rows: (heads, 2, half, in) <- (heads, half, 2, in)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


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
