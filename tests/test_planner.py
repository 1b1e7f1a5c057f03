"""Exact maps on hand-sized models, for every strategy, with pins, reserves and impossible budgets."""
from __future__ import annotations

import pytest
import torch

from runner.plan.blocks import Block, describe_model
from runner.load.build import build_skeleton
from runner.config import ModelSpec
from runner.errors import PlanError
from runner.plan.hardware import Device
from runner.plan.planner import PlanRequest, plan_device_map

DISK = 10**12


def block(name: str, nbytes: int, tied_to: str | None = None) -> Block:
    return Block(name, "Block", nbytes, (f"{name}.weight",), tied_to)


# An embedding (40 B) whose weight the head (0 B of its own) shares, four 20 B blocks and a 4 B norm.
BLOCKS = [block("emb", 40), block("b0", 20), block("b1", 20), block("b2", 20), block("b3", 20), block("norm", 4),
          block("head", 0, tied_to="emb")]


def devices(*gpus: int, cpu: int = 100, gpu_ids: tuple[int, ...] | None = None) -> list[Device]:
    ids = gpu_ids or tuple(range(len(gpus)))
    return ([Device(f"cuda:{i}", "gpu", b) for i, b in zip(ids, gpus)]
            + [Device("cpu", "cpu", cpu), Device("disk", "disk", DISK)])


def plan(strategy: str, devs: list[Device], pins: dict[str, str] | None = None, blocks=BLOCKS, **kwargs):
    gpus = [d.name for d in devs if d.kind == "gpu"]
    return plan_device_map(PlanRequest(tuple(blocks), tuple(devs), strategy, gpus[0] if gpus else "cpu",
                                       pins or {}, **kwargs))


def as_runs(device_map: dict[str, str]) -> list[tuple[str, list[str]]]:
    runs: list[tuple[str, list[str]]] = []
    for name, device in device_map.items():
        if runs and runs[-1][0] == device:
            runs[-1][1].append(name)
        else:
            runs.append((device, [name]))
    return runs


def test_sequential_fills_gpu0_first():
    p = plan("sequential", devices(80, 80))
    assert p.device_map == {"emb": "cuda:0", "b0": "cuda:0", "b1": "cuda:0", "b2": "cuda:1", "b3": "cuda:1",
                            "norm": "cuda:1", "head": "cuda:0"}
    assert p.loads == {"cuda:0": 80, "cuda:1": 44, "cpu": 0, "disk": 0}
    assert p.reserves == {}


def test_balanced_is_the_most_even_contiguous_split():
    # Splits of 124 B over two GPUs: 40+20 | 64 is the smallest maximum.
    assert plan("balanced", devices(80, 80)).device_map == {
        "emb": "cuda:0", "b0": "cuda:0", "b1": "cuda:1", "b2": "cuda:1", "b3": "cuda:1", "norm": "cuda:1",
        "head": "cuda:0"}
    # Over three GPUs: 40 | 40 | 44.
    assert plan("balanced", devices(80, 80, 80)).device_map == {
        "emb": "cuda:0", "b0": "cuda:1", "b1": "cuda:1", "b2": "cuda:2", "b3": "cuda:2", "norm": "cuda:2",
        "head": "cuda:0"}


def test_balanced_low_0_keeps_gpu0_empty_when_the_others_suffice():
    p = plan("balanced_low_0", devices(80, 80, 80))
    assert p.device_map == {"emb": "cuda:1", "b0": "cuda:1", "b1": "cuda:2", "b2": "cuda:2", "b3": "cuda:2",
                            "norm": "cuda:2", "head": "cuda:1"}
    assert p.loads["cuda:0"] == 0


def test_balanced_low_0_gives_gpu0_only_the_prefix_that_does_not_fit_elsewhere():
    # GPUs 1 and 2 hold 50 B each: emb + b0 (60 B) cannot all go there, so GPU 0 takes emb.
    p = plan("balanced_low_0", devices(80, 50, 50))
    assert as_runs(p.device_map) == [("cuda:0", ["emb"]), ("cuda:1", ["b0", "b1"]), ("cuda:2", ["b2", "b3", "norm"]),
                                     ("cuda:0", ["head"])]


def test_non_contiguous_gpu_ids_are_used_in_order():
    p = plan("balanced", devices(80, 80, 80, gpu_ids=(0, 2, 3)))
    assert {d for d in p.device_map.values()} == {"cuda:0", "cuda:2", "cuda:3"}
    assert p.device_map["b0"] == "cuda:2" and p.device_map["norm"] == "cuda:3"


