"""``python -m runner`` as a user runs it: the embedded default through the real command line, and the design's
own examples through the same recipe in this process."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import run_in_process
from runner.config.schema import schema_errors


def run_job(run_dir: Path, *overrides: str):
    outcome, errors = run_in_process(run_dir, *overrides)
    assert errors == [], errors
    return outcome


def test_default_run_answers_with_paris_and_writes_three_valid_files(cli, tmp_path):
    proc = cli(f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    device_map = json.loads((tmp_path / "device_map.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert schema_errors(report, "report") == []
    assert schema_errors(device_map, "device_map") == []
    assert all(schema_errors(p, "prediction.generate") == [] for p in predictions)

    # The embedded default is the real SmolLM2-135M-Instruct, through its chat template.
    assert predictions[0]["id"] == 0 and predictions[0]["prompt"] == "What is the capital of France?"
    assert predictions[0]["completion"]["text"] == "The capital of France is Paris."
    assert predictions[0]["completion"]["finish_reason"] == "stop"  # at <|im_end|>
    assert report["model"]["name"] == "SmolLM2-135M-Instruct.Q4_1" and report["strategy"] == "auto"
    assert (report["model"]["path"], report["model"]["target"]) == ("zoo", "runner.zoo.families.Llama")
    assert report["checkpoint"]["source"] == "gguf"
    assert Path(report["checkpoint"]["files"][0]["path"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {"build", "plan", "validate", "checkpoint", "load", "generate"} <= set(report["timings"])
    assert report["versions"]["torch"].startswith("2.")
    planned = sum(d["planned_bytes"] for d in report["devices"])
    assert planned == report["model"]["bytes"] == sum(b["bytes"] for b in device_map["blocks"])
    assert [p["prompt"] for p in predictions] == report["config"]["data"]["prompts"]
    # The KV cache is planned for the longest chat-templated prompt plus max_new_tokens, and nothing more.
    completions = [p["completion"] for p in predictions]
    longest = max(c["prompt_tokens"] for c in completions)
    assert report["config"]["runtime"]["seq_len"] is None  # as the user left it: derived
    assert report["generation"]["prompt_tokens"] == sum(c["prompt_tokens"] for c in completions)
    assert report["generation"]["output_tokens"] == sum(c["completion_tokens"] for c in completions)
    assert report["job"]["rows"] == {"total": 2, "done": 2, "skipped": 0, "resumed": 0}
    assert report["job"]["tokens"] == {"input": report["generation"]["prompt_tokens"],
                                       "output": report["generation"]["output_tokens"]}
    kv = {d["name"]: d["reserves"].get("kv_cache") for d in report["devices"]}
    # 30 layers x 2 (keys, values) x (longest + 12) positions x 3 KV heads x 64 channels x 4 bytes.
    assert kv["cpu"] == 30 * 2 * (longest + 12) * 3 * 64 * 4
    # The table and the outputs reach the screen.
    assert "module" in proc.stdout and "budget" in proc.stdout and "Paris" in proc.stdout
    # The manifest a replay needs: the real tokenizer and chat template are hashed, the GGUF sampled.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert schema_errors(manifest, "manifest") == []
    assert manifest["tokenizer"]["name"] == "gguf" and len(manifest["tokenizer"]["hash"]) == 64
    assert len(manifest["tokenizer"]["chat_template_hash"]) == 64
    gguf, = manifest["checkpoint"]["files"]
    assert gguf["path"].endswith(".gguf") and gguf["hash"].startswith("sampled:")
    assert manifest["device_map"] == {"": "cpu"} and manifest["seed"] == 0
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "done"


def test_synthetic_gpt_run_writes_a_sharded_checkpoint(tmp_path):
    run_job(tmp_path, "model=gpt2mini", "task.max_new_tokens=4")
    report = json.loads((tmp_path / "report.json").read_text())
    files = [Path(f["path"]) for f in report["checkpoint"]["files"]]
    assert (files[0].parent / "model.safetensors.index.json").exists()
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(p["completion"]["completion_tokens"] == 4 for p in predictions)


def test_second_run_reuses_the_synthetic_checkpoint(tmp_path, caplog):
    run_job(tmp_path / "a", "model=gpt2tiny", "model.arch.n_layer=3", "task.max_new_tokens=2")
    with caplog.at_level(logging.INFO):
        run_job(tmp_path / "b", "model=gpt2tiny", "model.arch.n_layer=3", "task.max_new_tokens=2")
    assert "Reusing synthetic checkpoint" in caplog.text
    outputs = [json.loads((tmp_path / d / "predictions.jsonl").read_text().splitlines()[0]) for d in "ab"]
    assert outputs[0]["completion"] == outputs[1]["completion"]


def test_simulated_two_gpu_map_and_partial_pins(tmp_path):
    run_job(tmp_path, "model=gpt2tiny", "hardware=sim_2gpu", "placement=sequential", "task.max_new_tokens=2",
            "+device_map.transformer.h.1=cuda:1", "+device_map.transformer.ln_f=disk")
    blocks = {b["name"]: b["device"] for b in json.loads((tmp_path / "device_map.json").read_text())["blocks"]}
    assert blocks == {"transformer.wte": "cuda:0", "transformer.wpe": "cuda:0", "transformer.h.0": "cuda:0",
                      "transformer.h.1": "cuda:1", "transformer.ln_f": "disk", "lm_head": "cuda:0"}
    report = json.loads((tmp_path / "report.json").read_text())
    reserves = {d["name"]: d["reserves"] for d in report["devices"]}
    # runtime.seq_len is derived: the longest prompt (30 bytes) plus 2 new tokens.
    assert reserves["cuda:0"]["offload_staging"] == 128  # room to stream ln_f (2 x 16 fp32) into the main device
    assert reserves["cuda:0"]["outputs"] == 1 * 256 * 4  # the last position's logits of 1 sequence, fp32
    assert reserves["cuda:1"] == {"activations": 10 * 32 * 16 * 4, "kv_cache": 2 * 32 * 16 * 4}  # h.1's keys, values
    assert any("cuda:1 -> cuda:0" in w for w in report["warnings"])


@pytest.mark.parametrize("where", ["proc", "file"])
def test_a_run_folder_that_cannot_be_made_is_one_line(cli, tmp_path, where):
    """Hydra makes the run folder before the runner starts: its error is still one line, exit 2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = Path("/proc/runner-run") if where == "proc" else blocker
    proc = cli("model=gpt2tiny", "hardware=cpu", f"hydra.run.dir={folder}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: config: hydra.run.dir: cannot make the run folder {folder} "
        f"({'No such file or directory' if where == 'proc' else 'File exists'}); "
        "set hydra.run.dir to a writable folder on a disk"]
