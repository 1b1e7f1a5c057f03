"""Faults end in one line with nothing lost: signals, a full disk, a failed allocation, dead runs' temp files.

Signals are sent to a real ``python -m runner`` at the moment its temp folder or file appears; a full disk is a
real tmpfs of a few KiB where the machine lets a user namespace mount one, and an injected ENOSPC otherwise.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_in_process
from runner.load.checkpoint.synthetic import synthetic_checkpoint
from runner.data.writer import PredictionsFile
from runner.errors import DiskFull, OutOfMemory
from runner.plan.hardware import Device, Hardware
from runner.load.memory import plan_held
from runner.data.writes import atomic_write, reclaim
from runner.load.build import build_skeleton

LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d ")  # Hydra's log format; anything else on the console is ours
# A synthetic GPT of about 300 MB in 20 MB shards: seconds to write, so a signal lands mid-write.
BIG_SYNTHETIC = ("model=gpt2mini", "model.arch.n_layer=16", "model.arch.n_embd=512", "checkpoint.shard_size=20MB")
LONG_GENERATION = ("model=gpt2mini", "task.max_new_tokens=250", "runtime.seq_len=256",
                   "data.prompts=[a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p]")
SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


def start(cli, run_dir: Path, cache: Path, *overrides: str, sigint_ignored: bool = False) -> subprocess.Popen:
    """``sigint_ignored``: the run starts with SIGINT ignored, as a script's background job does."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return cli.start(*overrides, f"hydra.run.dir={run_dir}", env={**cli.env, "RUNNER_CACHE": str(cache)},
                     preexec_fn=ignore)


def signal_when(proc: subprocess.Popen, pattern: str, signum: int, after: str | None = None) -> tuple[int, str]:
    """Send ``signum`` once a path matching ``pattern`` exists (and, with ``after``, once that file has a line);
    the exit code and the stderr lines that are not log lines. The wait lasts as long as the run does: a run that
    ends first fails the test."""
    while not glob.glob(pattern) or (after is not None and not _has_a_line(Path(after))):
        assert proc.poll() is None, f"ended before {pattern} appeared: {proc.communicate()}"
        time.sleep(0.005)  # a converted block's temp file lives for some 50 ms
    proc.send_signal(signum)
    out, err = proc.communicate()
    assert "Traceback" not in out + err, err
    return proc.returncode, "\n".join(line for line in err.splitlines() if not LOG_LINE.match(line))


def _has_a_line(path: Path) -> bool:
    return path.is_file() and path.read_bytes().count(b"\n") >= 1


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- signals, through the CLI ---

