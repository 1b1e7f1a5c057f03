"""Run folders replay exactly: ``manifest.json`` and ``runner.lab.replay``. Runs and replays go in-process
(``run_in_process``, and replay's ``main`` with the arguments the command line would get); one refusal goes through
``python -m runner.lab.replay`` in a real process, for its exit code and its one line on stderr."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import run_in_process
from runner.config.schema import schema_errors
from runner.lab import replay as replay_module


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replay-cache")  # its shards are changed below: not the session's cache


@pytest.fixture
def in_cache(cache, monkeypatch) -> Path:
    """The runs in this process read and write the module's cache."""
    monkeypatch.setenv("RUNNER_CACHE", str(cache))
    return cache


def run(run_dir: Path, *overrides: str) -> None:
    outcome, lines = run_in_process(run_dir, *overrides)
    assert outcome is not None and not outcome.error, lines


def replay(capsys, run_dir: Path, *args: str) -> tuple[int, str, str]:
    """``python -m runner.lab.replay <run_dir> <args>``, in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = replay_module.main([str(run_dir), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_greedy_run_replays_byte_identical(tmp_path, in_cache, capsys):
    run(tmp_path / "run", "model=gpt2tiny", "task.max_new_tokens=6")
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

    code, out, err = replay(capsys, tmp_path / "run", "--into", str(tmp_path / "again"))
    assert code == 0, err
    assert out.strip().splitlines()[-1] == (f"replay: predictions.jsonl is byte-identical to the "
                                            f"original's ({tmp_path / 'again'})")
    assert "warning" not in err  # same machine, same packages
    assert (tmp_path / "again" / "predictions.jsonl").read_bytes() == (tmp_path / "run" / "predictions.jsonl").read_bytes()


def test_a_sampled_job_over_a_data_file_replays_byte_identical_from_another_folder(tmp_path, in_cache, capsys,
                                                                                   monkeypatch):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Tell me about {w}"}) + "\n"
                            for i, w in enumerate(["rivers", "stars", "bread", "glass", "wind"])))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(tmp_path)  # the data path is relative to where the run started
    run(tmp_path / "run", "model=gpt2tiny", "data=jsonl", "data.path=prompts.jsonl", "data.id_field=id",
        "task.max_new_tokens=8", "task.temperature=0.9", "seed=7", "runtime.batch_size=2")
    monkeypatch.chdir(work)
    code, out, err = replay(capsys, tmp_path / "run", "--into", str(tmp_path / "again"))
    assert code == 0, err
    assert Path.cwd() == work  # replay ran from the run's folder, and came back
    assert "byte-identical" in out
    lines = (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r0", "r1", "r2", "r3", "r4"]

    data.write_text(data.read_text().replace("bread", "butter"))
    code, _, err = replay(capsys, tmp_path / "run", "--into", str(tmp_path / "third"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: replay: data file {data} changed since the run (its hash differs); restore it, or pass --force "
        "to replay anyway")
    assert not (tmp_path / "third").exists()


def test_a_replay_against_a_changed_checkpoint_is_refused_unless_forced(tmp_path, in_cache, capsys):
    run(tmp_path / "run", "model=gpt2tiny", "task.max_new_tokens=3")
    shard = Path(json.loads((tmp_path / "run" / "manifest.json").read_text())["checkpoint"]["files"][0]["path"])
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last weight's last byte: same size, other content
    shard.write_bytes(bytes(data))
    code, _, err = replay(capsys, tmp_path / "run", "--into", str(tmp_path / "again"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: replay: checkpoint file {shard} changed since the run (its content hash differs); restore it, "
        "or pass --force to replay anyway")
    assert not (tmp_path / "again").exists()
    code, _, err = replay(capsys, tmp_path / "run", "--into", str(tmp_path / "again"), "--force")
    assert f"warning: replay: checkpoint file {shard} changed since the run" in err
    assert code in (0, 1)  # it ran; whether one flipped byte changes two greedy tokens is the model's
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))  # the cache is shared with the other tests


def test_a_folder_without_a_manifest_is_one_line(tmp_path, cli):
    proc = cli(str(tmp_path), module="runner.lab.replay", timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: replay: {tmp_path / 'manifest.json'}: no manifest; give a run folder "
                                   "written by a run of this runner (one holding manifest.json)")
