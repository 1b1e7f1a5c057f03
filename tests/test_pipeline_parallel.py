"""Pipeline parallel: the stage split and each stage's modules in-process, and real ``torchrun`` runs with gloo
whose outputs must be the bytes one process writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_in_process
from runner.load.build import build_skeleton
from runner.config import ModelSpec
from runner.plan.split import PipelineError, Skipped, keep_stage, layer_costs, split

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
RUNNER_FRAME = f'File "{Path(__file__).resolve().parent.parent / "runner"}'
GPT4 = {"_target_": "runner.zoo.gpt.GPT", "vocab_size": 256, "block_size": 64, "n_layer": 4, "n_head": 2, "n_embd": 16}


def test_the_split_makes_the_costliest_stage_as_cheap_as_it_can_be():
    parts = split([10, 10, 10, 10], first_extra=0, last_extra=0, ranks=2).parts
    assert [(p.layers, p.first, p.last) for p in parts] == [(range(0, 2), True, False), (range(2, 4), False, True)]
    # the head costs as much as two layers: the last stage takes fewer layers
    parts = split([10] * 6, first_extra=0, last_extra=20, ranks=2).parts
    assert [p.layers for p in parts] == [range(0, 4), range(4, 6)]
    parts = split([5, 30, 5, 5, 5, 5], first_extra=0, last_extra=0, ranks=3).parts
    assert [p.layers for p in parts] == [range(0, 1), range(1, 2), range(2, 6)]
    with pytest.raises(PipelineError, match="3 ranks but the model has 2 layers"):
        split([1, 1], first_extra=0, last_extra=0, ranks=3)


def params_of(part_index: int, ranks: int) -> tuple[set[str], range]:
    model = build_skeleton(ModelSpec("gpt4", dict(GPT4), ("Block",)))
    costs, _, head = layer_costs(model, 1)
    part = split(costs, first_extra=0, last_extra=head, ranks=ranks).parts[part_index]
    keep_stage(model, part)
    return {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}, part.layers


def test_each_stage_keeps_only_its_modules():
    layer = {"attn.c_attn", "attn.c_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"}
    h = lambda *ids: {f"transformer.h.{i}.{m}" for i in ids for m in layer}  # noqa: E731
    # GPT-2 ties the head to the token embedding: both ends keep that one tensor, shown under its first name
    # 3,280 bytes a layer and a 4,096-byte head: the last stage takes one layer, the first three
    assert params_of(0, 2) == ({"transformer.wte", "transformer.wpe"} | h(0, 1, 2), range(0, 3))
    assert params_of(1, 2) == ({"transformer.wte", "transformer.ln_f"} | h(3), range(3, 4))
    assert params_of(1, 3) == (h(1, 2), range(1, 3))  # a middle stage: layers only
    model = build_skeleton(ModelSpec("gpt4", dict(GPT4), ("Block",)))
    keep_stage(model, split([1, 1, 1, 1], first_extra=0, last_extra=0, ranks=3).parts[1])
    assert isinstance(model.transformer.wpe, Skipped) and isinstance(model.transformer.h[0], Skipped)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pp-cache")


def env_for(cache: Path) -> dict[str, str]:
    return {**os.environ, "RUNNER_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("model=gpt2tiny", "task.max_new_tokens=8", "task.temperature=0.8", "seed=5", "runtime.batch_size=2",
     "runtime.micro_batches=2"),
    ("task.max_new_tokens=6", "runtime.micro_batches=2"),  # SmolLM2-135M-Instruct: tied head, GGUF weights
], ids=["gpt2tiny-sampled", "smollm2-greedy"])
def test_two_stages_give_the_bytes_one_process_writes(tmp_path, cache, overrides, monkeypatch):
    prompts = "data.prompts=[The capital of France is,Name a colour.,One two three,Why is the sky blue?,Hi]"
    monkeypatch.setenv("RUNNER_CACHE", str(cache))  # the one-process reference runs here, from the ranks' cache
    one, errors = run_in_process(tmp_path / "one", *overrides, prompts)
    assert one is not None and not one.error, errors
    two = subprocess.run([*TORCHRUN, "--nproc-per-node=2", "-m", "runner", "parallel.mode=pipeline", *overrides,
                          prompts, f"hydra.run.dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env_for(cache), timeout=600)
    assert two.returncode == 0, two.stderr
    expected = (tmp_path / "one" / "predictions.jsonl").read_bytes()
    assert (tmp_path / "two" / "predictions.jsonl").read_bytes() == expected
    logs = (tmp_path / "two" / "runner.log").read_text() + (tmp_path / "two" / "runner-rank1.log").read_text()
    assert logs.count("Pipeline stages: rank 0: layers 0-") == 2  # both ranks chose the same split


@pytest.mark.slow
@pytest.mark.parametrize("overrides, line", [
    (("--nproc-per-node=2", "task=score"), "error: parallel: parallel.mode=pipeline runs task=generate, not "
     "task=score; use parallel.mode=data to share scoring or embedding between ranks"),
    (("--nproc-per-node=3",), "error: parallel: parallel.mode=pipeline: 3 ranks but the model has 2 layers; each "
     "stage needs at least one: launch at most 2 processes"),
], ids=["score", "more-ranks-than-layers"])
def test_bad_pipelines_are_one_line_on_every_rank(tmp_path, cache, overrides, line):
    nproc, *rest = overrides
    proc = subprocess.run([*TORCHRUN, nproc, "-m", "runner", "model=gpt2tiny", "parallel.mode=pipeline", *rest,
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env_for(cache),
                          timeout=300)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert errors == [line] * int(nproc.split("=")[1])
    assert RUNNER_FRAME not in proc.stderr


def test_plan_sizes_a_pipeline_over_two_nodes(tmp_path):
    outcome, errors = run_in_process(tmp_path, "mode=plan", "model=gpt2", "hardware=rtx4090_2x",
                                     "parallel.mode=pipeline", "parallel.nodes=2", "runtime.seq_len=256")
    assert outcome is not None and not outcome.error, errors
    pipeline = json.loads((tmp_path / "plan.json").read_text())["pipeline"]
    stages = pipeline["stages"]
    # 12 layers of 7.1 MB; the last stage also computes the 154 MB head, so it takes one layer
    assert [(s["rank"], s["node"], s["layers"]) for s in stages] == [
        (0, 0, [0, 3]), (1, 0, [3, 7]), (2, 1, [7, 11]), (3, 1, [11, 12])]
    assert [set(s["loads"]) for s in stages] == [{"cuda:0", "cpu", "disk"}, {"cuda:1", "cpu", "disk"}] * 2
    assert all(s["off_gpu"] == 0 for s in stages)  # one GPU per rank holds each stage
    traffic = pipeline["traffic"]
    assert traffic["hops"] == 3 and traffic["cross_node_hops"] == 1 and traffic["cross_node_logits"] == 2
    assert traffic["hidden_bytes_per_hop"] == 768 * 4 and traffic["logits_bytes_per_rank"] == 50257 * 4
    assert traffic["cross_node_bytes_per_token"] == 768 * 4 + 2 * 50257 * 4
    warning, = pipeline["warnings"]
    assert warning.startswith("parallel.nodes=2: the model's 621.94 MiB fit on one node's GPUs (48.00 GiB)")
    assert "pipeline: 4 stages over 2 node(s)" in outcome.text  # what the command line prints
