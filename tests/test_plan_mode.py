"""mode=plan and mode=check: a readable, schema-checked plan before any weight memory, and map files checked as given."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_config
from runner.errors import MapError
from runner.plan.explain import explanation, notices, plan_document
from runner.plan.planned import plan
from runner.config.schema import schema_errors


def test_plan_mode_allocates_no_weights_and_explains_itself(tmp_path, runner_cache):
    planned = plan(compose_config("model=gpt2xl", "hardware=sim_2gpu", "placement=balanced_low_0", "mode=plan"),
                   tmp_path)
    assert all(p.is_meta for p in planned.model.parameters())
    assert not list(runner_cache.glob("synthetic/gpt2xl-*"))  # no synthetic weights written for a plan
    doc = plan_document(planned)
    assert schema_errors(doc, "plan") == []
    assert doc["order_source"] == "trace"
    rows = {r["name"]: r for r in doc["devices"]}
    assert rows["cuda:0"]["reserves"]["outputs"] == 50257 * 4  # the last position's logits: generation keeps no more
    # Keys and values of every block on cuda:1: 2 x 256 tokens x 1600 channels x 4 bytes each.
    on_1 = [name for name, device in planned.check.block_devices.items()
            if device == "cuda:1" and name.startswith("transformer.h.")]
    assert rows["cuda:1"]["reserves"]["kv_cache"] == len(on_1) * 2 * 256 * 1600 * 4
    assert all(r["free"] >= 0 for r in doc["devices"])
    assert [h["to"] for h in doc["hops"]] == ["cuda:1", "cuda:0"]
    assert doc["hops"][0]["bytes_per_token"] == 1600 * 4
    text = "\n".join(notices(planned))
    assert "tied weights: lm_head shares its weight with transformer.wte; both on cuda:0" in text
    assert "kept whole: 48 Block block(s)" in text
    assert "cuda:0 kept light" in text
    assert "nothing offloaded" in text
    assert all("->" in line for line in explanation(planned))


def test_offload_cost_and_disk_reasons_are_stated(tmp_path):
    planned = plan(compose_config("model=gpt2large", "hardware=cpu", "max_memory.cpu=1GiB", "mode=plan"), tmp_path)
    assert "disk" in planned.check.block_devices.values()
    assert any(n.startswith("offload cost: each forward streams") for n in notices(planned))
    lines = explanation(planned)
    assert any("-> disk" in line and "the CPU (" in line and "is full" in line for line in lines)
    assert any("-> cpu" in line and "no GPU: resident in RAM" in line for line in lines)


def test_allow_disk_false_says_how_much_is_missing(tmp_path):
    from runner.errors import PlanError

    with pytest.raises(PlanError, match=r"the model needs [0-9.]+ GiB more than the GPUs and the CPU can hold"):
        plan(compose_config("model=gpt2large", "hardware=cpu", "max_memory.cpu=1GiB", "offload.allow_disk=false"),
             tmp_path)


def test_check_mode_accepts_a_written_map_and_rejects_a_broken_one(tmp_path):
    planned = plan(compose_config("model=gpt2tiny", "hardware=sim_2gpu", "placement=balanced"), tmp_path)
    good = tmp_path / "plan.json"
    good.write_text(json.dumps(plan_document(planned)))
    checked = plan(compose_config("model=gpt2tiny", "hardware=sim_2gpu", "mode=check", f"map_file={good}"),
                   tmp_path)
    assert checked.check.block_devices == planned.check.block_devices

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"transformer.wte": "cuda:0", "transformer.h": "cuda:1", "transformer.h.0": "cpu",
                               "lm_head": "cuda:1", "transformer.wpe": "cuda:7"}))
    with pytest.raises(MapError) as e:
        plan(compose_config("model=gpt2tiny", "hardware=sim_2gpu", "mode=check", f"map_file={bad}"), tmp_path)
    assert e.value.lines == (
        "device_map.transformer.wpe: device 'cuda:7' is not in hardware=sim_2gpu; expected one of cuda:0, cuda:1, "
        "cpu, disk",
        "device_map: transformer.h and transformer.h.0 overlap; map each module once",
        "device_map: transformer.ln_f (LayerNorm) is not covered: transformer.ln_f.weight, transformer.ln_f.bias "
        "have no device; add transformer.ln_f to the map",
        "device_map: lm_head.weight is tied to transformer.wte.weight but they are on cuda:1 and cuda:0; tied "
        "weights must sit on one device",
    )


@pytest.mark.slow
def test_seq100b_plans_on_five_gpus_in_under_600mb(tmp_path):
    """In a fresh process, so that the peak RSS is planning's own. The time target (plan stage under 1 s) is
    ``bench/cli_bench.py``'s: a busy machine would fail it here without a bug."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest, gigabytes by now).
    code = ("from pathlib import Path\n"
            "from conftest import compose_config\n"
            "from runner.plan.planned import plan\n"
            f"p = plan(compose_config('model=seq100b', 'hardware=a100_8x80gb', 'mode=plan'), Path('{tmp_path}'))\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
            "print(hwm, len(set(p.check.block_devices.values())))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                         check=True).stdout.split()
    max_rss_kb, devices = int(out[0]), int(out[1])
    assert max_rss_kb < 600 * 1024
    assert devices == 5  # 400 GB over 79 GiB of room per GPU: five GPUs, no offload


def test_sizing_profiles_plan_without_the_hardware(tmp_path):
    for hw in ("a100_8x80gb", "h100_4x80gb", "rtx4090_2x"):
        planned = plan(compose_config("model=gpt2xl", f"hardware={hw}", "mode=plan"), tmp_path)
        assert set(planned.check.block_devices.values()) == {"cuda:0"}  # 6 GB fits one GPU: no hop at all
        assert planned.plan.reserves["cuda:0"]["cuda_context"] == 2**30


def test_kv_cache_is_reserved_only_for_models_that_keep_one():
    from types import SimpleNamespace

    from torch import nn

    from runner.plan.reserves import keeps_kv_cache
    from runner.zoo.gpt import GPT
    from runner.zoo.families import Llama

    assert keeps_kv_cache(GPT(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4))  # generation caches
    assert keeps_kv_cache(Llama(vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=1))
    assert keeps_kv_cache(nn.Sequential(nn.Linear(2, 2)))  # unknown: the safe side
    cached, uncached = nn.Linear(2, 2), nn.Linear(2, 2)
    cached.config, uncached.config = SimpleNamespace(use_cache=True), SimpleNamespace(use_cache=False)
    assert keeps_kv_cache(cached) and not keeps_kv_cache(uncached)  # a transformers model's config decides
