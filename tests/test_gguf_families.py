"""The zoo's families from GGUF files: tiny transformers checkpoints converted as llama.cpp's converter lays them out,
run with no ``model=`` (the architecture from the GGUF's metadata), against the same checkpoint's safetensors.

The conversion below is this test's own: tensor names come from the gguf package's ``TensorNameMap`` (the table
``convert_hf_to_gguf.py`` uses), metadata keys from its ``GGUFWriter``; the converter's changes are made by hand
(Q/K rows permuted for the llama architecture, Gemma norms stored as ``1 + weight``, each projection's experts
stacked into one ``[experts, rows, columns]`` tensor, Llama 3.1's rope scaling as a ``rope_freqs`` tensor).
Logits match the safetensors run within 1e-5 on a left-padded batch. Then the Q8_0 experts, read one expert at a
time, the bad inputs, and the Llama 3 and Qwen2 tokenizer splits against Hugging Face ``tokenizer.json`` files.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import compose_config
from runner.errors import CheckpointError
from runner.infer.engine import Engine
from runner.infer.tokenizer import BPETokenizer, tokenizer_for
from runner.load.checkpoint import gguf as gguf_reader
from runner.load.checkpoint.gguf import open_gguf
from test_families import FAMILIES, PROMPTS, left_padded, write_checkpoint
from test_fuzz import write_gguf as write_metadata_gguf
from test_gguf import save

safetensors_torch = pytest.importorskip("safetensors.torch")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

# Llama 3.1's scaling, on a scale a 16-wide head feels: two of its eight frequencies fall in the blended band.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 16.0, "original_max_position_embeddings": 512}
# model_type -> its settings for this test: test_families' where a GGUF can say them. What llama.cpp's files cannot:
# Qwen2's sliding window and Mixtral's (llama.cpp runs neither), a Gemma 2 query scale other than 1/sqrt(head_dim),
# dense layers in Qwen3-MoE (its converter has no names for them).
SETTINGS = {
    "llama": {**FAMILIES["llama"], "rope_parameters": LLAMA3_ROPE},
    "qwen2": {},
    "qwen3": FAMILIES["qwen3"],
    "gemma2": {**FAMILIES["gemma2"], "query_pre_attn_scalar": 16},
    "gemma3_text": FAMILIES["gemma3_text"],
    "phi3": FAMILIES["phi3"],
    "mixtral": {**FAMILIES["mixtral"], "sliding_window": None},
    "qwen3_moe": {**FAMILIES["qwen3_moe"], "mlp_only_layers": []},
    "qwen2_moe": FAMILIES["qwen2_moe"],
}
ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mixtral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
        "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
        "phi3": gguf.MODEL_ARCH.PHI3, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE}


# --------------------------------------------------------------------------- a converter, as llama.cpp's lays it out

def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary order of Q/K rows (weights and biases): each head's two halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_divisors(rope: dict, head_dim: int) -> np.ndarray:
    """What the converter stores as ``rope_freqs``: each frequency's divisor under Llama 3.1's scaling."""
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def converted_tensors(model_type: str, config: dict, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under GGUF names, changed as the converter changes them."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    names = gguf.get_tensor_name_map(ARCH[model_type], config["num_hidden_layers"])
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for name, w in hf.items():
        if model_type.startswith("gemma") and name == "lm_head.weight":
            continue  # tied: the converter skips it
        if ARCH[model_type] == gguf.MODEL_ARCH.LLAMA and re.search(r"\.(q|k)_proj\.", name):
            w = permute(w, heads if ".q_proj." in name else kv_heads)
        if model_type.startswith("gemma") and name.endswith("norm.weight"):
            w = w + 1
        expert = re.fullmatch(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight", name)
        if expert:  # stacked per layer and projection, under the name the converter gives the stack
            layer, index, projection = int(expert.group(1)), int(expert.group(2)), expert.group(3)
            stack = (f"layers.{layer}.feed_forward.experts.{projection}.weight" if model_type == "mixtral"
                     else f"model.layers.{layer}.mlp.experts.{projection}.weight")
            stacks.setdefault(stack, {})[index] = w
            continue
        if model_type == "mixtral":
            name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = w
    for stack, experts in stacks.items():
        out[names.get_name(stack, try_suffixes=(".weight",))] = torch.stack([experts[e] for e in sorted(experts)])
    assert None not in out, "a tensor the gguf package has no name for"
    return out


def write_gguf(path: Path, folder: Path, model_type: str, quantized: tuple[str, ...] = ()) -> None:
    """The checkpoint in ``folder`` as a GGUF: F32 tensors (Q8_0 for names ending in ``quantized``), the metadata
    the converter writes for its architecture, no tokenizer."""
    config = json.loads((folder / "config.json").read_text())
    arch = ARCH[model_type]
    rope = config.get("rope_parameters") or {}
    full, sliding = rope.get("full_attention", rope), rope.get("sliding_attention", {})
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    if model_type != "gemma2":  # its converter writes no rope base: llama.cpp's default, 10000, is Gemma 2's
        w.add_rope_freq_base(full.get("rope_theta", 10000.0))
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    if "rope_theta" in sliding:
        w.add_rope_freq_base_swa(sliding["rope_theta"])
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("moe_intermediate_size") and model_type != "mixtral":
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(config["head_dim"])
    if model_type == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    if model_type in ("gemma2", "gemma3_text", "phi3"):
        w.add_sliding_window(config.get("sliding_window") or 0)
    if model_type == "gemma3_text":  # each layer's flag, as the newer Gemma converters write it
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
    if model_type == "phi3":
        w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * config["hidden_size"])
                                   // config["num_attention_heads"])
        w.add_rope_scaling_orig_ctx_len(config["max_position_embeddings"])
    if full.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_divisors(full, config["head_dim"]))
    hf = safetensors_torch.load_file(str(folder / "model.safetensors"))
    for name, tensor in converted_tensors(model_type, config, hf).items():
        array = tensor.float().numpy()
        if name.endswith(quantized):
            w.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, array)
    save(w)


def convert(factory, model_type: str, quantized: tuple[str, ...] = ()) -> tuple[str, Path, Path]:
    """A tiny checkpoint of ``model_type`` written by transformers, and its GGUF."""
    folder = factory.mktemp(model_type)
    write_checkpoint(folder, model_type, SETTINGS[model_type])
    tensors = safetensors_torch.load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.endswith(".bias")]:  # transformers starts biases at zero: give them values
        tensors[name] = torch.randn(tensors[name].shape, generator=g) * 0.5
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    path = folder.parent / f"{folder.name}.gguf"
    write_gguf(path, folder, model_type, quantized)
    return model_type, folder, path


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def converted(request, tmp_path_factory) -> tuple[str, Path, Path]:
    return convert(tmp_path_factory, request.param)


def logits(run_dir: Path, *overrides: str) -> tuple[Engine, torch.Tensor]:
    engine = Engine(compose_config(*overrides, "hardware=cpu", "dtype=float32"), run_dir)
    rows, mask = left_padded(PROMPTS)
    with torch.inference_mode():
        return engine, engine.loaded.model(rows, attention_mask=mask)


# --------------------------------------------------------------------------- the families

def test_gguf_logits_match_the_safetensors_run(converted, tmp_path):
    model_type, folder, path = converted
    gguf_engine, ours = logits(tmp_path / "gguf", "checkpoint=gguf", f"checkpoint.path={path}",
                               f"tokenizer.path={folder}")
    assert gguf_engine.config.model.path == "zoo" and model_type in type(gguf_engine.loaded.model).model_types
    _, theirs = logits(tmp_path / "local", "checkpoint=local", f"checkpoint.path={folder}")
    real = left_padded(PROMPTS)[1].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_config_says_what_the_checkpoint_config_says(converted):
    model_type, folder, path = converted
    config = open_gguf(path).config()
    theirs = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == model_type
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "tie_word_embeddings", "num_experts_per_tok", "num_local_experts", "num_experts",
                "moe_intermediate_size", "shared_expert_intermediate_size", "sliding_window", "layer_types",
                "mlp_only_layers", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
        if key in theirs and (key != "layer_types" or theirs.get("sliding_window")):
            assert config.get(key, theirs.get(key)) == theirs[key], key


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path_factory, tmp_path):
    _, folder, path = convert(tmp_path_factory, "llama")
    scaling = open_gguf(path).config()["rope_scaling"]
    original = scaling["original_max_position_embeddings"]  # stated against 8192: the band's edges in proportion
    assert scaling["factor"] == pytest.approx(8.0)
    assert scaling["low_freq_factor"] / original == pytest.approx(1.0 / 512, rel=1e-5)
    assert scaling["high_freq_factor"] / original == pytest.approx(16.0 / 512, rel=1e-5)
    ours = Engine(compose_config("checkpoint=gguf", f"checkpoint.path={path}", f"tokenizer.path={folder}",
                                 "hardware=cpu"), tmp_path / "run").loaded.model.model.rotary_emb.inv_freq
    theirs = Engine(compose_config("checkpoint=local", f"checkpoint.path={folder}", "hardware=cpu"),
                    tmp_path / "local").loaded.model.model.rotary_emb.inv_freq
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- quantized experts, one at a time

@pytest.fixture(scope="module")
def q8_mixtral(tmp_path_factory) -> tuple[Path, Path]:
    _, folder, path = convert(tmp_path_factory, "mixtral", quantized=("_exps.weight",))
    return folder, path


def test_q8_0_stacked_experts_read_one_expert_from_its_own_bytes(q8_mixtral, monkeypatch):
    folder, path = q8_mixtral
    checkpoint = open_gguf(path)
    stacked = next(t for t in checkpoint._reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert stacked.tensor_type == gguf.GGMLQuantizationType.Q8_0
    whole = gguf.quants.dequantize(stacked.data, stacked.tensor_type)  # [experts, hidden, intermediate]
    sizes = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, kind: sizes.append(data.nbytes) or real(data, kind))
    for e in range(whole.shape[0]):
        got = checkpoint.read(f"model.layers.0.mlp.experts.{e}.down_proj.weight")
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(whole[e]))
    assert sizes == [stacked.data.nbytes // whole.shape[0]] * whole.shape[0]
    want = safetensors_torch.load_file(str(folder / "model.safetensors"))[
        "model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    step = want.abs().amax(dim=1, keepdim=True) / 127  # Q8_0: half a step, plus the fp16 scale's rounding
    got = checkpoint.read("model.layers.0.mlp.experts.1.down_proj.weight")
    assert ((got - want).abs() <= step * (0.5 + 127 * 2**-11)).all() and not torch.equal(got, want)


def test_q8_0_experts_run_as_the_model_with_their_dequantized_weights(q8_mixtral, tmp_path):
    folder, path = q8_mixtral
    rounded = tmp_path / "rounded"  # the safetensors checkpoint with each expert's weights through Q8_0 and back
    rounded.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (rounded / name).write_bytes((folder / name).read_bytes())
    tensors = safetensors_torch.load_file(str(folder / "model.safetensors"))
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, w in tensors.items():
        if ".experts." in name:
            tensors[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8))
    safetensors_torch.save_file(tensors, str(rounded / "model.safetensors"), metadata={"format": "pt"})
    _, ours = logits(tmp_path / "gguf", "checkpoint=gguf", f"checkpoint.path={path}", f"tokenizer.path={folder}")
    _, theirs = logits(tmp_path / "local", "checkpoint=local", f"checkpoint.path={rounded}")
    real = left_padded(PROMPTS)[1].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- bad input

def _one_line(error: pytest.ExceptionInfo) -> str:
    lines = error.value.lines
    assert len(lines) == 1 and "\n" not in lines[0], lines
    return lines[0]


def _bare_gguf(path: Path, arch: str, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """A GGUF of ``arch`` with the metadata given (as ``test_fuzz.write_gguf`` types it) and an embedding."""
    embedding = {"token_embd.weight": np.zeros((4, 8), dtype=np.float32)}
    write_metadata_gguf(path, meta or {}, {**embedding, **(tensors or {})}, arch)
    gguf_reader._reader.cache_clear()
    return path


def _sizes(arch: str, layers: int = 1) -> dict:
    return {f"{arch}.block_count": layers, f"{arch}.embedding_length": 8, f"{arch}.feed_forward_length": 16,
            f"{arch}.attention.head_count": 2}


@pytest.mark.parametrize("arch, meta, tensors, want", [
    ("qwen2", {"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 4.0}, {},
     {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    ("qwen2", {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
               "qwen2.rope.scaling.original_context_length": 32768}, {},
     {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}),
    ("llama", {"llama.rope.scale_linear": 2.0}, {}, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("qwen3", {"qwen3.rope.scaling.type": "none", "qwen3.rope.scaling.factor": 4.0}, {}, {"rope_scaling": None}),
    ("phi3", {"phi3.rope.scaling.original_context_length": 4096, "phi3.rope.dimension_count": 2},
     {"rope_factors_long.weight": np.array([2.0], np.float32), "rope_factors_short.weight": np.ones(1, np.float32)},
     {"rope_scaling": {"rope_type": "longrope", "long_factor": [2.0], "short_factor": [1.0],
                       "original_max_position_embeddings": 4096}, "partial_rotary_factor": 0.5,
      "sliding_window": None}),
    ("gemma2", {}, {}, {"sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"] * 2,
                        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 4}),
    ("gemma3", {"gemma3.attention.sliding_window": 512}, {},
     {"layer_types": ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"], "sliding_window": 512,
      "rope_local_base_freq": 10000.0, "final_logit_softcapping": None}),
    ("gemma3", {}, {}, {"layer_types": ["full_attention"] * 7, "sliding_window": None}),
])
def test_config_reads_the_metadata_as_llama_cpp_does(tmp_path, arch, meta, tensors, want):
    layers = {"gemma2": 4, "gemma3": 7}.get(arch, 1)
    config = open_gguf(_bare_gguf(tmp_path / "m.gguf", arch, {**_sizes(arch, layers), **meta}, tensors)).config()
    assert {k: config.get(k) for k in want} == want


def test_unknown_rope_scaling_is_one_line(tmp_path):
    path = _bare_gguf(tmp_path / "m.gguf", "qwen2", {**_sizes("qwen2"), "qwen2.rope.scaling.type": "dynamic",
                                                     "qwen2.rope.scaling.factor": 2.0})
    with pytest.raises(CheckpointError) as e:
        open_gguf(path).config()
    assert "qwen2.rope.scaling.type is 'dynamic'; the runner reads none, linear or yarn" in _one_line(e)


@pytest.mark.parametrize("arch", ["falcon", "gemma", "deepseek2"])
def test_an_unsupported_architecture_is_one_line_naming_the_supported_ones(tmp_path, arch):
    path = _bare_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(CheckpointError) as e:
        open_gguf(path)
    line = _one_line(e)
    assert line.startswith(f"{path}: a GGUF of architecture {arch!r}")
    assert all(a in line for a in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2moe", "qwen3moe"))


def test_a_missing_expert_count_is_one_line_naming_the_key(tmp_path):
    path = _bare_gguf(tmp_path / "moe.gguf", "qwen3moe", _sizes("qwen3moe"))
    with pytest.raises(CheckpointError) as e:
        open_gguf(path).config()
    assert "GGUF metadata qwen3moe.expert_count is missing" in _one_line(e)


def test_a_gguf_without_a_tokenizer_asks_for_tokenizer_path(q8_mixtral):
    _, path = q8_mixtral
    with pytest.raises(CheckpointError) as e:
        tokenizer_for(open_gguf(path), None, None, synthetic=False)
    assert _one_line(e).startswith("tokenizer.path: the checkpoint carries no tokenizer")


def test_an_unsupported_pre_tokenizer_is_one_line_naming_the_supported_ones():
    fields = {**gguf_fields(*trained("llama-bpe")), "ggml.pre": "deepseek-coder"}
    with pytest.raises(CheckpointError) as e:
        BPETokenizer(fields)
    line = _one_line(e)
    assert line.startswith("tokenizer.path: the GGUF's pre-tokenizer 'deepseek-coder' is not supported")
    assert "llama-bpe" in line and "qwen2" in line and "gpt2" in line


# --------------------------------------------------------------------------- the Llama 3 and Qwen2 splits

# The splits as the models' own tokenizer.json files have them.
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CORPUS = ["The year 2024 had 366 days; 1234567 is larger.", "don't stop, I'LL see you're fine -- we'd go",
          "line one\nline two\n\n  indented\r\n\ttabbed", "café naïve façade, Ünïcödé 東京は日本の首都です。",
          "x1y22z333 3.14159 $100,000!!! ...", "    def f(x):\n        return x ** 2\n"]
TEXTS = CORPUS + ["0123456789 and 12 34 567", "I'M HERE, You'Re There", "e\u0301 cafe\u0301 (decomposed accents)",
                  "trailing spaces   \n   \n", "emoji 🤖🎉 ok", "a\u00a0b\u2003c"]


def hf_tokenizer(pre: str, model: models.BPE) -> Tokenizer:
    """A tokenizer.json as Llama 3's (Split, then ByteLevel without its regex; whole words kept) or Qwen2's (NFC
    first)."""
    tok = Tokenizer(model)
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def trained(pre: str) -> tuple[Tokenizer, list[str], list[str]]:
    """A small byte-level BPE trained on ``CORPUS`` with the split: the tokenizer, its tokens by id, its merges."""
    tok = hf_tokenizer(pre, models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    saved = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(saved["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved["merges"]]
    return tok, tokens, merges


def gguf_fields(tok: Tokenizer, tokens: list[str], merges: list[str], pre: str = "llama-bpe") -> dict:
    return {"ggml.model": "gpt2", "ggml.pre": pre, "ggml.tokens": tokens, "ggml.merges": merges,
            "ggml.token_type": [1] * len(tokens)}


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_regex_splits_give_hugging_face_ids(pre):
    tok, tokens, merges = trained(pre)
    assert len(merges) > 50
    ours = BPETokenizer(gguf_fields(tok, tokens, merges, pre))
    for text in TEXTS:
        assert ours.encode(text) == tok.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == tok.decode(tok.encode(text).ids), text
    gpt2 = BPETokenizer(gguf_fields(tok, tokens, merges, "gpt2"))  # the split matters: GPT-2's gives other ids
    assert any(gpt2.encode(text) != tok.encode(text).ids for text in TEXTS)
