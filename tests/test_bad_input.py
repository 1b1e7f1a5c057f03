"""Bad input ends in one ``error: <stage>: ...`` line per problem and exit code 2, never a traceback.

The cases run what ``python -m runner`` runs (Hydra's composition, the job's status, the recipe) in this process,
and one of them through the real command line for the exit code and stderr; a map the planner can never produce
(uncovered, overlapping, tied weights apart, over budget) is checked against the validator directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_in_process

from runner.plan.blocks import ModelLayout, describe_model
from runner.load.build import build_skeleton
from runner.config import ModelSpec
from runner.errors import MapError
from runner.plan.hardware import Device, Hardware
from runner.plan.validate import check_map

TINY = ("model=gpt2tiny", "task.max_new_tokens=2")
TINY_ARCH = {"_target_": "runner.zoo.gpt.GPT", "vocab_size": 256, "block_size": 64,
             "n_layer": 2, "n_head": 2, "n_embd": 16}


def error_line(run_dir: Path, *overrides: str) -> str:
    """Run the job on bad input; check the contract every failure shares; return its one error line."""
    outcome, lines = run_in_process(run_dir, *overrides)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    assert not (run_dir / "report.json").exists()
    if outcome is not None:  # the folder says the job failed, and why
        assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    return lines[0]


def assert_line(line: str, stage: str, *substrings: str) -> None:
    assert line.startswith(f"error: {stage}: "), line
    for s in substrings:
        assert s in line, f"{s!r} not in {line!r}"


# (overrides, stage, substrings the one error line must contain)
CASES = {
    "group-option-typo": (("placement=balancd",), "config",
                          ("'placement/balancd'", "Available options", "balanced_low_0", "sequential")),
    "unknown-key-plus": (("+foo=1",), "config", ("foo: unknown key", "expected one of", "task", "tokenizer")),
    # generation settings
    "temperature-below-zero": (("task.temperature=-0.5",), "config",
                               ("task.temperature: -0.5 is not valid; expected 0 (greedy) or a positive temperature",)),
    "top-p-zero": (("task.top_p=0",), "config", ("task.top_p: 0",)),
    "log-every-nan": (("runtime.log_every=nan",), "config",
                      ("runtime.log_every: nan is not valid; expected seconds between progress lines",)),
    "top-p-above-one": (("task.top_p=1.5",), "config", ("task.top_p: 1.5 is greater than the maximum of 1",)),
    "top-k-below-zero": (("task.top_k=-1",), "config", ("task.top_k: -1 is less than the minimum of 0",)),
    "max-new-tokens-zero": (("task.max_new_tokens=0",), "config", ("task.max_new_tokens: 0 is less than the minimum of 1",)),
    "max-new-tokens-past-the-context": (("task.max_new_tokens=64",), "generate",
                                        ("max_new_tokens: 64 leaves no room for a prompt", "context of 64 tokens")),
    "empty-stop-string": (("task.stop=['']",), "config", ("task.stop.0", "expected a non-empty stop string")),
    "batch-size-zero": (("runtime.batch_size=0",), "config", ("runtime.batch_size: 0 is less than the minimum of 1",)),
    "prompt-past-the-context": (("data.prompts=[" + "x" * 70 + "]",), "data",
                                ("data.prompts[0]: 70 prompt tokens", "context of 64 tokens", "task.truncate=left",
                                 "data.on_error=skip")),
    "plan-without-a-tokenizer-or-length": (("mode=plan", "model=seq100b", "hardware=a100_8x80gb"), "config",
                                           ("runtime.seq_len: model seq100b has no tokenizer", "runtime.seq_len=256")),
    "tokenizer-path-missing": (("tokenizer.path=/nonexistent/tokenizer",), "checkpoint",
                               ("tokenizer.path: /nonexistent/tokenizer does not exist",)),
    "tokenizer-path-not-a-tokenizer": ((f"tokenizer.path={Path(__file__).parent.parent / 'schemas' / 'plan.schema.json'}",),
                                       "checkpoint", ("tokenizer.path:", "plan.schema.json is not a tokenizer")),
    "unknown-key-no-plus": (("foo=1",), "config", ("Could not override 'foo'", "use +foo=1")),
    "direct-io-not-a-boolean": (("offload.direct_io=maybe",), "config",
                                ("offload.direct_io", "'maybe' is not of type 'boolean'")),
    "size-bad-unit": (("max_memory.cpu=10GX",), "config",
                      ("max_memory.cpu", "'10GX' is not valid", "expected a size with a unit")),
    "size-negative": (("max_memory.cpu=-1GiB",), "config",
                      ("max_memory.cpu", "'-1GiB' is not valid", "expected a size with a unit")),
    "size-unitless": (("max_memory.cpu=100",), "config",
                      ("max_memory.cpu", "100 is not valid", "expected a size with a unit", "500MB")),
    "strategy-typo": (("placement.strategy=fast",), "config",
                      ("placement.strategy", "'fast' is not valid", "expected one of", "balanced_low_0")),
    "dtype-typo": (("dtype=float8",), "config", ("dtype", "'float8' is not valid", "expected one of", "bfloat16")),
    "local-without-path": (("checkpoint=local",), "config",
                           ("checkpoint.path", "Missing mandatory value", "checkpoint.path=...")),
    "pin-unknown-device": (("hardware=sim_2gpu", "+device_map.lm_head=cuda:5"), "validate",
                           ("device_map.lm_head", "'cuda:5' is not in hardware=sim_2gpu",
                            "expected one of cuda:0, cuda:1, cpu, disk")),
    "cap-unknown-device": (("hardware=sim_2gpu", "+max_memory.3=1GiB"), "hardware",
                           ("max_memory: hardware=sim_2gpu has no device cuda:3", "its devices are cuda:0, cuda:1, cpu, disk")),
    "pin-unknown-module": (("+device_map.lm_hed=cpu",), "validate",
                           ("device_map.lm_hed", "no module or tensor named 'lm_hed'", "did you mean lm_head?")),
    "pin-inside-block": (("+device_map.transformer.h.0.attn=cpu",), "validate",
                         ("device_map.transformer.h.0.attn", "inside block transformer.h.0 (Block)",
                          "cannot be split", "pin transformer.h.0 instead")),
    "budget-below-largest-block": (("hardware=cpu", "max_memory.cpu=1KB", "runtime.seq_len=1"), "plan",
                                   ("block transformer.wte + lm_head (16.00 KiB)", "cannot be split",
                                    "fits no device: cpu 0 B after reserves", "raise max_memory")),
    "no-split-class-typo": (("model.no_split_module_classes=[Blok]",), "build",
                            ("model.no_split_module_classes", "no module of class Blok", "its classes are Block")),
    "unknown-arch-argument": (("+model.arch.foo=1",), "build",
                              ("model.arch", "cannot build runner.zoo.gpt.GPT", "it takes vocab_size, block_size",
                               "unexpected keyword argument 'foo'")),
    # absurd batch shapes are blamed on their key, not on a memory budget
    "batch-size-absurd": (("runtime.batch_size=1e15",), "plan",
                          ("runtime.batch_size: 1000000000000000 row(s) x ", "TiB for activations, outputs and KV cache",
                           "lower runtime.batch_size")),
    "micro-batches-absurd": (("runtime.micro_batches=4096", "runtime.batch_size=100000"), "plan",
                             ("runtime.micro_batches: 4096 micro-batches of 100000 rows keep a KV cache of ",
                              "the devices that compute have 0 B for weights and cache after reserves",
                              "lower runtime.micro_batches")),
    "max-new-tokens-absurd": (("task.max_new_tokens=1000000000000",), "generate",
                              ("max_new_tokens: 1000000000000 leaves no room for a prompt within the model's context "
                               "of 64 tokens; lower it below 64",)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input(case, tmp_path):
    overrides, stage, substrings = case
    line = error_line(tmp_path / "run", *TINY, *overrides)
    assert_line(line, stage, *substrings)


def test_the_command_line_prints_the_line_alone_and_exits_2(cli, tmp_path):
    """The contract itself, through a real process: one line on stderr, exit 2, no traceback, no report."""
    for n, bad in enumerate(("placement=balancd", "task.temperature=-0.5", "task.max_new_tokens=64")):
        proc = cli(*TINY, bad, f"hydra.run.dir={tmp_path / str(n)}")
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [error_line(tmp_path / f"again-{n}", *TINY, bad)]
        assert not (tmp_path / str(n) / "report.json").exists()


def test_local_checkpoint_missing(tmp_path):
    missing = tmp_path / "missing.safetensors"
    line = error_line(tmp_path / "run", *TINY, "checkpoint=local", f"checkpoint.path={missing}")
    assert_line(line, "checkpoint", f"checkpoint.path: {missing} does not exist",
                "point it at a .safetensors file")


# -- in-process: maps the planner never produces ---------------------------------------------------------------

@pytest.fixture(scope="module")
def layout() -> ModelLayout:
    model = build_skeleton(ModelSpec("gpt2tiny", dict(TINY_ARCH), ("Block",)))
    return describe_model(model, ("Block",), torch.float32)


def hardware(gpu_budget: int = 10**6) -> Hardware:
    return Hardware("test", (Device("cuda:0", "gpu", gpu_budget, simulated=True),
                             Device("cpu", "cpu", 10**6), Device("disk", "disk", 10**9)))


def full_map(layout: ModelLayout) -> dict[str, str]:
    """A valid map: every block on the cpu."""
    return {b.name: "cpu" for b in layout.blocks}


def map_errors(device_map: dict[str, str], layout: ModelLayout, hw: Hardware) -> tuple[str, ...]:
    with pytest.raises(MapError) as info:
        check_map(device_map, layout, hw)
    return info.value.lines


def test_full_map_passes(layout):
    check = check_map(full_map(layout), layout, hardware())
    assert set(check.block_devices.values()) == {"cpu"}


def test_map_leaves_a_parameter_uncovered(layout):
    device_map = full_map(layout)
    del device_map["transformer.ln_f"]
    (line,) = map_errors(device_map, layout, hardware())
    assert "transformer.ln_f (LayerNorm) is not covered" in line
    assert "transformer.ln_f.weight, transformer.ln_f.bias have no device" in line
    assert line.endswith("add transformer.ln_f to the map")


def test_map_with_overlapping_keys(layout):
    lines = map_errors({"transformer": "cpu", "transformer.h.0": "cpu", "lm_head": "cpu"}, layout, hardware())
    assert lines == ("device_map: transformer and transformer.h.0 overlap; map each module once",)


def test_map_splits_tied_weights(layout):
    device_map = {**full_map(layout), "transformer.wte": "cpu", "lm_head": "cuda:0"}
    (line,) = map_errors(device_map, layout, hardware())
    assert "lm_head.weight is tied to transformer.wte.weight" in line
    assert "on cuda:0 and cpu" in line and "must sit on one device" in line


def test_map_exceeds_a_budget(layout):
    block_bytes = next(b.nbytes for b in layout.blocks if b.name == "transformer.h.0")
    device_map = {**full_map(layout), "transformer.h.0": "cuda:0"}
    (line,) = map_errors(device_map, layout, hardware(gpu_budget=1000))
    assert block_bytes == 13120  # 12.81 KiB, 12120 B over a 1000 B budget
    assert line == ("device_map: cuda:0 holds 12.81 KiB but its budget is 1000 B (11.84 KiB over); "
                    "move blocks off it or raise it (+max_memory.0=<size>)")


def test_the_recipe_returns_bad_input_as_a_failed_outcome(tmp_path):
    """From Python, ``run`` gives the bad input back as its outcome, as the command line prints it."""
    from runner.run.recipe import run

    outcome = run(compose_config(*TINY[:1], "task.max_new_tokens=64"), tmp_path)
    assert outcome.state == "failed" and outcome.paths == {}
    assert outcome.error.said() == [error_line(tmp_path / "cli", *TINY[:1], "task.max_new_tokens=64")]
