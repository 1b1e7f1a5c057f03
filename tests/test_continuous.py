"""Rows in flight stay full: continuous batching, prefixes kept across a job, packed linears, and dtype=auto."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_config
from runner import Engine
from runner.errors import PlanError
from runner.infer.generate import GenerationStats, Request, generate
from runner.infer.sampling import SamplingParams
from runner.infer.slots import Slots
from runner.load.packed import PackedLinear, PanelLinear
from runner.plan import arithmetic
from runner.plan.arithmetic import auto_dtype, emulated_bf16_warning
from test_generate import PROMPTS

SYSTEM = "System: be brief and kind. User: "  # 34 bytes every prompt starts with


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """gpt2tiny (synthetic, byte tokenizer), batches of 4, 64-token sequences."""
    return Engine(compose_config("model=gpt2tiny", "model.arch.n_layer=3", "hardware=cpu", "runtime.batch_size=4",
                                 "runtime.seq_len=64"), tmp_path_factory.mktemp("tiny"))


def requests_of(engine: Engine, prompts: list[str]) -> list[Request]:
    return [Request(i, p, tuple(engine.tokenizer.encode(p))) for i, p in enumerate(prompts)]


def stop_tokens(engine: Engine, prompts: list[str], new: int) -> list[int]:
    """Token ids that end some completions early and others late: rows finish at different steps."""
    free = generate(engine.lm, engine.tokenizer, requests_of(engine, prompts), SamplingParams(max_new_tokens=new),
                    batch_size=1, seed=0)
    return sorted({c.output_tokens[k] for k, c in zip((1, 4, 7), free)})


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=10),
                                    SamplingParams(max_new_tokens=10, temperature=0.8, top_k=30)],
                         ids=["greedy", "sampled"])
def test_a_finished_rows_place_is_taken_and_every_row_gets_the_tokens_it_gets_alone(tiny, params):
    from dataclasses import replace

    params = replace(params, stop_token_ids=tuple(stop_tokens(tiny, PROMPTS, 10)))
    requests = requests_of(tiny, PROMPTS)
    alone = generate(tiny.lm, tiny.tokenizer, requests, params, batch_size=1, seed=3)
    stats = GenerationStats()
    together = generate(tiny.lm, tiny.tokenizer, requests, params, batch_size=4, seed=3, stats=stats)
    assert [c.output_tokens for c in together] == [c.output_tokens for c in alone]
    assert [c.finish_reason for c in together] == [c.finish_reason for c in alone]
    assert len({len(c.output_tokens) for c in alone}) > 2  # rows really finish at different steps
    assert stats.refills > 0  # waiting rows joined batches already running
    assert stats.decode_rows == sum(len(c.output_tokens) - 1 for c in together)  # free rows are not counted


def test_a_fill_holds_one_prefill_groups_cache_at_a_time(tiny, monkeypatch):
    import weakref

    prompts = ["a", "bb", "a much longer prompt than the others, by far", "ccc",
               "and another long one, to make a second group of its own"]  # unlike lengths: several groups
    requests = requests_of(tiny, prompts)
    made, held = [], []
    real_cache, real_place = type(tiny.lm).new_cache, Slots.place

    def new_cache(self, capacity):
        cache = real_cache(self, capacity)
        made.append(weakref.ref(cache))
        return cache

    def place(self, group, slots):
        # the group caches alive and holding keys as one is placed (the batch's own is not a group's)
        held.append(sum(1 for c in made if c() is not None and c() is not self.cache and c().nbytes))
        real_place(self, group, slots)

    monkeypatch.setattr(type(tiny.lm), "new_cache", new_cache)
    monkeypatch.setattr(Slots, "place", place)
    done = generate(tiny.lm, tiny.tokenizer, requests, SamplingParams(max_new_tokens=4), batch_size=8, seed=0)
    assert len(done) == 5 and len(held) >= 2  # two groups at least were placed
    assert max(held) == 1


def test_columns_are_compacted_when_a_batch_runs_past_its_cache(tiny):
    """A long job in a small cache: the batch's columns run out many times over and are compacted each time."""
    params = SamplingParams(max_new_tokens=12, stop_token_ids=tuple(stop_tokens(tiny, PROMPTS, 12)))
    requests = requests_of(tiny, PROMPTS * 2)
    alone = generate(tiny.lm, tiny.tokenizer, requests, params, batch_size=1, seed=0)
    span = max(len(r.tokens) for r in requests) + 12
    together = generate(tiny.lm, tiny.tokenizer, requests, params, batch_size=4, seed=0, room=span)
    assert [c.output_tokens for c in together] == [c.output_tokens for c in alone]