@pytest.mark.parametrize("signum,code", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_signal_during_synthetic_write(cli, signum, code, tmp_path):
    cache = tmp_path / "cache"
    # SIGINT goes to a run that started with it ignored: the runner stops on it all the same
    proc = start(cli, tmp_path / "run", cache, *BIG_SYNTHETIC, "task.max_new_tokens=2", "data.prompts=[Hi]",
                 sigint_ignored=signum == signal.SIGINT)
    rc, err = signal_when(proc, f"{cache}/synthetic/.tmp-*-{proc.pid}/model-00001-of-*.safetensors", signum)
    assert rc == code, rc
    name = signal.Signals(signum).name
    assert re.fullmatch(rf"interrupted: {name}; the synthetic checkpoint gpt2mini-[0-9a-f]{{16}} "
                        "was left unfinished and its partial folder removed; the next run writes it again", err), err
    assert os.listdir(cache / "synthetic") == []  # no temp folder, and nothing that looks finished


@pytest.mark.parametrize("signum,code", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_signal_during_offload_conversion(cli, signum, code, tmp_path):
    cache = tmp_path / "cache"  # the default model is a GGUF: its disk blocks are converted into the offload folder
    proc = start(cli, tmp_path / "run", cache, "max_memory.cpu=60MB", "task.max_new_tokens=2", "data.prompts=[Hi]")
    rc, err = signal_when(proc, f"{cache}/offload/*/", signum)  # made as the conversion starts
    assert rc == code, rc
    match = re.fullmatch(rf"interrupted: {signal.Signals(signum).name}; converting disk blocks: (\d+) of (\d+) are "
                         rf"kept in ({re.escape(str(cache))}/offload/[0-9a-f]{{20}}) and reused by the next run", err)
    assert match, err
    folder = Path(match[3])
    assert not list(folder.glob(".*.tmp"))
    manifest = json.loads((folder / "offload-manifest.json").read_text())
    assert len(manifest["blocks"]) == int(match[1]) < int(match[2])
    kept = sorted(f"{b}.safetensors" for b in manifest["blocks"])
    assert sorted(p.name for p in folder.glob("*.safetensors")) == kept


@pytest.mark.parametrize("signum,code", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_signal_during_generation(cli, signum, code, tmp_path, runner_cache):
    run = tmp_path / "run"
    proc = start(cli, run, runner_cache, *LONG_GENERATION)
    rc, err = signal_when(proc, f"{run}/predictions.jsonl", signum, after=f"{run}/predictions.jsonl")
    assert rc == code, rc
    lines = len((run / "predictions.jsonl").read_text().splitlines())
    assert 0 < lines < len(LONG_GENERATION[-1].split(","))  # stopped mid-job: some rows written, not all
    assert err == (f"interrupted: {signal.Signals(signum).name}; {lines} rows are in {run}/predictions.jsonl; "
                   f"resume=true hydra.run.dir={run} continues the job")


# --- temp files of dead runs are reclaimed, live ones left ---

def test_reclaim_removes_only_dead_writers(tmp_path):
    dead, live = dead_pid(), os.getppid()
    for name in (f".model.layers.0.safetensors.{dead}.tmp", f".offload-manifest.json.{live}.tmp",
                 f".report.json.{os.getpid()}.tmp", "model.layers.0.safetensors", f".x.{dead}.tmp.bak"):
        (tmp_path / name).write_text("x")
    removed = reclaim(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".model.layers.0.safetensors.{dead}.tmp",
                                                      f".report.json.{os.getpid()}.tmp"])
    assert sorted(os.listdir(tmp_path)) == sorted([f".offload-manifest.json.{live}.tmp", "model.layers.0.safetensors",
                                                   f".x.{dead}.tmp.bak"])


def test_next_run_reclaims_a_dead_runs_synthetic_temp_folder(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RUNNER_CACHE", str(cache))
    dead_dir = cache / "synthetic" / f".tmp-0123456789abcdef-{dead_pid()}"
    live_dir = cache / "synthetic" / f".tmp-fedcba9876543210-{os.getppid()}"  # another live process's
    for d in (dead_dir, live_dir):
        d.mkdir(parents=True)
        (d / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
    with caplog.at_level(logging.INFO):
        outcome, errors = run_in_process(tmp_path / "run", "model=gpt2tiny", "task.max_new_tokens=2", "data.prompts=[Hi]")
    assert errors == []
    assert f"Removed {dead_dir}, left by process {dead_dir.name.rsplit('-', 1)[1]}, which is no longer running" \
        in caplog.text
    assert not dead_dir.exists() and live_dir.exists()
    assert [p.name.split("-")[0] for p in (cache / "synthetic").iterdir() if not p.name.startswith(".")] == ["gpt2tiny"]


# --- a full disk: one line naming the folder and the bytes, nothing that looks complete ---

def _tmpfs_run(tmp_path: Path, kib: int, mount: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m runner`` with ``mount`` a tmpfs of ``kib`` KiB, in a user namespace of its own."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare to mount a small tmpfs")
    args = " ".join(f"'{a}'" for a in overrides)
    script = (f"mkdir -p {mount} && mount -t tmpfs -o size={kib}k tmpfs {mount} || exit 77; "
              f"{sys.executable} -m runner {args}; rc=$?; ls -A {mount} | sed 's/^/LS /' >&2; "
              f"find {mount} -type f -printf 'FILE %P %s\\n' >&2; "
              f"find {mount} -name offload-manifest.json -exec sh -c 'echo MANIFEST $(cat \"$1\")' _ {{}} \\; >&2; "
              "exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RUNNER_CACHE": str(cache)})
    if proc.returncode == 77 or "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip("cannot mount a tmpfs here")
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def _ours(err: str) -> list[str]:
    return [line for line in err.splitlines()
            if not line.startswith(("LS ", "FILE ", "MANIFEST ")) and not LOG_LINE.match(line)]


def _files(err: str) -> dict[str, int]:
    return {line.split()[1]: int(line.split()[2]) for line in err.splitlines() if line.startswith("FILE ")}


@pytest.mark.slow  # a real process in its own mount namespace
def test_full_cache_cli(tmp_path):
    mount = tmp_path / "small"
    proc = _tmpfs_run(tmp_path, 1024, mount, mount, "model=gpt2mini", "task.max_new_tokens=2",
                      "data.prompts=[Hi]", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    [line] = _ours(proc.stderr)
    assert re.fullmatch(rf"error: disk: checkpoint.cache_dir: {re.escape(str(mount))}/synthetic is full: the synthetic "
                        r"checkpoint gpt2mini-[0-9a-f]{16} needs 27.69 MiB, (1024.00 KiB|1.00 MiB|10\d\d\.\d\d KiB) "
                        r"is free there; free space on that disk, or set checkpoint.cache_dir to a folder on a disk "
                        "with room", line), line
    assert _files(proc.stderr) == {}  # no partial shard, no temp folder


@pytest.mark.slow
def test_full_offload_folder_cli(tmp_path, runner_cache):
    mount = tmp_path / "small"
    # max_memory.disk above what the tmpfs holds: the plan goes ahead (with a warning), the conversion meets ENOSPC
    proc = _tmpfs_run(tmp_path, 1024, mount, runner_cache, "max_memory.cpu=60MB", "max_memory.disk=1GB",
                      "task.max_new_tokens=2",
                      "data.prompts=[Hi]", f"offload.folder={mount}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    [line] = _ours(proc.stderr)
    assert re.fullmatch(rf"error: disk: offload.folder: {re.escape(str(mount))}/[0-9a-f]{{20}} is full: converting "
                        r"\d+ more disk block\(s\) needs \d+\.\d\d MiB, \d+\.\d\d (KiB|MiB) is free there; free space "
                        "on that disk, or set offload.folder to a folder on a disk with room", line), line
    files = _files(proc.stderr)
    assert not [f for f in files if f.endswith(".tmp")], files
    # the blocks finished before the disk filled are whole, and recorded where the manifest still fitted
    blocks = sorted(f.split("/")[1] for f in files if f.endswith(".safetensors"))
    for line in proc.stderr.splitlines():
        if line.startswith("MANIFEST "):
            assert sorted(f"{b}.safetensors" for b in json.loads(line[9:])["blocks"]) == blocks


@pytest.mark.slow
def test_full_run_folder_cli(tmp_path, runner_cache):
    """The smallest tmpfs on which Hydra's own files fit, and the runner's do not, all of them."""
    for kib in range(32, 80, 4):
        mount = tmp_path / f"run{kib}"
        proc = _tmpfs_run(tmp_path, kib, mount, runner_cache, "model=gpt2tiny", "task.max_new_tokens=2",
                          "data.prompts=[Hi]", f"hydra.run.dir={mount}")
        lines = _ours(proc.stderr)
        assert proc.returncode != 0, "a run that fits says nothing about a full disk"
        if any(line.startswith("error: disk: hydra.run.dir") for line in lines):
            break
    [line] = lines
    assert re.fullmatch(rf"error: disk: hydra.run.dir: {re.escape(str(mount))} is full: writing (report|device_map)"
                        r"\.json needs \d+\.\d\d KiB, [^,]+ is free there; free space on that disk, or set "
                        "hydra.run.dir to a folder on a disk with room", line), line
    files = _files(proc.stderr)
    assert "report.json" not in files and not [f for f in files if f.endswith(".tmp")], files


def test_full_disk_in_synthetic_write_leaves_nothing(tmp_path, monkeypatch):
    import runner.load.checkpoint.synthetic as synthetic

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # part of a shard reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "save_file", full)
    cfg = compose_config("model=gpt2tiny", f"checkpoint.cache_dir={tmp_path}")
    with pytest.raises(DiskFull) as e:
        synthetic_checkpoint(cfg.checkpoint, cfg.model, build_skeleton(cfg.model))
    [line] = e.value.lines
    assert re.fullmatch(rf"checkpoint.cache_dir: {re.escape(str(tmp_path))} is full: the synthetic checkpoint "
                        r"gpt2tiny-[0-9a-f]{16} needs 45.75 KiB, .* is free there; free space on that disk, or set "
                        "checkpoint.cache_dir to a folder on a disk with room", line), line
    assert os.listdir(tmp_path) == []


def test_full_disk_mid_append_keeps_whole_lines(tmp_path, monkeypatch):
    import runner.data.writer as writer

    out = PredictionsFile(tmp_path / "predictions.jsonl", id_key="id", resume=False)
    out.expect([0, 1])
    out.put(0, {"id": 0, "text": "first"})
    out.flush()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "write", half_then_full)
    out.put(1, {"id": 1, "text": "second"})
    with pytest.raises(DiskFull) as e:
        out.flush()
    assert e.value.lines[0].startswith(f"hydra.run.dir: {tmp_path} is full: appending 1 line(s) to predictions.jsonl "
                                       "(1 already there; resume=true goes on after them) needs 28 B, ")
    assert (tmp_path / "predictions.jsonl").read_text() == '{"id": 0, "text": "first"}\n'


def test_atomic_write_on_a_full_disk_leaves_neither_file(tmp_path, monkeypatch):
    def full(fd):  # the bytes were taken, and the disk cannot hold them when they are flushed to it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull, match=r"^hydra.run.dir: .* is full: writing report.json needs 12 B, "):
        atomic_write(tmp_path / "report.json", '{"ok": true}', "hydra.run.dir")
    assert os.listdir(tmp_path) == []


# --- a real allocation failing despite the plan ---

HARDWARE = Hardware("test", (Device("cuda:0", "gpu", 8 << 30), Device("cuda:1", "gpu", 8 << 30),
                             Device("cpu", "cpu", 16 << 30), Device("disk", "disk", 100 << 30)))
LOADS = {"cuda:0": 6 << 30, "cuda:1": 5 << 30, "cpu": 1 << 30, "disk": 0}
RESERVES = {"cuda:1": {"cuda_context": 1 << 30, "activations": 512 << 20}, "cpu": {"activations": 256 << 20}}


def test_cpu_allocator_failure_is_one_line():
    with pytest.raises(OutOfMemory) as e, plan_held(HARDWARE, LOADS, RESERVES, "running generate"):
        torch.empty(1 << 50, dtype=torch.uint8)  # a real allocation the CPU allocator refuses
    assert e.value.stage == "memory"
    assert e.value.lines == ("cpu: out of memory running generate: an allocation of 1024.00 TiB failed, with "
                             "1.25 GiB planned there (1.00 GiB of weights and the rest reserved) within its budget of "
                             "16.00 GiB; the device has less free than that budget: lower it (max_memory.cpu=<size>) "
                             "or runtime.batch_size",)


def test_cuda_out_of_memory_names_the_gpu_and_bytes():
    message = ("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 1 has a total capacity of 79.19 GiB of which "
               "1.06 GiB is free.")
    with pytest.raises(OutOfMemory) as e, plan_held(HARDWARE, LOADS, RESERVES, "loading the weights"):
        raise torch.OutOfMemoryError(message)
    assert e.value.lines == ("cuda:1: out of memory loading the weights: an allocation of 2.50 GiB failed, with "
                             "6.50 GiB planned there (5.00 GiB of weights and the rest reserved) within its budget of "
                             "8.00 GiB; the device has less free than that budget: lower it (+max_memory.1=<size>) or "
                             "runtime.batch_size",)


def test_memory_error_without_a_size_and_other_errors_untouched():
    with pytest.raises(OutOfMemory, match=r"^cpu: out of memory running embed: an allocation failed, with 1.25 GiB"):
        with plan_held(HARDWARE, LOADS, RESERVES, "running embed"):
            raise MemoryError()
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug keeps its traceback
        with plan_held(HARDWARE, LOADS, RESERVES, "running embed"):
            raise RuntimeError("shape mismatch")


# --- a device map that pins every block leaves the strategy nothing to decide ---

def test_full_device_map_says_the_strategy_was_not_used(tmp_path, caplog):
    pins = ("+device_map.transformer=cpu", "+device_map.lm_head=cpu", "placement=balanced")
    note = ("placement.strategy: balanced was not used: device_map pins every block, so the map is the one given")
    with caplog.at_level(logging.WARNING):
        _, errors = run_in_process(tmp_path / "run", "model=gpt2tiny", "task.max_new_tokens=2", "data.prompts=[Hi]",
                                   *pins)
    assert errors == []
    assert note in caplog.messages  # on screen (Hydra's handler prints the log)
    assert note in json.loads((tmp_path / "run" / "report.json").read_text())["warnings"]
    _, errors = run_in_process(tmp_path / "plan", "model=gpt2tiny", "mode=plan", *pins)
    assert errors == []
    assert note in json.loads((tmp_path / "plan" / "plan.json").read_text())["warnings"]


# --- absurd sizes: a budget above the machine warns; a shape too big is blamed on its own key ---

def test_budget_above_the_machine_warns_naming_both_figures(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _, errors = run_in_process(tmp_path, "model=gpt2tiny", "mode=plan", "max_memory.cpu=1000000TiB")
    assert errors == []
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert re.fullmatch(r"max_memory.cpu: 1000000.00 TiB is more than this machine has \(\d+\.\d\d GiB\); a plan that "
                        "fills it will fail when it runs. Lower it, or leave it out to use what is there", warning), warning


def test_absurd_seq_len_is_blamed_on_runtime_seq_len(tmp_path):
    """A model whose context is as long as the sequence asked for, so nothing clamps it to a usable length."""
    _, [line] = run_in_process(tmp_path, "model=smollm2_135m", "mode=plan", "runtime.seq_len=1e14",
                               "model.arch.max_position_embeddings=100000000000000")
    assert re.fullmatch(r"error: plan: runtime.seq_len: 1 row\(s\) x 100000000000000 tokens need \d+\.\d\d TiB for "
                        r"activations, outputs and KV cache beside the weights, and the devices that compute have "
                        r"\d+\.\d\d GiB in all; lower runtime.seq_len \(null: the longest row plus new tokens\)",
                        line), line
