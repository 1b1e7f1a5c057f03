"""A decoder layer's decode step in C (``runner/native/decode.c``) gives the tokens of its Python form.

Tiny checkpoints transformers writes (``test_families``), quantized as they stream in or packed in float32 or
bfloat16 panels for batches (``runner.load.packed.PanelLinear``), generate greedily with
continuous batching (rows of unlike lengths, left padding, refills, a prefix shared across the job) once with the
C step and once with every layer on its Python path; the tokens must be the same and the logits of each decode
step within rounding. Resident layers run their steps in one C call (``NativeStack``), a streamed one alone.
"""
from __future__ import annotations

import pytest
import torch

from conftest import compose_config
from runner.infer.engine import Engine
from runner.infer.generate import Request
from runner.infer.sampling import SamplingParams
from runner.load.packed import PanelLinear
from runner.zoo import native_layer
from runner.zoo.decoder import DecoderLayer

transformers = pytest.importorskip("transformers")
from test_families import FAMILIES, byte_tokenizer, write_checkpoint  # noqa: E402 -- after the skip

SYSTEM = "You are a terse assistant. Answer in one line: "  # a prefix every prompt shares, kept across the job
QUESTIONS = ["why is the sky blue?", "name a prime", "what rhymes with cat, and why does it?", "hi", "count to five",
             "what is the capital of a country that has a long coastline?"]


@pytest.fixture(autouse=True)
def _native_kernels():
    if native_layer.kernels() is None:
        pytest.skip("no C compiler: the runner's kernels are not built")


