"""Data parallel through real ``torchrun --standalone`` processes with gloo: merged outputs byte-identical to one
process, resume after a rank is killed (with the same or another number of ranks), and bad launches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import run_in_process

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
RUNNER_FRAME = f'File "{Path(__file__).resolve().parent.parent / "runner"}'  # a traceback line in the runner's code


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dp-cache")


@pytest.fixture
def in_cache(cache, monkeypatch) -> Path:
    """Runs in this process read the ranks' cache."""
    monkeypatch.setenv("RUNNER_CACHE", str(cache))
    return cache


def env_for(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "RUNNER_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def single(run_dir: Path, *overrides: str) -> bytes:
    """The bytes one process writes (in this process: the reference, not what is tested)."""
    outcome, errors = run_in_process(run_dir, *overrides)
    assert outcome is not None and not outcome.error, errors
    return (run_dir / "predictions.jsonl").read_bytes()


def ranks(n: int, run_dir: Path, cache: Path, *overrides: str, wait: bool = True):
    cmd = [*TORCHRUN, f"--nproc-per-node={n}", "-m", "runner", "parallel.mode=data", *overrides,
           f"hydra.run.dir={run_dir}"]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_for(cache))
    return subprocess.run(cmd, capture_output=True, text=True, env=env_for(cache), timeout=600)


def write_rows(path: Path, n: int) -> Path:
    words = ["river", "stone", "cloud", "bread", "glass", "wind", "salt", "ember", "moss", "tide"]
    path.write_text("".join(json.dumps({"prompt": f"{words[i % 10]} number {i} " + "x" * (i % 7)}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("overrides", [
    ("model=gpt2tiny", "task.max_new_tokens=6", "task.temperature=0.9", "seed=11", "runtime.batch_size=3"),
    ("task.max_new_tokens=4",),  # SmolLM2-135M-Instruct greedy, its tokenizer and chat template
], ids=["gpt2tiny-sampled", "smollm2-greedy"])
@pytest.mark.usefixtures("in_cache")
def test_two_ranks_merge_into_the_bytes_one_process_writes(tmp_path, cache, overrides):
    data = write_rows(tmp_path / "rows.jsonl", 9)
    lines = data.read_text().splitlines()  # ids, r7 three times: the repeats are skipped with an error line
    data.write_text("".join(json.dumps({**json.loads(line), "id": f"r{min(i, 7)}"}) + "\n"
                            for i, line in enumerate(lines + [lines[0]])))
    rows = ("data=jsonl", f"data.path={data}", "data.id_field=id", "data.on_error=skip")
    expected = single(tmp_path / "one", *overrides, *rows)
    proc = ranks(2, tmp_path / "two", cache, *overrides, *rows)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "two" / "predictions.jsonl").read_bytes() == expected
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    shares = report["parallel"]["ranks"]
    assert [r["rank"] for r in shares] == [0, 1] and sum(r["rows"] for r in shares) == 8
    assert sum(r["skipped"] for r in shares) == 2  # r7 three times: the second and third are skipped
    assert all(r["peak_rss_bytes"] > 0 and r["error"] is None for r in shares)  # (a rank may claim every batch)
    assert report["parallel"]["missing"] == [] and report["job"]["rows"]["done"] == 8
    assert b'"error"' in expected  # the skipped rows' lines are in the merge, in their places
    assert report["parallel"]["tokens_per_s"] > 0


@pytest.mark.usefixtures("in_cache")
def test_a_job_whose_rank_is_killed_resumes_with_another_number_of_ranks(tmp_path, cache):
    resume_ranks = 3
    data = write_rows(tmp_path / "rows.jsonl", 160)
    overrides = ("model=gpt2tiny", "task.max_new_tokens=24", "data=jsonl", f"data.path={data}")
    expected = single(tmp_path / "one", *overrides)
    run_dir = tmp_path / "job"
    launcher = ranks(2, run_dir, cache, *overrides, wait=False)
    rank1 = _wait_for(launcher, lambda: _worker(launcher.pid, rank=1), "rank 1 to start")
    _wait_for(launcher, lambda: _lines(run_dir / "predictions.rank-1.jsonl") >= 3, "rank 1 to write three lines")
    rank1.send_signal(signal.SIGKILL)  # a node lost: torchrun stops the other rank, which keeps its lines
    assert launcher.wait(timeout=120) != 0
    written = _lines(run_dir / "predictions.rank-0.jsonl") + _lines(run_dir / "predictions.rank-1.jsonl")
    assert 3 <= written < 160
    assert not (run_dir / "predictions.jsonl").exists()

    again = ranks(resume_ranks, run_dir, cache, *overrides, "resume=true")
    assert again.returncode == 0, again.stderr
    assert (run_dir / "predictions.jsonl").read_bytes() == expected
    report = json.loads((run_dir / "report.json").read_text())
    assert report["job"]["rows"]["resumed"] >= 3
    assert sum(r["rows"] for r in report["parallel"]["ranks"]) == 160 - report["job"]["rows"]["resumed"]


def test_a_new_job_over_rank_files_is_refused(tmp_path, cache):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "predictions.rank-0.jsonl").write_text('{"id": 0}\n')
    proc = ranks(2, tmp_path / "job", cache, "model=gpt2tiny", "task.max_new_tokens=2")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: data: {tmp_path / 'job'}: already holds a job's predictions.rank-0.jsonl; pass "
                     "resume=true to continue it (with any number of ranks), or pick a new run folder "
                     "(hydra.run.dir=...)"] * 2  # every rank says it, and none waits for the others
    assert RUNNER_FRAME not in proc.stderr  # torchrun prints its own traceback for a failed worker; ours has none


