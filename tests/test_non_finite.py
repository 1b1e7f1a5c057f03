"""NaN and Inf weights: every task ends in one line naming the module where non-finite values first appear."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import compose_config, run_in_process, write_byte_tokenizer
from runner.infer.engine import Engine
from runner.errors import GenerateError
from runner.zoo.gpt import GPT

ARCH = dict(vocab_size=256, block_size=64, n_layer=3, n_head=2, n_embd=32)
OVERRIDES = ("model=gpt2tiny", *(f"model.arch.{k}={v}" for k, v in ARCH.items()), "hardware=cpu",
             "checkpoint=local", "runtime.seq_len=32")


def checkpoint(folder, poison: float | None) -> str:
    """gpt2tiny's weights, with one value of ``transformer.h.1.mlp.c_fc.weight`` set to ``poison``."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in GPT(**ARCH).state_dict().items() if k != "lm_head.weight"}
    if poison is not None:
        state["transformer.h.1.mlp.c_fc.weight"][3, 5] = poison
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    write_byte_tokenizer(folder)
    return str(folder)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("task", ["generate", "score", "embed"])
def test_a_non_finite_weight_is_named_by_its_module_for_every_task(tmp_path, poison, task):
    path = checkpoint(tmp_path / "ckpt", poison)
    engine = Engine(compose_config(*OVERRIDES, f"checkpoint.path={path}", f"task={task}"), tmp_path / "run")
    run = {"generate": lambda: engine.generate(["hello"]), "score": lambda: engine.score(["hello"]),
           "embed": lambda: engine.embed(["hello"])}[task]
    with pytest.raises(GenerateError) as e:
        run()
    (line,) = e.value.lines
    assert "module transformer.h.1.mlp.c_fc is the first whose output is not finite (NaN or Inf)" in line
    assert line.endswith("(try dtype=float32 or dtype=bfloat16)")


def test_finite_weights_pass(tmp_path):
    path = checkpoint(tmp_path / "ckpt", None)
    engine = Engine(compose_config(*OVERRIDES, f"checkpoint.path={path}"), tmp_path / "run")
    (done,) = engine.generate(["hello"], max_new_tokens=4)
    assert len(done.output_tokens) == 4


def test_a_job_over_nan_weights_ends_in_one_line_and_exit_2(tmp_path):
    path = checkpoint(tmp_path / "ckpt", float("nan"))
    overrides = [o for o in OVERRIDES if not o.startswith("runtime.seq_len")]  # sized from the default prompts
    # in-process: a bug would raise here, with its traceback; a failed outcome is what exits 2
    outcome, lines = run_in_process(tmp_path / "run", *overrides, "task.max_new_tokens=4", f"checkpoint.path={path}")
    assert outcome is not None and outcome.error, lines
    (line,) = [x for x in lines if x.startswith("error:")]
    assert line.startswith("error: generate: the next-token logits: module transformer.h.1.mlp.c_fc is the first")


def test_check_finite_names_each_bad_tensor_before_anything_runs(tmp_path):
    from runner.errors import CheckpointError
    from runner.infer.engine import Engine

    path = checkpoint(tmp_path / "ckpt", float("nan"))
    with pytest.raises(CheckpointError) as e:
        Engine(compose_config(*OVERRIDES, f"checkpoint.path={path}", "checkpoint.check_finite=true"),
                tmp_path / "run").loaded
    assert list(e.value.lines) == [
        f"{path}/model.safetensors: tensor transformer.h.1.mlp.c_fc.weight holds 1 NaN or Inf value(s) of 4096; "
        "the checkpoint is corrupt: re-download or re-export it"]
    good = checkpoint(tmp_path / "good", None)
    result = Engine(compose_config(*OVERRIDES, f"checkpoint.path={good}", "checkpoint.check_finite=true"),
                     tmp_path / "run2").loaded
    assert "check_finite" in result.timings


def test_rows_are_checked_exactly_even_where_a_finite_rows_sum_overflows():
    from runner.infer.finite import NonFiniteOutput, check_rows

    huge = torch.full((3, 8), 3e38)  # every value finite, each row's sum not
    check_rows(huge, lambda row: row, "logits")
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = huge.clone()
        values[2, 5] = bad
        with pytest.raises(NonFiniteOutput) as e:
            check_rows(values, lambda row: row, "logits")
        assert e.value.rerun == 2  # the first bad row's
    values = torch.zeros(4, 8, dtype=torch.bfloat16)
    values[1, 0] = float("nan")
    with pytest.raises(NonFiniteOutput) as e:
        check_rows(values, lambda row: row, "logits")
    assert e.value.rerun == 1
