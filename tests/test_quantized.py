"""Weights kept quantized: GGUF blocks read exactly, the runner's C kernels (both builds) against fp32, the default SmolLM2 GGUF held in
its 4-bit form, ``quantize=int8|int4`` on a checkpoint transformers wrote, offload of quantized blocks, bad input.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import compose_config, run_in_process
from runner.infer.engine import Engine
from runner.infer.generate import Request
from runner.infer.sampling import SamplingParams
from runner.plan.planned import plan
from runner import native
from runner.quant.formats import FORMATS
from runner.quant.gguf_blocks import block_values

ROWS, COLUMNS = 48, 512


def blocks_of(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[ROWS, bytes]`` of ``kind`` blocks and what gguf dequantizes them to. gguf writes Q4_0, Q4_1 and Q8_0;
    the K types' blocks are random bytes with sane fp16 ``d`` (and ``dmin``): any scales and values are valid."""
    rng = np.random.default_rng(seed)
    kind_type = getattr(gguf.GGMLQuantizationType, kind)
    if kind.endswith("_K"):
        size, halves = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}[kind]
        raw = rng.integers(0, 256, (ROWS, COLUMNS // 256, size), dtype=np.uint8)
        for start in halves:  # d (and dmin)
            raw[..., start:start + 2] = rng.uniform(1e-3, 2e-2, raw.shape[:2]).astype(np.float16)[..., None].view(
                np.uint8)
        raw = raw.reshape(ROWS, -1)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((ROWS, COLUMNS)).astype(np.float32), kind_type)
    return raw, gguf.quants.dequantize(raw, kind_type)


def as_the_kernels_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels see it at up to 3 rows: rounded per 16 k's to int16 against the block's largest
    magnitude (qmm.c, ``round_rows``), in the same fp32 operations."""
    blocks = x.float().reshape(len(x), -1, 16)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).clamp(-32768, 32767)
    return (q * (amax / 32767.0)).reshape(x.shape)


def weights(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    rows, columns = q.shape
    group = columns // scale.shape[1]
    return (q.float().view(rows, -1, group) * scale[..., None] + low[..., None]).view(rows, columns)


@pytest.mark.parametrize("kind, least, most", [("Q4_0", 0, 15), ("Q4_1", 0, 15), ("Q4_K", 0, 15), ("Q5_K", 0, 31),
                                               ("Q6_K", -32, 31), ("Q8_0", -127, 127)])
def test_block_values_are_exactly_what_gguf_dequantizes(kind, least, most):
    raw, want = blocks_of(kind)
    q, scale, low = block_values(kind, torch.from_numpy(raw), COLUMNS)
    assert q.min() == least and q.max() == most  # every value the type holds occurs in 48 x 512 random ones
    assert torch.equal(weights(q, scale, low), torch.from_numpy(want))


def test_a_row_count_that_is_not_whole_blocks_is_refused():
    raw, _ = blocks_of("Q4_1")
    with pytest.raises(ValueError, match="not 16 Q4_1 blocks"):
        block_values("Q4_1", torch.from_numpy(raw[:, :-1]), COLUMNS)


@pytest.fixture(scope="module", params=["vectorized", "portable"])
def built(request, runner_cache) -> native.Kernels:
    """The kernels as this CPU builds them, and the portable build (plain loops) that other CPUs get."""
    spec = native.build_for_this_cpu(portable=request.param == "portable")
    if spec is None:
        pytest.skip("no C compiler")
    if request.param == "vectorized" and not spec.vectorized:
        pytest.skip("this CPU has no AVX2")
    return native.Kernels(native.build(spec, runner_cache / "native"), spec)


@pytest.mark.parametrize("kind, form", [("Q4_0", "int4h"), ("Q4_1", "int4h"), ("Q4_K", "int4"), ("Q5_K", "q5k"),
                                        ("Q6_K", "q6k"), ("Q8_0", "int8g")])
def test_kept_blocks_hold_what_gguf_dequantizes_and_multiply_as_fp32_does(kind, form, built):
    raw, want = blocks_of(kind)
    fmt = FORMATS[form]
    parts = fmt.pack(*block_values(kind, torch.from_numpy(raw), COLUMNS))
    assert torch.equal(fmt.dequantize(parts, ROWS, COLUMNS), torch.from_numpy(want))
    ids = torch.tensor([[3, 0, 47], [5, 5, 1]])
    assert torch.equal(fmt.rows(ids, parts, torch.float32), torch.from_numpy(want)[ids])
    for m in (1, 2, 3, 4, 7, 13):  # registers alone up to 3 rows; a dequantized panel and tiles of 6 beyond
        x = torch.randn(m, COLUMNS)
        seen = as_the_kernels_round(x) if m <= 3 else x
        reference = seen.double() @ torch.from_numpy(want).double().t()
        got = built.qmm(x, parts["qweight"], parts["scales"], rows=ROWS, bits=fmt.bits, group=fmt.group,
                        flags=fmt.flags)
        assert got.shape == reference.shape and got.dtype == torch.float32
        assert (got - reference).abs().max() / reference.abs().max() < 1e-5, m  # fp32 rounding, no more
        exact = x.double() @ torch.from_numpy(want).double().t()
        assert (got - exact).abs().max() / exact.abs().max() < 1e-4, m  # what rounding to int16 costs


@pytest.mark.parametrize("rows", [1, 15, 17, 40])
def test_a_last_panel_short_of_sixteen_rows_is_computed_and_read(rows, built):
    w = torch.randn(rows, 64)
    for fmt in FORMATS.values():
        parts = fmt.quantize(w)
        held = fmt.dequantize(parts, rows, 64)
        for m in (1, 5):
            x = torch.randn(m, 64)
            got = built.qmm(x, parts["qweight"], parts["scales"], rows=rows, bits=fmt.bits, group=fmt.group or 64,
                            flags=fmt.flags)
            seen = as_the_kernels_round(x) if m == 1 else x
            assert (got - seen @ held.t()).abs().max() < 1e-4, (fmt.name, m)
        assert torch.equal(fmt.rows(torch.tensor([rows - 1]), parts, torch.float32), held[-1:])


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_a_non_finite_activation_gives_non_finite_outputs_for_its_row_alone(rows, built):
    fmt = FORMATS["int4h"]
    parts = fmt.quantize(torch.randn(32, 64))
    x = torch.randn(rows, 64)
    x[0, 16] = float("nan")      # the first of its block: a max over the block would drop it
    x[-1, 48:] = float("inf")    # a whole block
    got = built.qmm(x, parts["qweight"], parts["scales"], rows=32, bits=4, group=32, flags=fmt.flags)
    assert not got[0].isfinite().any() and not got[-1].isfinite().any()
    assert got[1:-1].isfinite().all()


@pytest.mark.parametrize("compiler", ["none on the PATH", "false"])
def test_without_kernels_a_weight_is_dequantized_for_each_product(compiler, monkeypatch, caplog):
    fmt = FORMATS["int4"]
    parts, x = fmt.quantize(torch.randn(40, 96)), torch.randn(5, 96)  # 5 rows: fp32 activations in both
    want = fmt.linear(x, parts, 40)
    if compiler == "false":
        monkeypatch.setenv("CC", "false")  # a compiler that fails
    else:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", "")
    native.kernels.cache_clear()
    try:
        got = fmt.linear(x, parts, 40)
        assert native.kernels() is None
    finally:
        native.kernels.cache_clear()
    assert torch.allclose(got, want, atol=1e-5)
    assert "quantized weights are dequantized for every matmul" in caplog.text


@pytest.mark.parametrize("form", ["int8", "int8g", "int4"])
def test_rounding_full_precision_weights_stays_within_half_a_step(form):
    w = torch.randn(64, 256)
    fmt = FORMATS[form]
    parts = fmt.quantize(w)
    x = torch.eye(256)  # the product with the identity is the weight the kernel holds, transposed
    held = fmt.linear(x, parts, 64).t()
    assert torch.allclose(held, fmt.dequantize(parts, 64, 256), atol=1e-6)
    grouped = w.view(64, -1, fmt.group or 256)
    steps = (grouped.abs().amax(-1) / 127) if fmt.bits == 8 else (grouped.amax(-1) - grouped.amin(-1)) / 15
    if fmt.half:  # the step held is the fp16 number nearest, up to 2^-11 larger
        steps = steps.half().float()
    assert ((held - w).abs() <= steps.repeat_interleave(fmt.group or 256, -1) * 0.5001 + 1e-6).all()
    assert (held != w).any()


def test_the_default_gguf_is_held_in_its_quantized_bytes_and_runs_as_dequantized(tmp_path):
    engines = {name: Engine(compose_config("hardware=cpu", f"dtype={dtype}"), tmp_path / name)
               for name, dtype in {"kept": "auto", "fp32": "float32"}.items()}
    kept, dequantized = engines["kept"].loaded, engines["fp32"].loaded
    file_bytes = kept.checkpoint.files[0].stat().st_size
    # the file's own bytes: Q4_1 and Q8_0 blocks held with their fp16 numbers (the file adds its metadata)
    assert 0.97 * file_bytes < kept.layout.total_bytes < file_bytes < dequantized.layout.total_bytes / 5
    assert kept.ledger.peak["cpu"] == kept.layout.total_bytes
    assert kept.quantization.lines == ("Q4_1 -> int4, groups of 32, fp16 scales, repacked: 210 tensor(s)",
                                       "Q8_0 -> int8, groups of 32, the stored values: 1 tensor(s)")
    assert dequantized.quantization.kept == {}
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 8196, 28, 260, 3458, 282, 253, 2725, 314]])
    with torch.inference_mode():
        logits = {name: e.loaded.model(ids) for name, e in engines.items()}
    span = logits["fp32"].max() - logits["fp32"].min()
    error = (logits["kept"] - logits["fp32"]).abs().max() / span
    assert error < 1e-4  # fp32 activations and scales: the dequantized run's logits, to fp32 rounding
    assert torch.equal(logits["kept"].argmax(-1), logits["fp32"].argmax(-1))
    steps = {}  # decode steps of one row, where the kernels round activations to int16
    for name, e in engines.items():
        model, cache, steps[name] = e.loaded.model, e.loaded.model.new_cache(ids.shape[1] + 8), []
        with torch.inference_mode():
            model(ids, cache=cache)
            for token in (3458, 282, 253, 2725, 314, 8196, 28):
                steps[name].append(model(torch.tensor([[token]]), cache=cache))
    step_logits = {name: torch.cat(v, 1) for name, v in steps.items()}
    span = step_logits["fp32"].max() - step_logits["fp32"].min()
    assert (step_logits["kept"] - step_logits["fp32"]).abs().max() / span < 1e-3  # the bound
    assert torch.equal(step_logits["kept"].argmax(-1), step_logits["fp32"].argmax(-1))
    prompts = ["What is the capital of France?", "What is the opposite of hot?"]
    texts = {name: [c.text for c in e.generate(prompts, max_new_tokens=12)] for name, e in engines.items()}
    assert texts["kept"] == texts["fp32"]


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from test_families import write_checkpoint

    folder = tmp_path_factory.mktemp("llama")
    write_checkpoint(folder, "llama", {"tie_word_embeddings": True})
    return folder


def test_quantize_rounds_a_transformers_checkpoint_and_offloaded_blocks_match_resident(llama_folder, tmp_path):
    from test_families import PROMPTS, left_padded

    rows, mask = left_padded(PROMPTS)
    local = ("checkpoint=local", f"checkpoint.path={llama_folder}", "dtype=float32")
    runs = {"fp32": ("hardware=cpu",), "int8": ("hardware=cpu", "quantize=int8"),
            "int4": ("hardware=cpu", "quantize=int4"),
            "int4 offloaded": ("hardware=sim_2gpu", "quantize=int4", "+device_map.model.layers.0=cpu",
                               "+device_map.model.layers.2=disk")}
    logits, engines = {}, {}
    for name, overrides in runs.items():
        engines[name] = Engine(compose_config(*local, *overrides), tmp_path / name.replace(" ", "-"))
        with torch.inference_mode():
            logits[name] = engines[name].loaded.model(rows, attention_mask=mask)
    real = mask.bool()
    span = logits["fp32"][real].max() - logits["fp32"][real].min()
    errors = {n: float((logits[n][real] - logits["fp32"][real]).abs().max() / span) for n in ("int8", "int4")}
    # A random 3-layer model magnifies rounding (its weights span 0.2 and every logit rides on them); measured 4.6%
    # and 38% of the logits' range. Real weights lose far less: bench/quant_bench.py's perplexities.
    assert 0 < errors["int8"] < 0.1 and errors["int8"] < errors["int4"] < 0.6, errors
    torch.testing.assert_close(logits["int4 offloaded"], logits["int4"], rtol=0, atol=1e-5)
    offloaded = engines["int4 offloaded"].loaded
    assert {offloaded.check.block_devices[f"model.layers.{i}"] for i in (0, 2)} == {"cpu", "disk"}
    # The planner and the ledger count quantized bytes: int4 layers take about a seventh of fp32's.
    fp32_layer = engines["fp32"].loaded.layout
    int4_layer = offloaded.layout
    size = {b.name: b.nbytes for b in int4_layer.blocks}
    assert size["model.layers.2"] < {b.name: b.nbytes for b in fp32_layer.blocks}["model.layers.2"] / 5
    assert engines["int8"].loaded.quantization.lines[0].startswith("float32 -> int8, a scale per row")


@pytest.mark.parametrize("overrides, says", [
    (("quantize=int8",), "error: config: quantize: int8 asks to quantize weights the checkpoint already stores "
                         "quantized (Q4_1, Q8_0); leave quantize=null, and they stay as stored"),
    (("quantize=int3",), "error: config: quantize: 'int3' is not valid; expected null (weights as stored), int8 or "
                         "int4"),
])
def test_bad_quantize_settings_are_one_line(overrides, says, tmp_path):
    outcome, errors = run_in_process(tmp_path / "run", "mode=plan", *overrides)
    assert errors == [says]


def test_a_gguf_type_that_cannot_be_computed_is_one_line(tmp_path):
    from test_gguf import HIDDEN, TOKENS, save

    path = tmp_path / "q8k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    # Q8_K (llama.cpp's intermediate type for dot products, never a model's): 292 bytes per 256 values.
    writer.add_tensor("token_embd.weight", np.zeros((len(TOKENS), 292), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    save(writer)
    outcome, errors = run_in_process(tmp_path / "run", "mode=plan", "checkpoint=gguf", f"checkpoint.path={path}")
    assert errors == [f"error: checkpoint: {path}: tensor token_embd.weight is stored as GGUF type Q8_K, which the runner cannot compute "
                      "(it keeps Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and Q8_0 quantized and dequantizes the other types "
                      "llama.cpp writes for models); re-quantize the file with llama.cpp's llama-quantize (e.g. "
                      "Q4_K_M or Q8_0)"]


def test_a_weight_packed_in_row_chunks_is_the_weight_packed_whole(monkeypatch):
    """QuantizedCheckpoint packs CHUNK rows at a time into the final tensors: the same bytes as one packing."""
    import runner.quant.checkpoint as qc
    from runner.load.checkpoint.base import Checkpoint, TensorEntry

    raw, _ = blocks_of("Q4_1")
    weight = torch.randn(ROWS, COLUMNS)

    class Stored(Checkpoint):
        source, revision, ignored, files = "test", None, {}, [Path("stored")]
        entries = {"a.weight": TensorEntry(Path("stored"), torch.float32, (ROWS, COLUMNS)),
                   "b.weight": TensorEntry(Path("stored"), torch.float32, (ROWS, COLUMNS))}

        def read(self, key):
            return weight

        def stored_type(self, key):
            return "Q4_1" if key == "a.weight" else None

        def read_blocks(self, key, start=0, stop=None):
            return torch.from_numpy(raw[start:stop])

    kept = {"a.weight": qc.Kept("a.weight", "int4", True), "b.weight": qc.Kept("b.weight", "int8g", False)}
    whole = {k: qc.QuantizedCheckpoint(Stored(), kept).read(k) for k in ("a.qweight", "a.scales", "b.qweight",
                                                                        "b.scales")}
    monkeypatch.setattr(qc, "CHUNK", 32)  # a chunk of 32 rows (two panels) and one of 16
    chunked = qc.QuantizedCheckpoint(Stored(), kept)
    for key, want in whole.items():
        assert torch.equal(chunked.read(key), want), key
    assert torch.equal(whole["a.qweight"],
                       FORMATS["int4"].pack(*block_values("Q4_1", torch.from_numpy(raw), COLUMNS))["qweight"])


def test_a_quantized_plan_counts_the_flops_of_its_weights_shapes_not_their_bytes(tmp_path):
    from runner.plan.throughput import Rates, step_cost

    plans = {dtype: plan(compose_config("hardware=cpu", f"dtype={dtype}"), tmp_path / dtype)
             for dtype in ("auto", "float32")}
    assert plans["auto"].quantization.kept and not plans["float32"].quantization.kept
    rates = Rates(disk=None, host_to_device=None, flops={"cpu": 1e9})
    flops = {dtype: step_cost(p, rates).flops["cpu"] for dtype, p in plans.items()}
    assert flops["auto"] == flops["float32"] > 2 * 100e6  # SmolLM2's 135M weights, a sixth of them read by row


def _k_blocks(kind: str, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, bytes]`` of random ``kind`` blocks whose fp16 ``d`` (and ``dmin``) keep the weights small."""
    size, halves = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}[kind]
    raw = rng.integers(0, 256, (rows, columns // 256, size), dtype=np.uint8)
    for start in halves:
        raw[..., start:start + 2] = rng.uniform(2e-4, 1e-3, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def test_a_q4_k_m_style_gguf_is_held_whole_and_decodes_as_its_dequantized_run(tmp_path):
    """Q4_K_M files mix Q4_K with Q6_K (and Q5_K in some layers): every one of those stays quantized, and the run
    (prefill, then decode steps through the C layer step) gives the dequantized fp32 run's logits and tokens."""
    from test_gguf import TEMPLATE

    hidden, ffn, heads, kv_heads = 256, 512, 4, 2
    tokens = ["<s>", "</s>"] + [f"t{i}" for i in range(254)]
    rng = np.random.default_rng(0)
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for setting, value in (("block_count", 2), ("context_length", 64), ("embedding_length", hidden),
                           ("feed_forward_length", ffn), ("head_count", heads), ("head_count_kv", kv_heads),
                           ("layer_norm_rms_eps", 1e-5), ("rope_freq_base", 10000.0)):
        getattr(writer, f"add_{setting}")(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_token_types([3, 3] + [1] * 254)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(TEMPLATE)
    kinds = {"attn_q": ("Q4_K", hidden), "attn_k": ("Q5_K", 128), "attn_v": ("Q6_K", 128),
             "attn_output": ("Q4_K", hidden), "ffn_gate": ("Q5_K", ffn), "ffn_up": ("Q4_K", ffn)}
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(
        rng.standard_normal((len(tokens), hidden)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for layer in range(2):
        for name, (kind, rows) in kinds.items():
            writer.add_tensor(f"blk.{layer}.{name}.weight", _k_blocks(kind, rows, hidden, rng),
                              raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        writer.add_tensor(f"blk.{layer}.ffn_down.weight", _k_blocks("Q6_K", hidden, ffn, rng),
                          raw_dtype=gguf.GGMLQuantizationType.Q6_K)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", _k_blocks("Q6_K", len(tokens), hidden, rng),
                      raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    from test_gguf import save
    save(writer)

    engines = {dtype: Engine(compose_config("checkpoint=gguf", f"checkpoint.path={path}", "hardware=cpu",
                                            f"dtype={dtype}"), tmp_path / dtype) for dtype in ("auto", "float32")}
    kept = engines["auto"].loaded
    assert set(kept.quantization.lines) == {
        "Q4_K -> int4, groups of 32, repacked: 6 tensor(s)",
        "Q5_K -> 5-bit values in int8, groups of 32, the stored values: 4 tensor(s)",
        "Q6_K -> 6-bit values in int8, groups of 16, the stored values: 5 tensor(s)",
        "Q8_0 -> int8, groups of 32, the stored values: 1 tensor(s)"}
    assert kept.layout.total_bytes < engines["float32"].loaded.layout.total_bytes / 3
    ids = torch.tensor([[0, 5, 17, 99, 3, 250, 42, 7]])
    with torch.inference_mode():
        logits = {dtype: e.loaded.model(ids) for dtype, e in engines.items()}
    span = logits["float32"].max() - logits["float32"].min()
    assert (logits["auto"] - logits["float32"]).abs().max() / span < 1e-4
    requests = [Request(i, "", tuple(ids[0, :n].tolist())) for i, n in enumerate((3, 8, 5))]
    outputs = {dtype: [c.output_tokens for c in e.complete(requests, SamplingParams(max_new_tokens=8,
                                                                                    ignore_eos=True))]
               for dtype, e in engines.items()}
    assert outputs["auto"] == outputs["float32"]
    layers = [m for m in engines["auto"].model.modules() if type(m).__name__ == "DecoderLayer"]
    assert all(type(layer.native).__name__ == "NativeLayer" for layer in layers)  # decoded by the C step


def test_a_build_cut_short_is_reclaimed_and_a_build_is_reused(tmp_path):
    from runner import native

    spec = native.build_for_this_cpu(portable=True)
    if spec is None:
        pytest.skip("no C compiler")
    dead = tmp_path / ".kernels-0.so.999999999.tmp"  # a pid no process has
    dead.write_bytes(b"half a library")
    built = native.build(spec, tmp_path)
    assert not dead.exists() and built.exists()
    mtime = built.stat().st_mtime_ns
    assert native.build(spec, tmp_path) == built and built.stat().st_mtime_ns == mtime  # not compiled again
    assert native.Kernels(built, spec).avx2 is False  # the portable build
