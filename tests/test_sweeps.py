"""Sweeps through the real CLI: status on disk, resume, collection (table and plot), and the launchers labs use.

Every sweep is ``python -m runner -m ...`` in a subprocess (Hydra's multirun is the point), on gpt2tiny (a synthetic
46 KiB model), with one budget that cannot hold it, so each sweep has a failed job to record, collect and resume.
Collecting a folder again, and a single run's status, go in-process.
"""
from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_in_process
from runner.lab import collect
from runner.lab.status import read_status

TINY = ("model=gpt2tiny", "task.max_new_tokens=2")
BUDGETS = "max_memory.cpu=1GiB,2GiB,3GiB,1KB"  # 1KB holds no block: that job fails
FOLDERS = {b: f"max_memory.cpu={b},model=gpt2tiny,task.max_new_tokens=2" for b in ("1GiB", "2GiB", "3GiB", "1KB")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep-cache")


def sweep(cli, sweep_dir: Path, cache: Path, *overrides: str, wait: bool = True):
    args = ("-m", *TINY, BUDGETS, f"hydra.sweep.dir={sweep_dir}", *overrides)
    env = {**cli.env, "RUNNER_CACHE": str(cache)}
    if not wait:
        return cli.start(*args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cli(*args, env=env, timeout=300)


def rows(sweep_dir: Path) -> dict[str, dict[str, str]]:
    with (sweep_dir / "sweep.csv").open() as f:
        return {row["max_memory.cpu"]: row for row in csv.DictReader(f)}


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_a_sweep_records_each_job_collects_a_table_and_plot_and_exits_with_its_failures(tmp_path, cache, cli):
    proc = sweep(cli, tmp_path / "sweep", cache)
    assert proc.returncode == 1, proc.stderr  # one job failed
    assert "Traceback" not in proc.stderr
    assert "sweep: 3 of 4 jobs done, 1 failed; wrote sweep.csv, sweep.md, sweep.png" in proc.stdout
    statuses = {b: read_status(tmp_path / "sweep" / folder) for b, folder in FOLDERS.items()}
    assert {b: s.state for b, s in statuses.items()} == {"1GiB": "done", "2GiB": "done", "3GiB": "done",
                                                        "1KB": "failed"}
    assert statuses["1KB"].reason.startswith("plan: block transformer.h.0")
    assert statuses["1GiB"].overrides == ["model=gpt2tiny", "task.max_new_tokens=2", "max_memory.cpu=1GiB"]
    table = rows(tmp_path / "sweep")
    assert set(table) == {"1GiB", "2GiB", "3GiB", "1KB"}
    assert table["1KB"]["status"] == "failed" and "fits no device" in table["1KB"]["reason"]
    for budget in ("1GiB", "2GiB", "3GiB"):
        row = table[budget]
        assert row["status"] == "done" and row["figures"] == "measured"
        assert float(row["tokens_per_s"]) > 0 and float(row["first_token_s"]) > 0
        assert int(row["cpu budget"]) == {"1GiB": 1, "2GiB": 2, "3GiB": 3}[budget] * 2**30
        assert 0 < int(row["cpu peak"]) < 2**30  # the process's peak RSS: torch and a 46 KiB model
        assert int(row["cpu bytes"]) == 46848 and int(row["disk bytes"]) == 0 and row["hops"] == "0"
    markdown = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "Every job: `model=gpt2tiny`, `task.max_new_tokens=2`" in markdown
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_reads_a_sweep_folder_again(tmp_path, cache, cli):
    sweep(cli, tmp_path / "sweep", cache, "max_memory.cpu=1GiB,1KB")
    (tmp_path / "sweep" / "sweep.csv").unlink()
    assert collect.main([str(tmp_path / "sweep")]) == 0  # python -m runner.lab.collect, in-process
    assert set(rows(tmp_path / "sweep")) == {"1GiB", "1KB"}
    missing = cli(str(tmp_path / "nowhere"), module="runner.lab.collect", timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"error: sweep: {tmp_path / 'nowhere'}: no such folder; give the sweep's "
                                      "folder (hydra.sweep.dir, e.g. multirun/2026-01-31/12-00-00)")


def test_a_killed_sweep_resumes_only_its_missing_jobs_and_leaves_finished_ones_untouched(tmp_path, cache, cli):
    sweep_dir = tmp_path / "sweep"
    proc = sweep(cli, sweep_dir, cache, wait=False)
    # kill it, as a crash would, once two jobs are done; the sweep must still be going then
    while len(done := [b for b, f in FOLDERS.items() if (s := _status(sweep_dir / f)) and s.state == "done"]) < 2:
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before two jobs were done"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {b: files_of(sweep_dir / FOLDERS[b]) for b in done}
    assert 2 <= len(finished) < 4

    again = sweep(cli, sweep_dir, cache)
    assert again.returncode == 2  # resume was not asked for: the folder is refused, not overwritten
    assert "already holds" in again.stderr and "pass resume=true" in again.stderr

    resumed = sweep(cli, sweep_dir, cache, "resume=true")
    assert resumed.returncode == 1, resumed.stderr  # the impossible budget fails again
    assert f"resume: {len(finished)} of 4 jobs done and skipped; {4 - len(finished)} to run" in resumed.stdout
    for budget, files in finished.items():
        assert files_of(sweep_dir / FOLDERS[budget]) == files  # same bytes, same mtimes
    assert {b: _status(sweep_dir / f).state for b, f in FOLDERS.items()} == {
        "1GiB": "done", "2GiB": "done", "3GiB": "done", "1KB": "failed"}
    assert set(rows(sweep_dir)) == set(FOLDERS)


def test_a_resumed_sweep_whose_config_changed_is_refused_unless_forced(tmp_path, cache, cli):
    sweep_dir = tmp_path / "sweep"
    sweep(cli, sweep_dir, cache, "max_memory.cpu=1GiB,2GiB")
    other_cache = tmp_path / "other-cache"  # the synthetic cache follows RUNNER_CACHE: the config differs
    refused = sweep(cli, sweep_dir, other_cache, "max_memory.cpu=1GiB,2GiB", "resume=true")
    assert refused.returncode == 2
    line, = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: sweep: resume: 2 of the recorded jobs ran with another config (")
    assert f"{FOLDERS['1GiB']}: checkpoint.cache_dir was \"{cache}/synthetic\"" in line
    assert "pass force=true" in line
    forced = sweep(cli, sweep_dir, other_cache, "max_memory.cpu=1GiB,2GiB", "resume=true", "force=true")
    assert forced.returncode == 0, forced.stderr
    kept = sweep_dir / f"{FOLDERS['1GiB']}.superseded-1"
    assert read_status(kept).config["offload"]["folder"] == f"{cache}/offload"
    assert read_status(sweep_dir / FOLDERS["1GiB"]).config["offload"]["folder"] == f"{other_cache}/offload"


@pytest.mark.parametrize("launcher", [("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
                                      ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")],
                         ids=["joblib", "submitit_local"])
def test_process_launchers_record_statuses_and_collect(tmp_path, cache, cli, launcher):
    proc = sweep(cli, tmp_path / "sweep", cache, *launcher)
    assert proc.returncode == 1, proc.stderr
    table = rows(tmp_path / "sweep")
    assert {b: r["status"] for b, r in table.items()} == {"1GiB": "done", "2GiB": "done", "3GiB": "done",
                                                         "1KB": "failed"}
    assert "fits no device" in table["1KB"]["reason"]


def test_a_failed_run_says_so_in_its_folder_even_over_an_earlier_success(tmp_path):
    done, errors = run_in_process(tmp_path / "run", *TINY)
    assert done is not None and not done.error, errors  # exit 0
    assert read_status(tmp_path / "run").state == "done"
    failed, errors = run_in_process(tmp_path / "run", *TINY, "max_memory.cpu=1KB", "resume=true")
    assert failed is not None and failed.error and errors  # exit 2
    status = read_status(tmp_path / "run")
    assert status.state == "failed" and status.reason.startswith("plan: block transformer.h.0")
    assert (tmp_path / "run" / "report.json").exists()  # the earlier run's, now beside a status that says failed


def _status(folder: Path):
    try:
        return read_status(folder)
    except Exception:  # written between our read of the name and of the file: read again next time
        return None