def test_a_prefix_is_kept_across_calls_and_changes_no_token(tmp_path):
    def engine(*more: str) -> Engine:
        return Engine(compose_config("model=gpt2tiny", "model.arch.n_layer=3", "hardware=cpu",
                                     "runtime.batch_size=2", "runtime.seq_len=64", *more), tmp_path / str(len(more)))

    prompts = [SYSTEM + q for q in ("Hi", "2+2?", "Name a colour", "Why?")]
    kept, none = engine(), engine("runtime.prefix_cache=0")
    assert kept.prefixes.positions > len(SYSTEM) and none.prefixes.positions == 0
    first = kept.generate(prompts, max_new_tokens=6)
    lookups, hits = kept.stats.prefix_lookups, kept.stats.prefix_hits
    again = kept.generate(prompts, max_new_tokens=6)
    assert kept.stats.prefix_hits - hits == kept.stats.prefix_lookups - lookups > 0  # every group found it
    assert [c.output_tokens for c in again] == [c.output_tokens for c in first] == \
        [c.output_tokens for c in none.generate(prompts, max_new_tokens=6)]
    assert none.stats.prefix_hits == 0


def test_rows_continuing_a_shared_prefix_attend_as_if_each_held_a_copy():
    """Cascade attention (grouped-query heads, padded rows, rows that do not continue the prefix) against each row
    alone through the fused kernel, its keys the prefix's and then its own real ones; and the written-out form
    the other paths take."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from runner.infer.attention import _one_query
    from runner.infer.kv_cache import PrefixView

    torch.manual_seed(0)
    B, H, kv, D, P, S = 5, 6, 2, 8, 7, 4
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, kv, S, D), torch.randn(B, kv, S, D)
    prefix = PrefixView(torch.randn(1, kv, P, D), torch.randn(1, kv, P, D),
                        torch.tensor([True, False, True, True, False]))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, :2] = mask[1, :1] = False
    cascade = _one_query(q, k, v, mask[:, None, None, :], None, prefix)
    keys, values, joined = prefix.joined(k, v, mask[:, None, None, :], 1)
    written_out = sdpa(q, keys, values, attn_mask=joined, enable_gqa=True)
    for b in range(B):
        real = torch.cat([prefix.rows[b].expand(P), mask[b]])
        alone = sdpa(q[b:b + 1], keys[b:b + 1, :, real], values[b:b + 1, :, real], enable_gqa=True)
        torch.testing.assert_close(cascade[b:b + 1], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(written_out[b:b + 1], alone, rtol=1e-5, atol=1e-6)


def test_rows_continuing_a_prefix_kept_once_get_the_tokens_they_get_alone(tiny):
    """Refills into a running batch whose rows continue one prefix, kept once and not copied into each row: each
    row's tokens are those it gets alone (its positions count the prefix; its columns hold its own tokens)."""
    from runner.infer.prefixes import PrefixCache

    prompts = [SYSTEM + p for p in PROMPTS if len(p.encode()) <= 20]  # 15, within the 64 positions
    params = SamplingParams(max_new_tokens=8, stop_token_ids=tuple(stop_tokens(tiny, prompts, 8)))
    requests = requests_of(tiny, prompts)
    alone = generate(tiny.lm, tiny.tokenizer, requests, params, batch_size=1, seed=0)
    caches = []
    new_cache = tiny.lm.new_cache
    tiny.lm.new_cache = lambda capacity: caches.append(new_cache(capacity)) or caches[-1]
    try:
        stats = GenerationStats()
        together = generate(tiny.lm, tiny.tokenizer, requests, params, batch_size=4, seed=0, stats=stats,
                            prefixes=PrefixCache(256))
    finally:
        del tiny.lm.new_cache
    assert [c.output_tokens for c in together] == [c.output_tokens for c in alone]
    assert stats.refills > 0 and stats.prefix_hits > 0
    system = tuple(tiny.tokenizer.encode(SYSTEM))
    shared = [c.shared for c in caches if c.shared is not None]
    assert shared and all(s.tokens[:len(system)] == system for s in shared)


