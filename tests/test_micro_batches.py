"""Micro-batches (``runtime.micro_batches``): K batches decode as a column, each streamed block brought in once per
step for all of them; outputs equal the plain run's, and the plan and errors name the key."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_config
from runner.errors import ConfigError, PlanError
from runner.infer.generate import GenerationStats, Request, generate
from runner.infer.sampling import SamplingParams
from runner.infer.engine import Engine

# gpt2tiny with 6 blocks (about 100 kB in fp32) and the KV cache of 8 rows on a CPU of 250 kB: the attention blocks
# stream in from disk every forward.
DISKY = ["model=gpt2tiny", "model.arch.n_layer=6", "hardware=cpu", "runtime.seq_len=24", "max_memory.cpu=250000B"]
PROMPTS = [(72, 101, 108), (108, 111, 44, 32), (119, 111), (114, 108, 100, 33, 7), (9, 9, 9), (50, 60, 70, 80, 90),
           (1,), (2, 3)]


class Ids:
    """A tokenizer stand-in: generation here works on token ids only."""

    eos_ids = frozenset()
    pad_id = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def run(result, batch_size: int, micro_batches: int, params: SamplingParams) -> tuple[list, GenerationStats, int]:
    requests = [Request(i, "", p) for i, p in enumerate(PROMPTS)]
    stats = GenerationStats()
    before = result.streams.loads
    done = generate(result.model, Ids(), requests, params, batch_size=batch_size, micro_batches=micro_batches,
                    seed=0, stats=stats, streams=result.streams)
    return [c.output_tokens for c in done], stats, result.streams.loads - before


@pytest.fixture(scope="module")
def disky(tmp_path_factory):
    result = Engine(compose_config(*DISKY, "runtime.micro_batches=4", "runtime.batch_size=2"),
                     tmp_path_factory.mktemp("mb")).loaded
    assert "disk" in result.check.block_devices.values()
    return result


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=6),
                                    SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20)],
                         ids=["greedy", "sampled"])
def test_a_column_gives_the_tokens_of_its_batches_run_one_by_one_with_a_quarter_of_the_loads(disky, params):
    plain, plain_stats, plain_loads = run(disky, 2, 1, params)
    column, stats, loads = run(disky, 2, 4, params)
    assert column == plain
    assert len({tuple(t) for t in plain}) > 1
    disk_blocks = sum(1 for d in disky.check.block_devices.values() if d == "disk")
    forwards = 1 + max(len(t) for t in plain) - 1  # prefill, then a step per new token after the first
    assert loads == disk_blocks * forwards  # one load per block per step, for all four batches
    assert plain_loads == disk_blocks * (4 + plain_stats.steps)  # every batch streams every block itself
    assert stats.batches == plain_stats.batches == 4 and stats.output_tokens == plain_stats.output_tokens
    assert disky.ledger.current["cpu"] <= disky.check.loads["cpu"] + max(
        b.nbytes for b in disky.layout.blocks) * 2  # nothing held past its column


def test_a_column_that_raises_drops_every_block_it_held(disky):
    """A forward that fails half-way leaves no streamed block held past the column."""
    params = SamplingParams(max_new_tokens=2)
    expected, _, _ = run(disky, 2, 4, params)
    baseline = disky.ledger.current["cpu"]
    bad = [Request(0, "", (1, 2)), Request(1, "", tuple(range(5000, 5003)))]  # token ids past the vocabulary
    with pytest.raises(IndexError):
        generate(disky.model, Ids(), bad, params, batch_size=1, micro_batches=2, seed=0, streams=disky.streams)
    assert not disky.streams.held
    assert run(disky, 2, 4, params)[0] == expected
    assert disky.ledger.current["cpu"] == baseline


def test_the_kv_cache_of_every_micro_batch_is_planned(tmp_path):
    one = Engine(compose_config(*DISKY[:-1], "max_memory.cpu=1GB", "runtime.batch_size=2"), tmp_path / "a").loaded
    four = Engine(compose_config(*DISKY[:-1], "max_memory.cpu=1GB", "runtime.batch_size=2",
                                  "runtime.micro_batches=4"), tmp_path / "b").loaded
    kv = lambda r: sum(r.request.kv_bytes.values())
    assert kv(four) == 4 * kv(one) > 0


def test_micro_batches_whose_kv_cache_cannot_fit_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(PlanError) as e:
        Engine(compose_config(*DISKY, "runtime.batch_size=2", "runtime.micro_batches=512"), tmp_path).loaded
    (line,) = e.value.lines
    assert line.startswith("runtime.micro_batches: 512 micro-batches of 2 rows keep a KV cache of ")
    assert "lower runtime.micro_batches" in line


@pytest.mark.parametrize("override,message", [
    ("runtime.micro_batches=0", "runtime.micro_batches: 0 is not valid; expected a whole number of batches decoded"),
    ("task=score", "runtime.micro_batches: micro-batches share streamed blocks"),
])
def test_bad_micro_batches_are_one_config_line(override, message):
    overrides = ["runtime.micro_batches=2", override] if override.startswith("task") else [override]
    with pytest.raises(ConfigError) as e:
        compose_config("model=gpt2tiny", *overrides)
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith(message), e.value.lines


def test_a_transformers_model_runs_its_micro_batches_one_after_another(tmp_path):
    """A model that cannot step block by block still gives every micro-batch's tokens (without the saving)."""
    from runner.infer.column import Call, SteppedLM, column

    class Plain(torch.nn.Module):
        def forward(self, idx, attention_mask=None, cache=None, logits_to_keep=0):
            return idx.float()[..., None] * 2

    assert not isinstance(Plain(), SteppedLM)
    out = column(Plain(), [Call(torch.tensor([[1, 2]])), Call(torch.tensor([[3]]))], streams=None)
    assert [o.squeeze(-1).tolist() for o in out] == [[[2.0, 4.0]], [[6.0]]]


