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

from runner.checkpoint.base import Checkpoint, TensorEntry
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
        return self.entries["model.embed_tokens.weight"].dtype if self.entries else torch.float32

    @property
    def metadata_dir(self) -> Path | None:
        return None  # the file carries its own config and tokenizer

    def config(self) -> dict[str, Any]:
        """The architecture, in Hugging Face ``LlamaConfig`` names."""
        m = self.metadata
        return {
            "vocab_size": m.get("llama.vocab_size") or len(self._reader.fields["tokenizer.ggml.tokens"].data),
            "hidden_size": m["llama.embedding_length"],
            "intermediate_size": m["llama.feed_forward_length"],
            "num_hidden_layers": m["llama.block_count"],
            "num_attention_heads": m["llama.attention.head_count"],
            "num_key_value_heads": m.get("llama.attention.head_count_kv"),
            "rms_norm_eps": m.get("llama.attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": m.get("llama.rope.freq_base", 10000.0),
            "max_position_embeddings": m.get("llama.context_length", 2048),
            "tie_word_embeddings": "lm_head.weight" not in self.entries,
        }

    def read(self, name: str) -> torch.Tensor:
        from gguf import quants

        t = self._tensors[name]
        array = quants.dequantize(t.data, t.tensor_type)
        shape = self.entries[name].shape
        array = np.ascontiguousarray(array).reshape(shape)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # F32 data is the read-only map
        if tensor.dtype != self.entries[name].dtype:
            tensor = tensor.to(self.entries[name].dtype)
        if name.endswith("q_proj.weight"):
            tensor = _unpermute(tensor, self.metadata["llama.attention.head_count"])
        elif name.endswith("k_proj.weight"):
            kv = self.metadata.get("llama.attention.head_count_kv") or self.metadata["llama.attention.head_count"]
            tensor = _unpermute(tensor, kv)
        return tensor

    def tokenizer_fields(self) -> dict[str, Any]:
        """Vocabulary, merges, token types, special ids and chat template, for ``runner.tokenizer``."""
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