def test_a_prefix_cache_that_does_not_fit_the_plan_is_refused_in_one_line(tmp_path):
    with pytest.raises(PlanError, match=r"^runtime\.prefix_cache: 100000000 positions of prefix keys and values "
                                        r"need .+, and the plan leaves .+ free beside weights and reserves "
                                        r"\(\d+ positions\); lower runtime\.prefix_cache"):
        Engine(compose_config("model=gpt2tiny", "hardware=cpu", "runtime.seq_len=64", "max_memory.cpu=2GiB",
                              "runtime.prefix_cache=100000000"), tmp_path)


def test_linears_are_packed_for_batches_and_give_the_unpacked_tokens(tmp_path):
    def engine(rows: int) -> Engine:
        return Engine(compose_config("model=gpt2tiny", "model.arch.n_layer=3", "hardware=cpu",
                                     f"runtime.batch_size={rows}", "runtime.seq_len=64"), tmp_path / str(rows))

    batched, single = engine(16), engine(1)
    forms = (PackedLinear, PanelLinear)  # the runner's panels where its kernels are built, else oneDNN's
    packed = [m for m in batched.model.modules() if isinstance(m, forms)]
    assert packed and not any(isinstance(m, forms) for m in single.model.modules())
    copies = [m.panels if isinstance(m, PanelLinear) else m.weight for m in packed]
    assert batched.loaded.ledger.current["cpu"] == single.loaded.ledger.current["cpu"] + sum(
        t.numel() * t.element_size() for t in copies)  # the packed copies are booked
    params = SamplingParams(max_new_tokens=8)
    assert [c.output_tokens for c in batched.generate(PROMPTS, params)] == \
        [c.output_tokens for c in single.generate(PROMPTS, params)]


def test_dtype_auto_picks_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    hardware = Engine.plan(compose_config("model=gpt2tiny", "hardware=cpu", "runtime.seq_len=64"), tmp_path,
                           tokenizer=False)[0].hardware
    monkeypatch.setenv("RUNNER_NATIVE_BF16", "1")  # as told, whatever this CPU has
    dtype, why = auto_dtype(torch.float32, hardware)
    assert dtype == torch.bfloat16 and "RUNNER_NATIVE_BF16=1" in why
    monkeypatch.delenv("RUNNER_NATIVE_BF16")  # from here on, the CPU's flags
    monkeypatch.setattr(arithmetic, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert auto_dtype(torch.float32, hardware)[0] == torch.float32
    assert auto_dtype(torch.bfloat16, hardware)[0] == torch.bfloat16  # the checkpoint's own
    warning = emulated_bf16_warning(torch.bfloat16, hardware)
    assert warning is not None and "~5x slower than float32" in warning
    monkeypatch.setattr(arithmetic, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "avx512_bf16"}))
    dtype, why = auto_dtype(torch.float32, hardware)
    assert dtype == torch.bfloat16 and "amx_bf16" in why
    assert emulated_bf16_warning(torch.bfloat16, hardware) is None


def test_the_plan_says_which_dtype_auto_chose_and_why(tmp_path):
    from runner.plan.explain import notices

    planned, _ = Engine.plan(compose_config("model=gpt2tiny", "hardware=cpu", "runtime.seq_len=64"), tmp_path,
                             tokenizer=False)
    native = arithmetic.native_bf16(planned.hardware)[0]
    expected = "dtype: bfloat16 (auto: bfloat16, native here" if native else "dtype: float32 (auto: float32, as stored"
    assert any(line.startswith(expected) for line in notices(planned))
