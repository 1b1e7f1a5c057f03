"""Run folders replay exactly: ``manifest.json`` and ``python -m runner.lab.replay``, through the real CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.config.schema import schema_errors

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replay-cache")


def run(run_dir: Path, cache: Path, *overrides: str) -> None:
    env = {**os.environ, "RUNNER_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "runner", *overrides, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr


def replay(run_dir: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNNER_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "runner.lab.replay", str(run_dir), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_a_greedy_run_replays_byte_identical(tmp_path, cache):
    run(tmp_path / "run", cache, "model=gpt2tiny", "task.max_new_tokens=6")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert schema_errors(manifest, "manifest") == []
    assert manifest["overrides"] == ["model=gpt2tiny", "task.max_new_tokens=6"]
    assert manifest["config"]["task"]["max_new_tokens"] == 6 and manifest["seed"] == 0
    assert len(manifest["runner"]["git_commit"]) == 40  # this checkout
    assert manifest["versions"]["torch"] and manifest["versions"]["hydra-core"]
    assert manifest["tokenizer"] == {"name": "bytes", "hash": hashlib.sha256(b"utf-8 bytes").hexdigest(),
                                     "chat_template_hash": None}
    prompts = json.dumps(manifest["config"]["data"]["prompts"], ensure_ascii=False, sort_keys=True)
    assert manifest["data"] == {"path": None, "hash": "sha256:" + hashlib.sha256(prompts.encode()).hexdigest()}
    shards = manifest["checkpoint"]["files"]
    assert shards and all(f["hash"].startswith("sampled:") for f in shards)

    proc = replay(tmp_path / "run", cache, "--into", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (f"replay: predictions.jsonl is byte-identical to the "
                                                    f"original's ({tmp_path / 'again'})")
    assert "warning" not in proc.stderr  # same machine, same packages
    assert (tmp_path / "again" / "predictions.jsonl").read_bytes() == (tmp_path / "run" / "predictions.jsonl").read_bytes()


def test_a_sampled_job_over_a_data_file_replays_byte_identical_from_another_folder(tmp_path, cache):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Tell me about {w}"}) + "\n"
                            for i, w in enumerate(["rivers", "stars", "bread", "glass", "wind"])))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "RUNNER_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "runner", "model=gpt2tiny", "data=jsonl", "data.path=prompts.jsonl",
                           "data.id_field=id", "task.max_new_tokens=8", "task.temperature=0.9", "seed=7", "runtime.batch_size=2",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = subprocess.run([sys.executable, "-m", "runner.lab.replay", str(tmp_path / "run"), "--into",
                            str(tmp_path / "again")], cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "byte-identical" in again.stdout
    lines = (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r0", "r1", "r2", "r3", "r4"]

    data.write_text(data.read_text().replace("bread", "butter"))
    refused = replay(tmp_path / "run", cache, "--into", str(tmp_path / "third"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: replay: data file {data} changed since the run (its hash differs); restore it, or pass --force "
        "to replay anyway")
    assert not (tmp_path / "third").exists()


def test_a_replay_against_a_changed_checkpoint_is_refused_unless_forced(tmp_path, cache):
    run(tmp_path / "run", cache, "model=gpt2tiny", "task.max_new_tokens=3")
    shard = Path(json.loads((tmp_path / "run" / "manifest.json").read_text())["checkpoint"]["files"][0]["path"])
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last weight's last byte: same size, other content
    shard.write_bytes(bytes(data))
    refused = replay(tmp_path / "run", cache, "--into", str(tmp_path / "again"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: replay: checkpoint file {shard} changed since the run (its content hash differs); restore it, "
        "or pass --force to replay anyway")
    assert not (tmp_path / "again").exists()
    forced = replay(tmp_path / "run", cache, "--into", str(tmp_path / "again"), "--force")
    assert f"warning: replay: checkpoint file {shard} changed since the run" in forced.stderr
    assert forced.returncode in (0, 1)  # it ran; whether one flipped byte changes two greedy tokens is the model's
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))  # the cache is shared with the other tests


def test_a_folder_without_a_manifest_is_one_line(tmp_path, cache):
    proc = replay(tmp_path, cache)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: replay: {tmp_path / 'manifest.json'}: no manifest; give a run folder "
                                   "written by a run of this runner (one holding manifest.json)")
