"""Sweeps (``python -m runner -m ...``): a folder per job named by its overrides, resuming, and collection.

A job's folder is named from its overrides (``max_memory.cpu=1GiB,placement=auto``), not from its position in
the sweep, so a resumed or extended sweep finds each job where it ran, and never writes one job's outputs
over another's. The resuming sweeper (``hydra_plugins.runner_sweeper``) asks ``jobs_to_run`` which jobs to
launch; when the sweep ends, ``CollectWhenDone`` writes its table and plot, and counts the failed jobs for
the exit code.
"""
from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from runner.errors import RunnerError, SweepError, say
from runner.lab.status import Outcome, changed_keys, comparable, read_status, short

log = logging.getLogger(__name__)


def job_dir_name(override_dirname: str) -> str:
    """A job's folder name: its overrides, made safe for a path (a slash in a value, a very long list)."""
    if not override_dirname:
        return "defaults"
    safe = re.sub(r"[^\w.=,+@:%-]", "_", override_dirname)
    if safe != override_dirname or len(safe) > 120:  # two names that differ only where sanitized stay apart
        safe = f"{safe[:100]}-{hashlib.sha1(override_dirname.encode()).hexdigest()[:8]}"
    return safe


OmegaConf.register_new_resolver("runner.job_dir", job_dir_name, replace=True)


@dataclass(frozen=True)
class SweepJob:
    overrides: tuple[str, ...]
    run_dir: Path
    config: dict[str, Any]  # its resolved config, as its status records it
    resume: bool
    force: bool


def sweep_job(job_cfg: DictConfig, overrides: list[str]) -> SweepJob:
    """A job of the sweep, from the config Hydra composed for it (``hydra`` node included)."""
    run_dir = Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
    task_cfg = job_cfg.copy()
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    return SweepJob(tuple(overrides), run_dir, comparable(resolved_config(task_cfg)), bool(task_cfg.get("resume")),
                    bool(task_cfg.get("force")))


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config with its interpolations resolved; as written where one cannot be (a bad interpolation, which
    loading the config then reports in one line)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(cfg, resolve=False)


def jobs_to_run(jobs: list[SweepJob], sweep_dir: Path, sweep_overrides: list[str] = ()) -> list[SweepJob]:
    """The jobs to launch: all of them in a new sweep folder; on resume, those not done with the same config.

    Raises:
        SweepError: the folder holds this sweep's jobs and resume is off; a recorded job ran with another config
            (unless forced: its folder is then set aside and the job runs again); a job is still running.
    """
    launched[:] = [job.run_dir for job in jobs]
    statuses = {job.run_dir: read_status(job.run_dir) for job in jobs}
    recorded = [job for job in jobs if statuses[job.run_dir] is not None]
    resume = any(job.resume for job in jobs)
    if not recorded:
        if resume:  # most likely a new timestamped folder: say where the sweep to resume is
            earlier = earlier_sweep(sweep_dir, sweep_overrides)
            log.warning("resume: hydra.sweep.dir=%s holds no jobs of this sweep, so all %d run; %s", sweep_dir,
                        len(jobs), f"to resume the same sweep in {earlier}, pass hydra.sweep.dir={earlier}"
                        if earlier else "to resume a sweep, pass its folder as hydra.sweep.dir")
        return jobs
    if not resume:
        counts = Counter(statuses[job.run_dir].state for job in recorded)
        raise SweepError(f"hydra.sweep.dir={sweep_dir}: already holds {len(recorded)} of this sweep's jobs "
                         f"({', '.join(f'{n} {state}' for state, n in sorted(counts.items()))}); pass resume=true "
                         "to run only the jobs not done, or choose a new hydra.sweep.dir")
    busy = [job for job in recorded if statuses[job.run_dir].in_flight()]
    if busy:
        status = statuses[busy[0].run_dir]
        raise SweepError(f"resume: job {busy[0].run_dir.name} is still running (pid {status.pid}); wait for it "
                         "to end, or stop it, then resume")
    differ = {job.run_dir: changes for job in recorded
              if (changes := changed_keys(statuses[job.run_dir].config, job.config))}
    if differ and not any(job.force for job in jobs):
        shown = "; ".join(f"{run_dir.name}: {key} was {short(was)}, now {short(now)}"
                          for run_dir, [(key, was, now), *_] in list(differ.items())[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise SweepError(f"resume: {len(differ)} of the recorded jobs ran with another config ({shown}{more}); "
                         "resume with the config they ran with, or pass force=true to run them again (their "
                         "folders are kept, renamed <job>.superseded-N)")
    for run_dir in differ:
        _set_aside(run_dir)
    done = {job.run_dir for job in recorded if statuses[job.run_dir].state == "done" and job.run_dir not in differ}
    log.info("resume: %d of %d jobs done and skipped; %d to run", len(done), len(jobs), len(jobs) - len(done))
    return [job for job in jobs if job.run_dir not in done]


def earlier_sweep(sweep_dir: Path, sweep_overrides: list[str]) -> Path | None:
    """The newest sweep folder beside this one (``multirun/<date>/<time>``) run with the same overrides."""
    ours = sorted(o for o in sweep_overrides if o.split("=")[0].lstrip("+~") not in ("resume", "force"))
    root = sweep_dir.parent.parent
    found = []
    for config in root.glob("*/*/multirun.yaml") if root.is_dir() else ():
        try:
            task = OmegaConf.load(config).hydra.overrides.task
        except Exception:  # not a sweep this runner can read: not the one to resume
            continue
        if config.parent != sweep_dir and sorted(o for o in task if o.split("=")[0].lstrip("+~")
                                                 not in ("resume", "force")) == ours:
            found.append(config.parent)
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def _set_aside(run_dir: Path) -> None:
    n = 1
    while (kept := run_dir.with_name(f"{run_dir.name}.superseded-{n}")).exists():
        n += 1
    shutil.move(run_dir, kept)
    log.warning("resume: %s ran with another config; kept as %s, running it again", run_dir, kept.name)


@dataclass(frozen=True)
class Finished:
    jobs: int
    failed: int
    collected: bool = True  # false: the sweep's folder could not be read back (the exit code is then 2)


finished: Finished | None = None  # the sweep this process ran, once collected (for the exit code)
launched: list[Path] = []  # the folders of the jobs this sweep holds (set by the sweeper), launched or skipped


def exit_code(outcomes: list[Outcome]) -> int:
    """A sweep's exit code is the number of its jobs that failed (2: its folder could not be read back); a single
    run's is 2 when it failed. The sweep's count is its jobs' status files', so process launchers count too."""
    global finished
    swept, finished = finished, None
    if swept is not None:
        return min(swept.failed, 125) if swept.collected else 2
    return 2 if any(o.error for o in outcomes) else 0


class CollectWhenDone(Callback):
    """When a sweep ends, its table and plot are written into the sweep folder, and its failed jobs counted."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global finished
        from runner.lab.collect import collect  # matplotlib is loaded only when a sweep ends

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            table = collect(sweep_dir)
        except RunnerError as e:
            say(*e.said())
            finished = Finished(len(launched), len(launched), collected=False)
            return
        ours = [row for row in table.rows if row.folder in {p.name for p in launched}] or table.rows
        failed = sum(row.status != "done" for row in ours)
        finished = Finished(len(ours), failed)
        print(f"\nsweep: {len(ours) - failed} of {len(ours)} jobs done"
              + (f", {failed} failed" if failed else "") + f"; wrote {', '.join(p.name for p in table.paths)} "
              f"to {sweep_dir}")
