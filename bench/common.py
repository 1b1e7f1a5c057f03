"""Helpers shared by the benchmarks in this folder (``plan_bench``, ``load_bench``, ``offload_bench``, ...).

A bench script puts this folder on ``sys.path`` and imports from here; importing it puts this checkout's
root first on ``sys.path`` too, so ``runner`` is this checkout's, whatever an installed one points at.
Only the standard library is imported at module level: the benches time their own imports (torch,
accelerate) and their children import what they measure, when they measure it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's runner, whatever an installed one points at
GB, GiB, MiB = 10**9, 2**30, 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- packages and the runner's config -------------------------------------------------------------------------------

def package_version(package: str) -> str:
    """The installed version of ``package``, or "?"."""
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001
        return "?"


def importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def quiet() -> None:
    """No warnings and no log lines below ERROR (Accelerate warns that cuda:N is absent, transformers about
    configs), so that a child's output is its figures."""
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def compose_config(*overrides: str):
    """The config ``python -m runner <overrides>`` would run with, typed (as tests/conftest.py composes it)."""
    from hydra import compose, initialize_config_dir

    from runner.config import load_config
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return load_config(compose(config_name="config", overrides=list(overrides)))


def synthetic_folder(*overrides: str) -> Path:
    """The folder of the runner's synthetic checkpoint for ``overrides``, written by the runner if not cached."""
    from runner.load.build import build_skeleton
    from runner.load.checkpoint.synthetic import synthetic_checkpoint
    cfg = compose_config(*overrides)
    return Path(synthetic_checkpoint(cfg.checkpoint, cfg.model, build_skeleton(cfg.model)))


def empty_gpt(arch: dict[str, Any]):
    """``runner.zoo.gpt.GPT(**arch)`` under Accelerate's ``init_empty_weights()``, its head tied to ``wte``.

    ``init_empty_weights`` re-creates every Parameter as it is registered, which unties GPT's head from
    ``wte``: tie again, as transformers' ``tie_weights()`` would, or Accelerate leaves ``lm_head`` on meta.
    """
    from accelerate import init_empty_weights

    from runner.zoo.gpt import GPT
    with init_empty_weights():
        model = GPT(**arch)
    model.lm_head.weight = model.transformer.wte.weight
    return model


# -- memory probes ----------------------------------------------------------------------------------------------------

def status_bytes(*fields: str) -> dict[str, int]:
    """Those of ``fields`` (VmRSS, VmHWM, RssAnon, ...) that /proc/self/status has, in bytes."""
    out = {}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, _, rest = line.partition(":")
        if name in fields:
            out[name] = int(rest.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM := VmRSS); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """RSS every ``interval`` seconds, the max per phase (the main thread sets ``phase``); ``count`` samples."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.phase = interval, "setup"
        self.peaks: dict[str, int] = {}
        self.count = 0
        self._halt = threading.Event()

    def run(self) -> None:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            while not self._halt.is_set():
                rss = int(os.pread(fd, 128, 0).split()[1]) * PAGE
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
                self.count += 1
                self._halt.wait(self.interval)
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- the page cache and the device ------------------------------------------------------------------------------------

def files_under(*roots: Path) -> list[Path]:
    """Each root that is a file, and every file (not link) below each root that is a folder."""
    out = []
    for root in roots:
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out += sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    return out


def evict(*roots: Path, tries: int = 1, slack: int = 0) -> int:
    """Drop every file's pages under ``roots`` from the page cache; bytes still cached after (fincore; -1 unknown).

    Pages a process has mapped stay (the kernel will not drop them): resident weights that are views of a
    mapped file are memory, not disk. With ``tries`` > 1, try again a second later while more than ``slack``
    bytes stay cached (another process may unmap them meanwhile).
    """
    files = files_under(*roots)
    if not files:
        return 0
    for attempt in range(tries):
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)  # dirty pages (a just-written offload folder) cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        try:
            out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                                 capture_output=True, text=True, check=True).stdout
            resident = sum(int(x) for x in out.split())
        except (OSError, subprocess.CalledProcessError, ValueError):
            return -1
        if resident <= slack or attempt == tries - 1:
            break
        time.sleep(1)
    return resident


def folder_state(root: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under ``root`` (nothing if it is not there)."""
    out = {}
    for file in files_under(root):
        try:
            st = file.stat()
        except OSError:  # removed meanwhile
            continue
        out[str(file)] = (st.st_size, st.st_mtime_ns)
    return out


