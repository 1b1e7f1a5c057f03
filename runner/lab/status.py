"""A job's state on disk: ``status.json`` in its run folder says ``running``, ``done`` or ``failed`` (with the
one-line reason), for the resolved config it ran with.

Any launcher (in-process, joblib, submitit, Ray) and any later reader (the sweep's collection, a resumed sweep)
sees the same truth, since it is a file and not a list in some process's memory. Each write is atomic: a
reader finds the old status or the new one, never half of one.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from runner.errors import DataError, DiskFull, Interrupted, RunnerError
from runner.data.writes import atomic_write

log = logging.getLogger(__name__)

STATUS = "status.json"
# Keys that do not change what a job computes: a resumed job may differ in them.
NOT_COMPARED = ("resume", "force", "runtime.log_every")

State = Literal["running", "done", "failed"]


@dataclass
class JobStatus:
    state: State
    config: dict[str, Any]                 # the resolved config, less NOT_COMPARED
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides
    reason: str | None = None              # failed: the one-line error
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started: str = field(default_factory=lambda: _now())
    ended: str | None = None

    def finished(self, state: State, reason: str | None = None) -> JobStatus:
        return JobStatus(state, self.config, self.overrides, reason, self.host, self.pid, self.started, _now())

    def in_flight(self) -> bool:
        """Running, in a process that is still alive on this machine (from another one it cannot be told)."""
        if self.state != "running" or self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.pid != os.getpid()


@dataclass(frozen=True)
class Outcome:
    """What one job came to: the text to show and the files it wrote, or the error that ended it."""

    text: str = ""
    paths: dict[str, Path] = field(default_factory=dict)
    error: RunnerError | None = None

    @property
    def state(self) -> State:
        return "failed" if self.error is not None else "done"

    @property
    def reason(self) -> str | None:
        return None if self.error is None else "; ".join(f"{self.error.stage}: {line}" for line in self.error.lines)


def recorded(run_dir: Path, resolved: dict[str, Any], overrides: list[str], job: Callable[[], Outcome], *,
             writes: bool = True) -> Outcome:
    """``job()``, its state in ``status.json`` as it starts and as it ends; a ``RunnerError`` it raises (a config
    that does not load, before the recipe runs) is a failed outcome. ``writes=False``: another process (rank 0)
    speaks for this job."""
    status = JobStatus("running", comparable(resolved), overrides)
    write = write_status if writes else (lambda *_: None)
    write(run_dir, status)
    try:
        outcome = job()
    except RunnerError as e:
        outcome = Outcome(error=e)
    except KeyboardInterrupt as e:
        write(run_dir, status.finished("failed", f"interrupted: {signal.Signals(Interrupted.signum_of(e)).name}"))
        raise
    except BaseException as e:  # a bug: the folder says so, and the traceback stays
        write(run_dir, status.finished("failed", f"bug: {type(e).__name__}: {e}"))
        raise
    write(run_dir, status.finished(outcome.state, outcome.reason))
    return outcome


def comparable(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as a job's status records it: without the keys that change nothing."""
    out = json.loads(json.dumps(resolved, default=str))
    for key in NOT_COMPARED:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def write_status(run_dir: Path, status: JobStatus) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(run_dir / STATUS, json.dumps(asdict(status), indent=2) + "\n", "hydra.run.dir")
    except DiskFull as e:  # the job's own writes meet the full disk too, and say so in their one line
        log.warning("%s not written: %s", STATUS, e.lines[0])


def read_status(run_dir: Path) -> JobStatus | None:
    """The job's status; None where no job ran."""
    path = run_dir / STATUS
    if not path.is_file():
        return None
    try:
        return JobStatus(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a status this runner wrote ({type(e).__name__}); remove the file to run "
                        "the job again") from None


def changed_keys(was: Any, now: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ, down to the innermost one."""
    if isinstance(was, dict) and isinstance(now, dict):
        return [c for k in {**was, **now} for c in changed_keys(was.get(k), now.get(k), f"{key}.{k}" if key else k)]
    return [] if was == now else [(key, was, now)]


def short(value: Any) -> str:
    """A value in a one-line message."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
