"""A mixture's experts as placement units: dense parts first, experts in the room left, disk experts read only when
a token routes to them. Checked on hand-sized blocks (exact maps) and on tiny Mixtral and Qwen3-MoE checkpoints that
transformers writes (outputs identical to all-resident, bytes read equal to the routed experts' bytes)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_config, run_in_process
from runner.errors import MapError, PlanError
from runner.infer.engine import Engine
from runner.plan.blocks import Block
from runner.plan.hardware import Device
from runner.plan.planner import PlanRequest, plan_device_map

transformers = pytest.importorskip("transformers")
from test_families import FAMILIES, PROMPTS, left_padded, write_checkpoint  # noqa: E402 -- after the skip


def layer_with_experts(layer: str, dense: int, expert: int, n: int = 4, k: int = 2) -> list[Block]:
    return [Block(layer, "Layer", dense, (f"{layer}.attn.weight",)),
            *(Block(f"{layer}.mlp.experts.{i}", "Expert", expert, (f"{layer}.mlp.experts.{i}.weight",),
                    within=layer, share=k / n) for i in range(n))]


# An embedding and a head of 10 B, two layers of 20 B dense parts with four 8 B experts each.
BLOCKS = (Block("emb", "Embedding", 10, ("emb.weight",)), *layer_with_experts("l0", 20, 8),
          *layer_with_experts("l1", 20, 8), Block("head", "Linear", 10, ("head.weight",)))


def plan(gpu: int, cpu: int, **kwargs):
    devices = (Device("cuda:0", "gpu", gpu, simulated=True), Device("cpu", "cpu", cpu), Device("disk", "disk", 10**9))
    return plan_device_map(PlanRequest(BLOCKS, devices, "sequential", "cuda:0", **kwargs))


def test_dense_parts_go_first_and_experts_fill_the_room_left_in_turns_across_layers():
    result = plan(gpu=60, cpu=40)
    # The dense parts (50 B on the GPU) leave 2 B there beside the 8 B kept to read one disk expert into; the head
    # goes to the CPU; the CPU's other 30 B take three experts, dealt out layer by layer; the rest wait on disk.
    assert result.device_map == {
        "emb": "cuda:0", "l0": "cuda:0",
        "l0.mlp.experts.0": "cpu", "l0.mlp.experts.1": "cpu", "l0.mlp.experts.2": "disk", "l0.mlp.experts.3": "disk",
        "l1": "cuda:0",
        "l1.mlp.experts.0": "cpu", "l1.mlp.experts.1": "disk", "l1.mlp.experts.2": "disk", "l1.mlp.experts.3": "disk",
        "head": "cpu"}
    assert result.reserves["cuda:0"] == {"expert_staging": 8}
    assert result.loads == {"cuda:0": 50, "cpu": 34, "disk": 40}


def test_experts_take_the_gpu_room_the_dense_parts_leave():
    result = plan(gpu=100, cpu=40)
    on_gpu = [n for n, d in result.device_map.items() if d == "cuda:0" and "experts" in n]
    assert on_gpu == ["l0.mlp.experts.0", "l0.mlp.experts.1", "l0.mlp.experts.2", "l1.mlp.experts.0",
                      "l1.mlp.experts.1"]  # 40 B of room: five experts, the first three of l0 and two of l1
    assert "disk" not in result.device_map.values() and "expert_staging" not in result.reserves.get("cuda:0", {})


def test_a_pinned_expert_keeps_its_pin_and_no_disk_is_a_clear_error():
    assert plan(gpu=100, cpu=40, pins={"l1.mlp.experts.3": "disk"}).device_map["l1.mlp.experts.3"] == "disk"
    with pytest.raises(PlanError) as raised:
        plan(gpu=60, cpu=40, allow_disk=False)
    assert raised.value.lines[0].startswith("the experts need 24 B more than the GPUs and the CPU hold after the "
                                            "dense parts (offload.allow_disk is false)")


def test_a_budget_leaving_the_first_layers_dense_parts_on_disk_is_one_line():
    with pytest.raises(PlanError) as raised:
        plan(gpu=25, cpu=12)
    (line,) = raised.value.lines
    assert line.startswith("the dense parts of l0 (20 B: attention, norms, router) fit nowhere but disk: the dense "
                           "parts of every layer need ")
    assert "raise max_memory.cpu by that much" in line


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_checkpoint(folder, request.param, FAMILIES[request.param])
    return folder


# Budgets (and, for Qwen3-MoE's smaller experts, one pin) that spread each family's experts over the simulated GPUs,
# the CPU and disk.
SPREAD = {"mixtral": ("hardware=sim_2gpu", "+max_memory.0=700KB", "+max_memory.1=200KB", "max_memory.cpu=250KB",
                      "runtime.seq_len=16", "offload.prefetch=1"),
          "qwen3_moe": ("hardware=sim_2gpu", "+max_memory.0=560KB", "+max_memory.1=200KB", "max_memory.cpu=150KB",
                        "runtime.seq_len=16", "offload.prefetch=1", "+device_map={model.layers.2.mlp.experts.3: disk}")}


def spread_of(folder) -> tuple[str, ...]:
    return SPREAD[folder.name.rstrip("0123456789")]


def engine(folder, tmp_path, *overrides):
    return Engine(compose_config("checkpoint=local", f"checkpoint.path={folder}", "dtype=float32", *overrides),
                  tmp_path)


def routed_experts(model, rows, mask) -> list[str]:
    """The experts a forward runs (each once), in the order it runs them."""
    ran = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: ran.append(name))
               for name, m in model.named_modules() if name.rpartition(".")[0].endswith("mlp.experts")]
    with torch.inference_mode():
        model(rows, attention_mask=mask)
    for h in handles:
        h.remove()
    return ran


def test_experts_spread_over_gpus_cpu_and_disk_give_the_all_resident_outputs(moe, tmp_path):
    rows, mask = left_padded(PROMPTS)
    resident = engine(moe, tmp_path / "all", "hardware=cpu").loaded
    spread = engine(moe, tmp_path / "spread", *spread_of(moe)).loaded
    devices = spread.check.block_devices
    tiers = {devices[b.name] for b in spread.layout.blocks if b.expert}
    assert {"cpu", "disk"} < tiers and tiers - {"cpu", "disk"} <= {"cuda:0", "cuda:1"}  # and a GPU or two
    assert all(devices[b.name] != "disk" for b in spread.layout.blocks if not b.expert)
    with torch.inference_mode():
        expected = resident.model(rows, attention_mask=mask)
        assert torch.equal(spread.model(rows, attention_mask=mask), expected)
        assert torch.equal(spread.model(rows, attention_mask=mask), expected)  # again, after every expert is dropped


def test_a_step_reads_exactly_the_routed_disk_experts(moe, tmp_path):
    rows, mask = left_padded(PROMPTS[:1])
    spread = engine(moe, tmp_path / "spread", "hardware=cpu", "+device_map={model.layers.*.mlp.experts: disk}").loaded
    devices, sizes = spread.check.block_devices, {b.name: b.nbytes for b in spread.layout.blocks}
    streams = spread.streams.experts
    baseline = spread.ledger.current["cpu"]
    ran = routed_experts(spread.model, rows[:, -1:], mask[:, -1:])  # one token: a few experts per layer
    assert 0 < len(ran) < sum(1 for name, device in devices.items() if device == "disk" and ".experts." in name)
    assert streams.loaded_bytes == sum(sizes[name] for name in ran)
    # Dropped after running, into the cache (room to spare here): counted there, and nowhere else.
    assert spread.ledger.current["cpu"] == baseline + streams.cached_total == baseline + streams.loaded_bytes


def test_pins_by_pattern_place_every_layers_experts(moe, tmp_path):
    result = engine(moe, tmp_path, "hardware=cpu", "+device_map={model.layers.*.mlp.experts:disk}").loaded
    devices = result.check.block_devices
    assert {devices[b.name] for b in result.layout.blocks if b.expert} == {"disk"}
    assert {devices[b.name] for b in result.layout.blocks if not b.expert} == {"cpu"}


@pytest.mark.parametrize("pin, expected", [
    ("+device_map={model.layers.0.mlp.experts.1.up_proj:disk}",
     "device_map.model.layers.0.mlp.experts.1.up_proj: it is inside expert model.layers.0.mlp.experts.1, which "
     "cannot be split across devices; pin model.layers.0.mlp.experts.1 instead"),
    ("+device_map={model.layers.*.mlp.expert:disk}",
     "device_map.model.layers.*.mlp.expert: the pattern matches no module of the model ('*' stands for one part of "
     "a dotted name, as in model.layers.*.mlp.experts)"),
])
def test_bad_expert_pins_are_one_line(moe, tmp_path, pin, expected):
    with pytest.raises(MapError) as raised:
        engine(moe, tmp_path, "hardware=cpu", pin)
    assert raised.value.lines == (expected,)


def test_mode_plan_shows_each_layers_experts_per_tier(moe, tmp_path):
    outcome, errors = run_in_process(tmp_path, "checkpoint=local", f"checkpoint.path={moe}", "mode=plan",
                                     "dtype=float32", *spread_of(moe))
    assert errors == []
    plan = json.loads((tmp_path / "plan.json").read_text())
    blocks = {b["name"]: b["device"] for b in plan["blocks"]}
    for layer in plan["experts"]["layers"]:
        tiers = {}
        for name, device in blocks.items():
            if name.startswith(layer["layer"] + ".mlp.experts."):
                tiers[device] = tiers.get(device, 0) + 1
        assert layer["tiers"] == tiers and layer["per_token"] == 2
    assert 0 < plan["experts"]["disk_bytes_per_token"] <= plan["experts"]["disk_bytes_per_step"]
    assert "experts:" in outcome.text


def test_experts_stay_with_their_layer_when_asked(moe, tmp_path):
    result = engine(moe, tmp_path, "hardware=cpu", "offload.experts_apart=false").loaded
    assert not result.layout.has_experts
    assert all(".experts." not in b.name for b in result.layout.blocks)


def test_a_pattern_in_an_override_key_says_how_to_write_it(tmp_path):
    outcome, errors = run_in_process(tmp_path, "+device_map.model.layers.*.mlp.experts=cpu", "mode=plan")
    assert outcome is None and len(errors) == 1
    assert errors[0].endswith("; a device_map pattern goes in a mapping: '+device_map={model.layers.*.mlp.experts: "
                              "cpu}'")


def test_micro_batches_share_each_disk_expert_read(moe, tmp_path):
    """Two micro-batches in a column: a disk expert either routes to is read once for both, and kept for the
    second until the layer has run for both."""
    from runner.infer.column import Call, column

    rows, mask = left_padded(PROMPTS[:2])
    spread = engine(moe, tmp_path / "spread", "hardware=sim_2gpu", "runtime.seq_len=16", "runtime.micro_batches=2",
                    "+device_map={model.layers.*.mlp.experts: disk}").loaded
    devices, sizes = spread.check.block_devices, {b.name: b.nbytes for b in spread.layout.blocks}
    calls = [Call(rows[i:i + 1, -2:], mask[i:i + 1, -2:]) for i in range(2)]
    streams = spread.streams.experts
    streams.cache_bytes = 0  # every read counted: none spared by the cache of dropped experts
    routed = [set(routed_experts(spread.model, c.idx, c.attention_mask)) for c in calls]
    before, baseline = streams.loaded_bytes, spread.ledger.current["cpu"]
    with torch.inference_mode():
        together = column(spread.model, calls, spread.streams)
        alone = [spread.model(c.idx, attention_mask=c.attention_mask) for c in calls]
    union = {name for name in routed[0] | routed[1] if devices[name] == "disk"}
    each = sum(sizes[name] for r in routed for name in r if devices[name] == "disk")
    assert union and streams.loaded_bytes - before - each == sum(sizes[name] for name in union)
    assert all(torch.equal(t, a) for t, a in zip(together, alone))
    assert spread.ledger.current["cpu"] == baseline


def test_experts_read_in_stay_in_the_room_the_plan_left_free(moe, tmp_path):
    """Every expert pinned to disk, with RAM to spare: what a forward reads stays cached, and the same tokens again
    read nothing."""
    rows, mask = left_padded(PROMPTS[:1])
    spread = engine(moe, tmp_path / "spread", "hardware=cpu", "+device_map={model.layers.*.mlp.experts: disk}").loaded
    streams = spread.streams.experts
    assert streams.cache_bytes > sum(b.nbytes for b in spread.layout.blocks if b.expert)
    first = routed_experts(spread.model, rows[:, -1:], mask[:, -1:])
    read, hits = streams.loaded_bytes, streams.hits
    assert read == sum(b.nbytes for b in spread.layout.blocks if b.name in first) and hits == 0
    assert routed_experts(spread.model, rows[:, -1:], mask[:, -1:]) == first
    assert streams.loaded_bytes == read and streams.hits == len(first)
    # and the report says so
    outcome, errors = run_in_process(tmp_path / "run", "checkpoint=local", f"checkpoint.path={moe}", "hardware=cpu",
                                     "+device_map={model.layers.*.mlp.experts: disk}", "task.max_new_tokens=4",
                                     f"data.prompts={json.dumps(PROMPTS)}")
    assert errors == []
    experts = json.loads((tmp_path / "run" / "report.json").read_text())["experts"]
    assert experts["loads"] > 0 and experts["cache"]["hits"] > 0 and 0 < experts["cache"]["hit_rate"] < 1


def test_a_main_device_without_room_to_read_experts_into_is_one_line():
    with pytest.raises(PlanError) as raised:
        plan(gpu=5, cpu=100)
    assert raised.value.lines == ("cuda:0: reading experts in from disk needs 8 B there (the running one and 0 read "
                                  "ahead), and 5 B is left after its reserves; raise it (+max_memory.0=<size>) or "
                                  "lower offload.prefetch",)