def _generate(engine: Engine, native: bool, steps: list) -> list[list[int]]:
    layers = [m for m in engine.model.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:  # undecided: the first forward decides again; None: the Python path
        layer.native = native_layer.UNDECIDED if native else None
    tok = byte_tokenizer()
    requests = [Request(i, "", tuple(tok.encode(SYSTEM + q).ids)) for i, q in enumerate(QUESTIONS)]
    done = engine.complete(requests, SamplingParams(max_new_tokens=10, ignore_eos=True))
    return [list(c.output_tokens) for c in done]


def _one_step_both_ways(engine: Engine) -> tuple[dict, dict, int]:
    """Three prompts of unlike lengths prefilled, then one decode step, with the C step (True) and with every layer
    on its Python path (False): each way's logits (float32) and cache, and the prompts' padded width."""
    model = engine.model
    tok = byte_tokenizer()
    prompts = [tok.encode(SYSTEM + q).ids for q in QUESTIONS[:3]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    logits, caches = {}, {}
    for native in (True, False):
        for layer in layers:
            layer.native = native_layer.UNDECIDED if native else None
        cache = caches[native] = model.new_cache(width + 4)
        with torch.inference_mode():
            model(ids, attention_mask=mask, cache=cache)
            nxt = torch.tensor([[65], [66], [67]])
            logits[native] = model(nxt, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1),
                                   cache=cache).float()
        assert all(isinstance(layer.native, native_layer.NativeLayer) for layer in layers) == native
    return logits, caches, width


@pytest.mark.parametrize("model_type, quantize, placed", [
    ("llama", "int4", ()), ("qwen3", "int8", ()), ("mistral", "int4", ()), ("qwen2", "int8", ()), ("phi3", "int4", ()),
    ("llama", "int4", ("+device_map.model.layers.1=disk",)),  # a layer streamed in: its weights move every step
    ("llama", "null", ()), ("qwen2", "null", ()), ("qwen3", "null", ())])  # float32 panels: 16 rows pack them
def test_the_c_decode_step_gives_the_python_steps_tokens(model_type, quantize, placed, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    write_checkpoint(folder, model_type, FAMILIES[model_type])
    rows = 16 if quantize == "null" else 3
    engine = Engine(compose_config("checkpoint=local", f"checkpoint.path={folder}", "dtype=float32", "hardware=cpu",
                                   f"quantize={quantize}", f"runtime.batch_size={rows}", *placed), tmp_path / "run")
    if quantize == "null":
        assert all(isinstance(m.self_attn.q_proj, PanelLinear) for m in engine.model.modules()
                   if isinstance(m, DecoderLayer))
    if placed:
        assert engine.loaded.check.block_devices["model.layers.1"] == "disk"
    steps: list[bool] = []  # per layer's C step: whether rows continued a shared prefix
    stacked: list[int] = []  # per call of every layer's C step at once: how many layers
    real_step, real_stack = native_layer.NativeLayer.step, native_layer.NativeStack.step

    def counted(self, x, rope, mask, cache):
        steps.append(cache.prefix() is not None)
        return real_step(self, x, rope, mask, cache)

    def counted_stack(self, x, ropes, masks, caches):
        steps.extend(cache.prefix() is not None for cache in caches)
        stacked.append(len(caches))
        return real_stack(self, x, ropes, masks, caches)

    monkeypatch.setattr(native_layer.NativeLayer, "step", counted)
    monkeypatch.setattr(native_layer.NativeStack, "step", counted_stack)
    with_c = _generate(engine, True, steps)
    c_steps = len(steps)
    python = _generate(engine, False, steps)
    assert len(steps) == c_steps  # the Python run made no C step
    assert with_c == python
    layers = [m for m in engine.model.modules() if isinstance(m, DecoderLayer)]
    if model_type == "phi3":  # a fused qkv projection and partial rotary: not decode.c's shape
        assert c_steps == 0
        return
    assert c_steps >= 3 * 9  # every layer, every decode step
    # a resident model's layers run their steps in one call; where a layer streams, every block keeps its hook and
    # each layer runs alone
    assert stacked == [] if placed else (set(stacked) == {len(layers)} and len(stacked) * len(layers) == c_steps)
    if engine.model.shares_prefixes():  # no sliding window: rows continue the job's kept prefix
        assert any(steps), "no C step read a shared prefix"


def test_logits_of_a_c_step_equal_the_python_steps(tmp_path):
    folder = tmp_path / "checkpoint"
    write_checkpoint(folder, "qwen3", FAMILIES["qwen3"])
    engine = Engine(compose_config("checkpoint=local", f"checkpoint.path={folder}", "dtype=float32", "hardware=cpu",
                                   "quantize=int4"), tmp_path / "run")
    logits, _, _ = _one_step_both_ways(engine)
    span = logits[False].max() - logits[False].min()
    # activations are rounded to int16 for the projections (qmm.c): the C and Python norms' last-bit differences can
    # move one value by a step, 2^-16 of its block's range
    assert (logits[True] - logits[False]).abs().max() / span < 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_of_a_c_step_over_packed_panels_equal_the_python_steps(dtype, tmp_path):
    if dtype == "bfloat16" and not native_layer.kernels().dense_bf16:
        pytest.skip("this CPU's build has no bfloat16 dot products (AVX-512 BF16)")
    folder = tmp_path / "checkpoint"
    write_checkpoint(folder, "llama", FAMILIES["llama"])
    engine = Engine(compose_config("checkpoint=local", f"checkpoint.path={folder}", f"dtype={dtype}", "hardware=cpu",
                                   "runtime.batch_size=16"), tmp_path / "run")
    logits, caches, width = _one_step_both_ways(engine)
    span = logits[False].max() - logits[False].min()
    error = (logits[True] - logits[False]).abs().max() / span
    # float32: the same products, summed in another order; bfloat16: the C step keeps its activations in float32
    # between the products, where the Python path rounds each operation's output to bfloat16
    assert error < (1e-5 if dtype == "float32" else 2e-2)
    written = [(caches[n].layer(0).keys[:, :, width].float()) for n in (True, False)]  # this step's keys
    bound = 2 ** -6 if dtype == "bfloat16" else 1e-6  # bfloat16: two of its steps apart, where the paths round
    assert (written[0] - written[1]).abs().max() <= bound * written[1].abs().max()
    assert caches[True].layer(0).keys.dtype == getattr(torch, dtype)