def bytes_written(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    """Bytes of the files that appeared or changed between two ``folder_state``s: a file rewritten with the
    same size counts whole, which a plain sum of sizes would miss."""
    return sum(size for name, (size, mtime) in after.items() if before.get(name) != (size, mtime))


def dd_rate(files: list[Path]) -> tuple[float | None, str]:
    """GB/s of ``dd iflag=direct bs=16M`` over the files (page cache bypassed), and how it went."""
    total, seconds = 0, 0.0
    for file in files:
        proc = subprocess.run(["dd", f"if={file}", "of=/dev/null", "bs=16M", "iflag=direct"],
                              capture_output=True, text=True, check=False)
        match = re.search(r"(\d+) bytes .* copied, ([\d.,]+) s", proc.stderr)
        if proc.returncode or not match:
            return None, (proc.stderr.strip().splitlines() or ["dd failed"])[-1]
        total += int(match.group(1))
        seconds += float(match.group(2).replace(",", "."))
    return total / seconds / GB, f"{total / GB:.2f} GB in {seconds:.2f} s"


# -- memory groups (cgroup v1) ----------------------------------------------------------------------------------------

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
RUNTIME_ALLOWANCE = 600 * 10**6  # the issues' "+ 0.6 GB" of runtime (interpreter, libraries, allocator) over a budget


@dataclass(frozen=True)
class GroupUsage:
    """What a memory group's counters said when its child was done."""
    limit: int      # memory.limit_in_bytes, as the kernel rounded it (to pages)
    max_usage: int  # memory.max_usage_in_bytes: the peak of anonymous memory *and page cache* charged to the group
    failcnt: int    # memory.failcnt: how often the limit was hit (each time the kernel reclaimed page cache, or killed)
    oom_kills: int  # oom_kill in memory.oom_control: processes the kernel killed because reclaim was not enough

    def describe(self) -> str:
        return (f"cgroup limit {self.limit / GB:.2f} GB, peak usage {self.max_usage / GB:.2f} GB (page cache "
                f"included), limit hit {self.failcnt} times" + (f", {self.oom_kills} OOM-KILLED" if self.oom_kills else ""))


class MemoryGroup:
    """A fresh cgroup v1 memory group for one child process, so that an offload figure is taken where the model
    truly does not fit: the group's limit counts the page cache, so a side cannot keep its offloaded weights in
    free RAM as cached file pages (without it Accelerate's ``.dat`` files never leave the cache).

    ``with MemoryGroup("throughput-runner", limit) as group: subprocess.run(group.wrap(cmd))``, then
    ``group.usage`` (None if no group could be made) and ``group.warning`` (why not, for the bench to print).
    The group is made inside this process's own memory group (so any limit above still applies) and removed on
    exit, once its child has ended. The child joins it before ``exec``: a tiny ``sh`` writes its own pid into
    ``cgroup.procs`` and then becomes the command, so everything the command allocates is charged.
    """

    def __init__(self, label: str, limit: int):
        self.label, self.limit = label, limit
        self.path: Path | None = None
        self.usage: GroupUsage | None = None
        self.warning = ""

    def __enter__(self) -> "MemoryGroup":
        try:
            self.path = _own_memory_group() / f"bench-{os.getpid()}-{self.label}"
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        except OSError as e:
            self._remove()
            self.path = None
            self.warning = (f"WARNING: no memory cgroup for {self.label} ({e.strerror or e}; needs root and cgroup v1 "
                            f"at {CGROUP_V1}): it ran with no memory limit, so its offload figure does not count")
        return self

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` started inside the group (unchanged when there is none)."""
        if self.path is None:
            return list(cmd)
        return ["sh", "-c", f'echo $$ > "{self.path}/cgroup.procs" && exec "$@"', "sh", *cmd]

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            counters = (int(_read(self.path / f"memory.{name}") or 0)
                        for name in ("limit_in_bytes", "max_usage_in_bytes", "failcnt"))
            oom = dict(line.split() for line in (_read(self.path / "memory.oom_control") or "").splitlines())
            self.usage = GroupUsage(*counters, oom_kills=int(oom.get("oom_kill", 0)))
            self._remove()

    def describe(self) -> str:
        """One line for a report: the counters, or the warning."""
        return self.usage.describe() if self.usage else self.warning

    def record(self) -> dict[str, Any]:
        """The same for a bench's ``--json``: the counters, or ``{"warning": ...}``."""
        return vars(self.usage) if self.usage else {"warning": self.warning}

    def _remove(self) -> None:
        """rmdir once the child's tasks are gone; the page cache still charged to the group moves to the parent."""
        if self.path is None or not self.path.exists():
            return
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:  # EBUSY while the child is still exiting
                time.sleep(0.1)
        print(f"WARNING: could not remove the memory cgroup {self.path}", file=sys.stderr)


def _own_memory_group() -> Path:
    """This process's memory cgroup folder (the v1 hierarchy's root when it cannot tell)."""
    if not (CGROUP_V1 / "cgroup.procs").exists():
        raise FileNotFoundError(2, "no cgroup v1 memory hierarchy")
    for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and (CGROUP_V1 / path.lstrip("/")).is_dir():
            return CGROUP_V1 / path.lstrip("/")
    return CGROUP_V1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


# -- formatting -------------------------------------------------------------------------------------------------------

def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def run_child(script: str, side: str, args: dict, group_name: str, limit: int | None, tail: int = 2000) -> dict:
    """``script --child side args`` in a fresh process, in a memory group of ``limit`` bytes when given (its record
    under ``cgroup``); the child's ``RESULT`` line, or an ``error`` with its exit code and last output."""
    cmd = [sys.executable, script, "--child", side, json.dumps(args)]
    group = MemoryGroup(group_name, limit) if limit else None
    if group:
        with group:
            if group.warning:
                print(group.warning, flush=True)
            proc = subprocess.run(group.wrap(cmd), capture_output=True, text=True)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    memory = {"cgroup": group.record()} if group else {}
    if group:
        print(f"  {side}: {group.describe()}", flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), **memory}
    killed = " (OOM-killed in its memory cgroup)" if group and group.usage and group.usage.oom_kills else ""
    return {"error": f"exit code {proc.returncode}{killed}: " + (proc.stderr or proc.stdout)[-tail:], **memory}