def test_bad_launches_are_one_line(tmp_path, cache, cli):
    env = env_for(cache)
    alone, said = run_in_process(tmp_path / "a", "model=gpt2tiny", "parallel.mode=data")
    assert alone is not None and alone.error  # exit 2
    assert said == [
        "error: parallel: parallel.mode=data: this process was not started by torchrun (RANK, WORLD_SIZE, "
        "MASTER_ADDR ... are unset); run torchrun --nproc-per-node=N -m runner parallel.mode=data ..., or set "
        "parallel.mode=none"]
    typo, said = run_in_process(tmp_path / "b", "parallel.mode=tensor")
    assert typo is None or typo.error  # exit 2
    assert said == ["error: config: parallel.mode: 'tensor' is not valid; expected none (one process), "
                    "data or pipeline (torchrun ranks)"]
    # the torchrun environment is read by the command line itself, before Hydra: a real process
    partial = cli("model=gpt2tiny", env={**env, "RANK": "0", "WORLD_SIZE": "2"}, timeout=120)
    assert partial.returncode == 2
    assert partial.stderr.strip() == (
        "error: parallel: RANK, WORLD_SIZE set but not LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: a "
        "partial torchrun environment; launch with torchrun --nproc-per-node=N -m runner ..., or unset them")
    both = subprocess.run([*TORCHRUN, "--nproc-per-node=2", "-m", "runner", "model=gpt2tiny",
                           f"hydra.run.dir={tmp_path / 'c'}"], capture_output=True, text=True, env=env, timeout=300)
    assert both.returncode != 0
    errors = [line for line in both.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: parallel: parallel.mode=none, but torchrun started 2 processes: each would run the "
                      "whole job into the same folder; set parallel.mode=data to share the rows between them"] * 2
    assert RUNNER_FRAME not in both.stderr


def _worker(launcher_pid: int, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "runner" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_for(launcher: subprocess.Popen, probe, what: str):
    """What ``probe`` finds, once it finds it; the wait lasts as long as the launcher runs: a job that ends first
    fails the test."""
    while not (found := probe()):
        assert launcher.poll() is None, f"torchrun ended (exit {launcher.returncode}) before {what}"
        time.sleep(0.02)
    return found