def test_the_predicted_step_counts_each_resource_once_per_step_for_every_row(tmp_path):
    from runner.plan.planned import plan
    from runner.plan.throughput import Rates, step_cost

    planned = plan(compose_config(*DISKY, "runtime.batch_size=2", "runtime.micro_batches=4"), tmp_path)
    layout, devices = planned.layout, planned.check.block_devices
    disk = sum(b.nbytes for b in layout.blocks if devices[b.name] == "disk")
    wte = next(b for b in layout.blocks if b.name == "transformer.wte").nbytes
    # Every weight but the two lookup tables multiplies each row once; the tied head multiplies by wte's table.
    weights = sum(b.nbytes for b in layout.blocks if b.class_name != "Embedding") + wte
    attention = sum(planned.request.kv_bytes.values())  # half the cache read twice (keys and values), per row
    cost = step_cost(planned, Rates(disk=1e6, host_to_device=None, flops={"cpu": 1e9}))
    assert cost.rows == 8 and cost.disk_bytes == disk > 0 and cost.host_to_device_bytes == 0
    assert cost.flops == {"cpu": 2 * 8 * weights // 4 + attention // 4}
    assert cost.bound == "disk" and cost.seconds["disk"] == round(disk / 1e6, 6)
    assert cost.tokens_per_s == round(8 / (disk / 1e6), 3)
    assert cost.advice[0].startswith("disk bounds the step") and "runtime.micro_batches=" in cost.advice[0]
    fast_disk = step_cost(planned, Rates(disk=1e12, host_to_device=None, flops={"cpu": 1e6}))
    assert fast_disk.bound == "compute" and fast_disk.advice[0].startswith("compute bounds the step")


def test_mode_plan_shows_the_predicted_throughput(tmp_path):
    import json

    from runner.run.plan import run as run_plan

    config = compose_config(*DISKY, "mode=plan", "runtime.batch_size=2", "runtime.micro_batches=4")
    text, paths = run_plan(config, tmp_path)
    assert "tokens/s predicted for 8 sequences in flight, bound by " in text
    document = json.loads(paths["plan.json"].read_text())
    assert document["throughput"]["rows"] == 8 and document["throughput"]["rates"]["disk"] > 0
    assert document["runtime"]["micro_batches"] == 4


def test_the_pipeline_schedule_starts_each_micro_batch_stagger_blocks_after_the_last():
    from runner.infer.column import schedule

    running = dict.fromkeys(range(3))
    order = []
    steps = {j: 0 for j in running}
    for tick, j in schedule(running, stagger=2):
        order.append((tick, j))
        steps[j] += 1
        if steps[j] == 4:  # every micro-batch runs 4 blocks
            del running[j]
    assert order == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 1), (4, 2), (5, 1), (5, 2), (6, 2), (7, 2)]
    column = []
    running = dict.fromkeys(range(2))
    for tick, j in schedule(running, stagger=0):
        column.append(j)
        if len(column) == 4:
            running.clear()
    assert column == [0, 1, 0, 1]  # a column: every micro-batch through a block before the next block


