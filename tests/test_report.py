"""What a run tells the user: the map and device tables on screen, and the schema-checked files it writes.

One real run, loaded: the zoo GPT with six blocks over two simulated GPUs (``placement=balanced``),
``transformer.ln_f`` pinned to the CPU, fixed CPU and disk budgets so that every figure is exact.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_config
from runner.infer.generate import GenerationStats
from runner.infer.engine import Engine
from runner.plan.planned import plan
from runner.run.report import format_map, format_summary, write_documents, write_job_report, write_plan
from runner.run.job_stats import JobStats, job_document
from runner.config.schema import schema_errors

SIX = ("model=gpt2tiny", "model.arch.n_layer=6", "hardware=sim_2gpu", "placement=balanced", "max_memory.cpu=1GiB",
       "max_memory.disk=10GB", "+device_map.transformer.ln_f=cpu")
# fp32 weights: wte 256 x 16 x 4, wpe 64 x 16 x 4, a Block 13,120 B, ln_f 2 x 16 x 4; lm_head is tied to wte.
WTE, WPE, BLOCK, LN_F = 16384, 4096, 13120, 128
LOADS = {"cuda:0": WTE + WPE + 3 * BLOCK, "cuda:1": 3 * BLOCK, "cpu": LN_F, "disk": 0}
BUDGETS = {"cuda:0": 4 * 2**30, "cuda:1": 4 * 2**30, "cpu": 2**30, "disk": 10**10}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, runner_cache):
    return Engine(compose_config(*SIX), tmp_path_factory.mktemp("run")).loaded


def test_format_map_folds_numbered_siblings_on_one_device(loaded):
    assert format_map(loaded).splitlines() == [
        "module             device",
        "-----------------  ------",
        "transformer.wte    cuda:0",
        "transformer.wpe    cuda:0",
        "transformer.h.0-2  cuda:0",
        "transformer.h.3-5  cuda:1",
        "transformer.ln_f   cpu",
        "lm_head            cuda:0",
    ]


def test_format_map_keeps_a_single_block_and_a_gap_apart(tmp_path):
    planned = plan(compose_config("model=gpt2tiny", "model.arch.n_layer=4", "hardware=sim_2gpu",
                                  "placement=sequential", "+device_map.transformer.h.1=cuda:1"), tmp_path)
    rows = [line.split() for line in format_map(planned).splitlines()[2:]]
    assert rows == [["transformer.wte", "cuda:0"], ["transformer.wpe", "cuda:0"], ["transformer.h.0", "cuda:0"],
                    ["transformer.h.1", "cuda:1"], ["transformer.h.2-3", "cuda:0"], ["transformer.ln_f", "cuda:0"],
                    ["lm_head", "cuda:0"]]


def test_format_summary_shows_the_plan_and_the_ledger_per_device(loaded):
    lines = format_summary(loaded).splitlines()
    assert lines[:8] == format_map(loaded).splitlines() and lines[8] == ""
    assert lines[9].split() == ["device", "blocks", "planned", "reserve", "peak", "budget"]
    reserve = {d: sum(loaded.plan.reserves.get(d, {}).values()) for d in LOADS}
    assert reserve["cuda:0"] > 0 and reserve["disk"] == 0
    kib = lambda n: f"{n / 1024:.2f} KiB"  # noqa: E731
    # Every weight is resident after loading: the ledger's peak is the planned bytes.
    assert [line.split() for line in lines[10:14]] == [
        ["cuda:0*", "6", *kib(LOADS["cuda:0"]).split(), *kib(reserve["cuda:0"]).split(), *kib(LOADS["cuda:0"]).split(),
         "4.00", "GiB"],
        ["cuda:1*", "3", *kib(LOADS["cuda:1"]).split(), *kib(reserve["cuda:1"]).split(), *kib(LOADS["cuda:1"]).split(),
         "4.00", "GiB"],
        ["cpu", "1", "128", "B", *kib(reserve["cpu"]).split(), "128", "B", "1.00", "GiB"],
        ["disk", "0", "0", "B", "0", "B", "0", "B", "9.31", "GiB"],
    ]
    assert lines[14:] == ["* simulated: backed by CPU memory, budget enforced by the runner"]


def test_write_plan_writes_a_plan_json_equal_to_the_plan(loaded, tmp_path):
    paths = write_plan(loaded, tmp_path)
    assert paths == {"plan.json": tmp_path / "plan.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temporary file left
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert schema_errors(doc, "plan") == []
    assert doc["model"] == "gpt2tiny" and doc["strategy"] == "balanced" and doc["hardware"] == "sim_2gpu"
    assert doc["device_map"] == {**{f"transformer.h.{i}": "cuda:0" if i < 3 else "cuda:1" for i in range(6)},
                                 "transformer.wte": "cuda:0", "transformer.wpe": "cuda:0",
                                 "transformer.ln_f": "cpu", "lm_head": "cuda:0"}
    assert {d["name"]: d["weights"] for d in doc["devices"]} == LOADS == loaded.check.loads
    assert {d["name"]: d["reserves"] for d in doc["devices"]} == {d: loaded.plan.reserves.get(d, {}) for d in LOADS}
    assert {d["name"]: d["budget"] for d in doc["devices"]} == BUDGETS
    assert [b["name"] for b in doc["blocks"]] == list(loaded.check.block_devices)


def test_write_job_report_writes_the_map_and_a_report_equal_to_the_run(loaded, tmp_path):
    job = job_document(JobStats(total=3, done=2, skipped=1), loaded.config)
    paths = write_job_report(loaded, tmp_path, job, GenerationStats())
    assert paths == {name: tmp_path / name for name in ("device_map.json", "report.json")}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(paths)  # no temporary file left
    device_map = json.loads((tmp_path / "device_map.json").read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    assert schema_errors(device_map, "device_map") == [] and schema_errors(report, "report") == []

    assert device_map["model"] == "gpt2tiny" and device_map["strategy"] == "balanced"
    assert {b["name"]: b["device"] for b in device_map["blocks"]} == loaded.check.block_devices
    assert [b["bytes"] for b in device_map["blocks"]] == [WTE, WPE, *[BLOCK] * 6, LN_F, 0]
    assert device_map["device_map"]["transformer.ln_f"] == "cpu"

    assert report["model"] == {"name": "gpt2tiny", "target": "runner.zoo.gpt.GPT", "path": "zoo", "config": None,
                               "bytes": sum(LOADS.values()), "blocks": 10}
    assert report["dtype"] == "float32" and report["strategy"] == "balanced"
    assert report["hardware"] == {"name": "sim_2gpu", "main_device": "cuda:0"}
    devices = {d["name"]: d for d in report["devices"]}
    assert list(devices) == ["cuda:0", "cuda:1", "cpu", "disk"]
    for name, d in devices.items():
        reserves = loaded.plan.reserves.get(name, {})
        assert (d["budget"], d["planned_bytes"], d["reserves"], d["reserve"]) == (
            BUDGETS[name], LOADS[name], reserves, sum(reserves.values())), name
        assert d["peak_bytes"] == d["resident_bytes"] == LOADS[name], name  # everything loaded, nothing streamed
        assert d["predicted_peak_bytes"] == LOADS[name] + sum(reserves.values()) + d["baseline_bytes"], name
        assert (d["baseline_bytes"] > 0) == (name == "cpu"), name  # the process before the load: CPU only
    assert devices["cuda:0"]["simulated"] and devices["cuda:0"]["measured_peak_bytes"] is None
    assert devices["cpu"]["measured_by"].startswith("process peak RSS") and devices["cpu"]["measured_peak_bytes"] > 0
    assert report["checkpoint"]["source"] == "synthetic" and report["checkpoint"]["ignored_keys"] == []
    assert [f["path"] for f in report["checkpoint"]["files"]] == [str(f) for f in loaded.checkpoint.files]
    # The tied head on cuda:0 after cuda:1: one hop back (and, maybe, the test process's own memory since the load).
    assert [w for w in report["warnings"] if "measured peak" not in w] == list(loaded.check.warnings)
    assert any("cuda:1 -> cuda:0" in w for w in report["warnings"])
    assert {"build", "plan", "validate", "load"} <= set(report["timings"])
    assert report["config"]["placement"]["strategy"] == "balanced"
    assert report["job"]["rows"] == {"total": 3, "done": 2, "skipped": 1, "resumed": 0}
    assert report["job"]["batch_latency_s"] is None and report["generation"]["requests"] == 0


def test_a_document_that_breaks_its_schema_is_not_written(tmp_path):
    with pytest.raises(RuntimeError, match=r"^output does not match its schema \(a bug in the runner\): plan\.json: "):
        write_documents(tmp_path / "run", {"plan.json": ({"model": "gpt2tiny"}, "plan")})
    assert not (tmp_path / "run").exists()


def test_a_measured_peak_above_the_prediction_is_a_warning(tmp_path):
    """Memory outside the plan shows: the report and the screen say which device, and both figures."""
    from runner.run.report import memory_warnings, report_document

    result = Engine(compose_config("model=gpt2tiny", "hardware=cpu"), tmp_path).loaded
    assert not [w for w in report_document(result)["warnings"] if "measured peak" in w]
    held = torch.ones(int(1.5 * result.baseline_rss) // 4)  # touched: resident, and nowhere in the plan
    (line,) = [w for w in report_document(result)["warnings"] if "measured peak" in w]
    assert line.startswith("cpu: measured peak ") and "x the plan's prediction of " in line
    del held
    doc = {"name": "cuda:0", "measured_peak_bytes": 12 * 2**30, "predicted_peak_bytes": 10 * 2**30,
           "measured_by": "torch.cuda.max_memory_allocated"}
    assert memory_warnings([doc]) == [
        "cuda:0: measured peak 12.00 GiB (torch.cuda.max_memory_allocated) is 1.20x the plan's prediction of "
        "10.00 GiB; memory outside the plan is in use, and a tighter budget may fail"]
    assert memory_warnings([{**doc, "measured_peak_bytes": 11 * 2**30}]) == []  # within 10%
