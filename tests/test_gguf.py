"""GGUF checkpoints: a one-layer Llama written with ``gguf.GGUFWriter``, read back under Hugging Face names.

The file holds F32, F16 and Q8_0 tensors, Q and K permuted as llama.cpp's converter stores them, a tensor
with no Llama counterpart, and a GPT-2-style BPE tokenizer with a chat template.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from runner.load.checkpoint.gguf import open_gguf
from runner.errors import CheckpointError

HEADS, KV_HEADS, HIDDEN, FFN, LAYERS = 4, 2, 32, 64, 1
HEAD_DIM = HIDDEN // HEADS
TOKENS = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "Ġab"]
MERGES = ["a b", "Ġ a", "Ġa b"]
TOKEN_TYPES = [3, 3, 1, 1, 1, 1, 1, 1]  # 3: control (BOS, EOS), 1: normal
TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
# Hugging Face name -> (GGUF name, stored as)
STORED = {
    "model.embed_tokens.weight": ("token_embd.weight", "F32"),
    "model.layers.0.input_layernorm.weight": ("blk.0.attn_norm.weight", "F32"),
    "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", "Q8_0"),
    "model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", "F32"),
    "model.layers.0.self_attn.v_proj.weight": ("blk.0.attn_v.weight", "F16"),
    "model.layers.0.self_attn.o_proj.weight": ("blk.0.attn_output.weight", "F32"),
    "model.layers.0.post_attention_layernorm.weight": ("blk.0.ffn_norm.weight", "F32"),
    "model.layers.0.mlp.gate_proj.weight": ("blk.0.ffn_gate.weight", "F32"),
    "model.layers.0.mlp.up_proj.weight": ("blk.0.ffn_up.weight", "F32"),
    "model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", "F32"),
    "model.norm.weight": ("output_norm.weight", "F32"),
    "lm_head.weight": ("output.weight", "F32"),
}


def hf_tensors() -> dict[str, torch.Tensor]:
    """The model's tensors as Hugging Face's ``LlamaForCausalLM`` holds them (rows first)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (len(TOKENS), HIDDEN), "lm_head.weight": (len(TOKENS), HIDDEN),
              "model.norm.weight": (HIDDEN,), "model.layers.0.input_layernorm.weight": (HIDDEN,),
              "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
              "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
              "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
              "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN), "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
              "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's ``convert_hf_to_gguf.py`` does to Q and K rows (``LlamaModel.permute``), by hand."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(TEMPLATE)
    for name, (stored, kind) in STORED.items():
        w = tensors[name]
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, HEADS)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, KV_HEADS)
        array = w.numpy()
        if kind == "Q8_0":
            writer.add_tensor(stored, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(stored, array.astype(np.float16 if kind == "F16" else np.float32))
    writer.add_tensor("rope_freqs.weight", np.ones(HEAD_DIM // 2, dtype=np.float32))  # llama.cpp's own extra
    save(writer)


def save(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    tensors = hf_tensors()
    write_llama_gguf(path, tensors)
    return path, tensors


def test_tensors_come_back_under_hugging_face_names_and_shapes(written):
    path, tensors = written
    checkpoint = open_gguf(path)
    assert checkpoint.source == "gguf" and checkpoint.files == [path] and checkpoint.metadata_dir is None
    assert set(checkpoint.entries) == set(STORED)
    assert {name: e.shape for name, e in checkpoint.entries.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
    dtypes = {name: e.dtype for name, e in checkpoint.entries.items()}
    assert dtypes["model.layers.0.self_attn.v_proj.weight"] == torch.float16
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.float32  # Q8_0 dequantizes to float32
    assert checkpoint.dtype == torch.float32  # the embedding's
    assert checkpoint.ignored == {"rope_freqs.weight": "read into the config's rope_scaling"}  # all ones: none
    assert checkpoint.fingerprint() == {"source": "gguf", "revision": None,
                                        "files": [{"path": str(path), "bytes": path.stat().st_size}]}


def test_f32_and_f16_tensors_read_exactly_and_k_is_unpermuted(written):
    path, tensors = written
    checkpoint = open_gguf(path)
    for name, (_, kind) in STORED.items():
        if kind == "F32":  # K among them: stored permuted, read back exactly as Hugging Face holds it
            got = checkpoint.read(name)
            assert got.dtype == torch.float32 and torch.equal(got, tensors[name]), name
    v = checkpoint.read("model.layers.0.self_attn.v_proj.weight")
    assert v.dtype == torch.float16 and torch.equal(v, tensors["model.layers.0.self_attn.v_proj.weight"].half())
    k = tensors["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.equal(llama_cpp_permute(k, KV_HEADS), k)  # the permutation really moves rows


def test_q8_0_dequantizes_within_a_quantization_step_and_q_is_unpermuted(written):
    path, tensors = written
    want = tensors["model.layers.0.self_attn.q_proj.weight"]
    got = open_gguf(path).read("model.layers.0.self_attn.q_proj.weight")
    assert got.dtype == torch.float32 and got.shape == want.shape
    # Q8_0: blocks of 32 values along a row (rows are 32 long here), each with one scale, step = max|x| / 127, stored
    # in float16: an error of half a step, plus up to 127 x the scale's relative rounding (2**-11) of a step.
    step = want.abs().amax(dim=1, keepdim=True) / 127
    assert ((got - want).abs() <= step * (0.5 + 127 * 2**-11)).all()
    assert ((got - want).abs() > 0).any()  # really quantized
    assert (got - llama_cpp_permute(want, HEADS)).abs().max() > 10 * step.max()  # left permuted, it would not match


def test_config_is_the_llama_architecture_in_hugging_face_names(written):
    assert open_gguf(written[0]).config() == {
        "model_type": "llama", "vocab_size": len(TOKENS), "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": pytest.approx(1e-5),
        "rope_theta": 50000.0, "max_position_embeddings": 128, "tie_word_embeddings": False,
    }


def test_tokenizer_fields_carry_vocabulary_merges_types_ids_and_template(written):
    checkpoint = open_gguf(written[0])
    fields = checkpoint.tokenizer_fields()
    assert fields == {"ggml.model": "gpt2", "ggml.tokens": TOKENS, "ggml.merges": MERGES,
                      "ggml.token_type": TOKEN_TYPES, "ggml.bos_token_id": 0, "ggml.eos_token_id": 1,
                      "chat_template": TEMPLATE}
    # Metadata keeps the special ids but not the (possibly huge) vocabulary and merges.
    assert checkpoint.metadata["tokenizer.ggml.bos_token_id"] == 0
    assert "tokenizer.ggml.tokens" not in checkpoint.metadata


@pytest.mark.parametrize("make", [
    lambda path, good: path.write_bytes(b"PK\x03\x04 a zip file, not a GGUF one" * 8),
    lambda path, good: path.write_bytes(good.read_bytes()[:200]),  # the header and part of the metadata
    lambda path, good: path.write_bytes(good.read_bytes()[:-100]),  # an interrupted download: tensor data short
    lambda path, good: path.write_bytes(b""),
], ids=["not-gguf", "truncated-metadata", "truncated-data", "empty"])
def test_a_bad_file_is_a_checkpoint_error_that_names_it(written, tmp_path, make):
    path = tmp_path / "broken.gguf"
    make(path, written[0])
    with pytest.raises(CheckpointError) as e:
        open_gguf(path)
    assert str(path) in str(e.value) and "not a readable GGUF file" in str(e.value)


def test_a_missing_file_or_another_architecture_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file; point it at a .gguf file"):
        open_gguf(tmp_path / "absent.gguf")
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    save(writer)
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: a GGUF of architecture 'gpt2'; the runner reads GGUF architectures llama, qwen2, "):
        open_gguf(path)


def test_a_vocabulary_that_is_not_utf8_is_refused_only_when_used(tmp_path):
    path = tmp_path / "bytes.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(1)
    writer.add_feed_forward_length(16)
    writer.add_tokenizer_model("gpt2")
    writer.add_array("tokenizer.ggml.tokens", [b"a", b"\xff\xfe", b"c"])  # a token that is not UTF-8
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    save(writer)
    checkpoint = open_gguf(path)  # the weights and config read; a tokenizer.path would serve
    assert checkpoint.config()["vocab_size"] == 3
    with pytest.raises(CheckpointError, match=r"bytes\.gguf: tokenizer field tokenizer\.ggml\.tokens is not UTF-8 "
                                              r"text \(invalid start byte at byte 0\); set tokenizer\.path"):
        checkpoint.tokenizer_fields()