def test_the_stagger_is_the_longest_gpu_stage_and_none_with_streamed_blocks():
    from runner.plan.blocks import Block
    from runner.plan.compute import Compute, pipeline_stagger

    blocks = tuple(Block(f"b{i}", "Block", 10, (f"b{i}.w",)) for i in range(6))
    where = ["cuda:0", "cuda:0", "cuda:0", "cuda:1", "cuda:1", "cpu"]
    compute = {b.name: Compute(d, False, "resident") for b, d in zip(blocks, where)}
    assert pipeline_stagger(blocks, compute) == 3
    assert pipeline_stagger(blocks, {**compute, "b3": Compute("cuda:0", False, ""), "b4": Compute("cuda:0", False, "")}
                            ) == 0  # one GPU: nothing to overlap
    assert pipeline_stagger(blocks, {**compute, "b5": Compute("cuda:0", True, "streamed")}) == 0


@pytest.mark.parametrize("hardware", ["sim_2gpu", "sim_4gpu"])
def test_micro_batches_run_as_a_pipeline_over_simulated_gpus_with_the_same_tokens(tmp_path, hardware):
    from runner.plan.compute import pipeline_stagger

    result = Engine(compose_config("model=gpt2tiny", "model.arch.n_layer=4", f"hardware={hardware}",
                                    "placement=balanced", "runtime.seq_len=24", "runtime.batch_size=2",
                                    "runtime.micro_batches=4"), tmp_path).loaded
    stagger = pipeline_stagger(result.layout.blocks, result.compute)
    assert stagger >= 2 and {"cuda:0", "cuda:1"} <= set(result.check.block_devices.values())
    entered: list[str] = []
    for block in result.layout.blocks:
        result.model.get_submodule(block.name).register_forward_pre_hook(
            lambda _m, _a, name=block.name: entered.append(name))
    requests = [Request(i, "", p) for i, p in enumerate(PROMPTS)]
    params = SamplingParams(max_new_tokens=5)
    alone = generate(result.model, Ids(), requests, params, batch_size=2, seed=0)
    entered.clear()
    piped = generate(result.model, Ids(), requests, params, batch_size=2, micro_batches=4, seed=0,
                     stagger=stagger)
    assert [c.output_tokens for c in piped] == [c.output_tokens for c in alone]
    # The prefill of the first micro-batch reaches cuda:1 before the last one has started on cuda:0.
    on_gpu1 = [b.name for b in result.layout.blocks if result.check.block_devices[b.name] == "cuda:1"]
    first = result.layout.blocks[0].name
    prefill = entered[:4 * len(result.layout.blocks)]
    assert min(prefill.index(n) for n in on_gpu1) < max(i for i, n in enumerate(prefill) if n == first)