def test_low_0_with_gap_ids_spreads_over_the_others():
    p = plan("balanced_low_0", devices(80, 80, 80, gpu_ids=(0, 2, 3)))
    assert p.loads["cuda:0"] == 0 and p.loads["cuda:2"] == 60 and p.loads["cuda:3"] == 64


@pytest.mark.parametrize("strategy", ["sequential", "balanced", "balanced_low_0"])
def test_too_little_gpu_memory_degenerates_to_gpus_then_cpu_then_disk(strategy):
    # 124 B over 2 x 30 B GPUs and a 50 B CPU. The 40 B embedding fits no GPU, so it goes to the CPU
    # without using up the GPUs; disk blocks stream into cuda:0, so 20 B are reserved there.
    p = plan(strategy, devices(30, 30, cpu=50))
    assert p.device_map == {"emb": "cpu", "b0": "cuda:1", "b1": "disk", "b2": "disk", "b3": "disk", "norm": "disk",
                            "head": "cpu"}
    assert p.reserves == {"cuda:0": {"offload_staging": 20}}
    assert p.loads == {"cuda:0": 0, "cuda:1": 20, "cpu": 40, "disk": 64}


def test_auto_finds_the_partition_with_the_fewest_bytes_off_gpu():
    # Same budgets. Disk is unavoidable (124 B > 30 + 30 + 50), and streaming a 20 B block in leaves
    # cuda:0 only 10 B, so one GPU is left for blocks: auto puts b3 and the 4 B norm there (24 B),
    # 100 B off GPU where the fill leaves 104.
    p = plan("auto", devices(30, 30, cpu=50))
    assert p.device_map == {"emb": "cpu", "b0": "disk", "b1": "disk", "b2": "disk", "b3": "cuda:1",
                            "norm": "cuda:1", "head": "cpu"}
    assert p.loads == {"cuda:0": 0, "cuda:1": 24, "cpu": 40, "disk": 60}
    assert p.reserves == {"cuda:0": {"offload_staging": 20}}


def test_no_reserve_when_nothing_is_on_disk():
    p = plan("sequential", devices(60, cpu=100))
    assert p.device_map["b1"] == "cpu" and "disk" not in p.device_map.values()
    assert p.reserves == {}


def test_cpu_only_hardware_spills_to_disk_and_reserves_on_cpu():
    p = plan("auto", devices(cpu=90))
    # Without a reserve the CPU would take emb, b0, b1 (80 B); but disk blocks stream into the CPU,
    # and 80 + the 20 B reserve is over 90 B, so b1 moves to disk too.
    assert as_runs(p.device_map) == [("cpu", ["emb", "b0"]), ("disk", ["b1", "b2", "b3", "norm"]), ("cpu", ["head"])]
    assert p.reserves == {"cpu": {"offload_staging": 20}}


@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_kv_caches_of_disk_blocks_count_in_the_staging_room(strategy):
    # b0 holds no weights but a 2 B KV cache; b1 and b2 (5 B) fit neither beside it on the 3 B GPU nor on the 3 B
    # CPU, so they go to disk and stream into cuda:0, which keeps 3 B for the bigger one and can hold nothing
    # else: b0 goes to the CPU. auto once found no map here: its staging room jumped from 0 past 3 B to 5 B.
    p = plan(strategy, devices(3, cpu=3), blocks=[block("b0", 0), block("b1", 2), block("b2", 3)],
             kv_bytes={"b0": 2})
    assert p.device_map == {"b0": "cpu", "b1": "disk", "b2": "disk"}
    assert p.loads == {"cuda:0": 0, "cpu": 0, "disk": 5}
    assert p.reserves == {"cpu": {"kv_cache": 2}, "cuda:0": {"offload_staging": 3}}


def test_without_disk_the_shortfall_counts_kv_caches():
    # b0 (10 B) fills cuda:1; b1 holds no weights but a 1 B KV cache, which fits neither cuda:0 (GPUs run in id
    # order, and cuda:0 comes before b0's cuda:1) nor the 0 B CPU. With disk it streams into cuda:0; without,
    # the model needs 1 B more (once '0 B': only the weights of what would go to disk were counted).
    blocks = [block("b0", 10), block("b1", 0)]
    assert plan("auto", devices(1, 10, cpu=0), blocks=blocks, kv_bytes={"b1": 1}).device_map == {
        "b0": "cuda:1", "b1": "disk"}
    with pytest.raises(PlanError) as e:
        plan("auto", devices(1, 10, cpu=0), blocks=blocks, kv_bytes={"b1": 1}, allow_disk=False)
    assert e.value.lines == ("the model needs 1 B more than the GPUs and the CPU can hold (offload.allow_disk is "
                             "false); raise max_memory, use a smaller dtype, or set offload.allow_disk=true",)


@pytest.mark.parametrize("strategy", ["sequential", "balanced", "balanced_low_0"])
def test_pins_are_kept_and_the_rest_planned_around_them(strategy):
    p = plan(strategy, devices(80, 80), pins={"b3": "cpu", "emb": "cuda:1", "head": "cuda:1"})
    assert p.device_map["b3"] == "cpu"
    assert p.device_map["emb"] == p.device_map["head"] == "cuda:1"
    assert p.loads["cpu"] == 20
    assert p.loads["cuda:0"] + p.loads["cuda:1"] == 104


def test_auto_keeps_pins_and_each_device_contiguous():
    # emb pinned to cuda:1 comes first, and GPUs run in ascending order, so cuda:0 cannot follow:
    # cuda:1 takes emb, b0, b1 (80 B) and the CPU the rest, around the pinned b3.
    p = plan("auto", devices(80, 80), pins={"b3": "cpu", "emb": "cuda:1", "head": "cuda:1"})
    assert as_runs(p.device_map) == [("cuda:1", ["emb", "b0", "b1"]), ("cpu", ["b2", "b3", "norm"]),
                                     ("cuda:1", ["head"])]


def test_exact_map_with_pins_sequential():
    # cuda:0 takes emb (40 B); b0 and b2 fill cuda:1; b3 and norm go on to the CPU, beside the pinned b1.
    p = plan("sequential", devices(50, 50), pins={"b1": "cpu"})
    assert p.device_map == {"emb": "cuda:0", "b0": "cuda:1", "b1": "cpu", "b2": "cuda:1", "b3": "cpu",
                            "norm": "cpu", "head": "cuda:0"}


def test_a_pin_on_one_tied_block_carries_the_other():
    p = plan("sequential", devices(80, 80), pins={"head": "cpu"})
    assert p.device_map["emb"] == "cpu" and p.device_map["head"] == "cpu"


def test_tied_blocks_pinned_apart_is_an_error():
    with pytest.raises(PlanError, match="share tied weights"):
        plan("sequential", devices(80, 80), pins={"emb": "cuda:0", "head": "cuda:1"})


def test_pins_over_a_budget_are_an_error():
    with pytest.raises(PlanError, match=r"cuda:0: pinned blocks need 60 B, 50 B is left of its budget after reserves"):
        plan("sequential", devices(50, 50), pins={"b0": "cuda:0", "b1": "cuda:0", "b2": "cuda:0"})


def test_a_block_bigger_than_every_device_names_it_and_the_budgets():
    with pytest.raises(PlanError) as e:
        plan("auto", devices(30, 30, cpu=35))
    assert e.value.lines == ("block emb + head (40 B) cannot be split and fits no device: cuda:0 30 B, cuda:1 30 B, "
                             "cpu 35 B after reserves; disk 931.32 GiB (a block planned on disk must still fit the device it runs on); raise "
                             "max_memory, e.g. +max_memory.0=<size>, or use a smaller dtype",)


def test_plans_are_deterministic():
    maps = {tuple(plan("balanced_low_0", devices(80, 50, 50)).device_map.items()) for _ in range(5)}
    assert len(maps) == 1


def test_gpt2tiny_sizes_are_counted_by_hand():
    spec = ModelSpec("gpt2tiny", {"_target_": "runner.zoo.gpt.GPT", "vocab_size": 256, "block_size": 64,
                                  "n_layer": 2, "n_head": 2, "n_embd": 16}, ("Block",))
    layout = describe_model(build_skeleton(spec), spec.no_split_module_classes, torch.float32)
    # wte 256x16, wpe 64x16, a Block: 2 LayerNorms (2x16 each), c_attn 16x48+48, c_proj 16x16+16,
    # c_fc 16x64+64, mlp.c_proj 64x16+16; the head shares wte's weight; all fp32.
    block_bytes = 4 * (2 * 32 + 16 * 48 + 48 + 16 * 16 + 16 + 16 * 64 + 64 + 64 * 16 + 16)
    assert [(b.name, b.nbytes, b.tied_to) for b in layout.blocks] == [
        ("transformer.wte", 256 * 16 * 4, None), ("transformer.wpe", 64 * 16 * 4, None),
        ("transformer.h.0", block_bytes, None), ("transformer.h.1", block_bytes, None),
        ("transformer.ln_f", 128, None), ("lm_head", 0, "transformer.wte")]
    assert layout.ties == {"lm_head.weight": "transformer.wte.weight"}
    half = describe_model(build_skeleton(spec), spec.no_split_module_classes, torch.bfloat16)
    assert half.total_bytes * 2 == layout.total_bytes
