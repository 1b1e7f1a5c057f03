"""``python -m runner``: compose the config with Hydra, run the pipeline, print and write the report.

Bad input of any kind ends in one line per problem, ``error: <stage>: ...``, and exit code 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from runner.config import CONF_DIR, GROUP_HINT, load_config
from runner import distributed, sweeps
from runner.errors import Interrupted, RunnerError
from runner.status import JobStatus, comparable
from runner.status import write_status as _write_status
from runner.tasks import batch, plan
from runner.tasks.embed import EmbedRows
from runner.tasks.generate import GenerateRows
from runner.tasks.score import ScoreRows

log = logging.getLogger("runner")
TASKS = {"generate": GenerateRows, "score": ScoreRows, "embed": EmbedRows}  # how each task treats a row
_failed_runs = 0  # a single run's failures; a sweep's are counted from its jobs' status files


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> str:
    """One job: its state goes to ``status.json`` in its run folder as it starts and as it ends."""
    global _failed_runs
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    launch = distributed.current()
    status = JobStatus("running", comparable(sweeps.resolved_config(cfg)), list(hydra_cfg.overrides.task))
    write_status = _write_status if launch is None or launch.main else lambda *_: None  # rank 0 speaks for all
    write_status(run_dir, status)
    try:
        config = replace(load_config(cfg), overrides=tuple(hydra_cfg.overrides.task))
        _check_launch(config, launch)
        if launch is not None and not launch.main and config.mode != "run":
            return "done"  # a plan or a check is made once, by rank 0
        # A replay on the same machine gives the same bytes (set either way: a sweep's jobs share this process).
        # A plan computes nothing, and the switch's first use imports torch's compiler stack (2 s).
        if config.mode == "run":
            torch.use_deterministic_algorithms(bool(cfg.runtime.get("deterministic", True)), warn_only=True)
        if config.mode in ("plan", "check"):
            text, paths = plan.run(config, run_dir)
        else:
            text, paths = batch.run(config, run_dir, TASKS[config.task.name])
    except RunnerError as e:
        _print_error(e)
        write_status(run_dir, status.finished("failed", "; ".join(f"{e.stage}: {line}" for line in e.lines)))
        _failed_runs += 1
        return "failed"
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        write_status(run_dir, status.finished("failed", f"interrupted: {signal.Signals(signum).name}"))
        raise
    except BaseException as e:  # a bug: the folder says so, and the traceback stays
        write_status(run_dir, status.finished("failed", f"bug: {type(e).__name__}: {e}"))
        raise
    if paths:  # (the other ranks of a data-parallel job have nothing of their own to show)
        print(text)
        print(f"\nWrote {', '.join(paths)} to {run_dir}")
    write_status(run_dir, status.finished("done"))
    return "done"


def _check_launch(config, launch: distributed.Launch | None) -> None:
    """``parallel.mode`` and the way the process was started must agree."""
    sizing = config.parallel.mode == "pipeline" and config.mode == "plan"  # a cluster planned from here
    if config.parallel.mode != "none" and launch is None and not sizing:
        raise distributed.ParallelError(
            f"parallel.mode={config.parallel.mode}: this process was not started by torchrun (RANK, WORLD_SIZE, "
            f"MASTER_ADDR ... are unset); run torchrun --nproc-per-node=N -m runner parallel.mode="
            f"{config.parallel.mode} ..., or set parallel.mode=none")
    if sizing and launch is not None:
        raise distributed.ParallelError("mode=plan with parallel.mode=pipeline plans every rank's stage from one "
                                        "process: run it without torchrun (parallel.nodes and "
                                        "parallel.ranks_per_node set the cluster)")
    if config.parallel.mode == "pipeline" and config.mode == "check":
        raise distributed.ParallelError("mode=check validates a whole model's map: run it with parallel.mode=none")
    if config.parallel.mode == "pipeline" and config.task.name != "generate":
        raise distributed.ParallelError(f"parallel.mode=pipeline runs task=generate, not task={config.task.name}; "
                                        "use parallel.mode=data to share scoring or embedding between ranks")
    if config.parallel.mode == "none" and launch is not None and launch.world_size > 1:
        raise distributed.ParallelError(
            f"parallel.mode=none, but torchrun started {launch.world_size} processes: each would run the whole job "
            "into the same folder; set parallel.mode=data to share the rows between them")


def main() -> int:
    # Let Hydra's own errors (unknown group option, bad override) reach us, to print them in one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    signal.signal(signal.SIGTERM, _terminated)  # a scheduler's stop: end as Ctrl-C does, in one line
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts
    sweeps.finished = None
    try:
        launch = distributed.launch_from_env()
        if launch is not None:
            if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
                raise distributed.ParallelError("a sweep (-m) cannot run under torchrun: launch each of its jobs "
                                                "with torchrun, or sweep in one process")
            distributed.start(launch)
            sys.argv = _rank_argv(sys.argv, launch)
    except RunnerError as e:
        _print_error(e)
        return 2
    try:
        return _run()
    finally:
        distributed.stop()


def _run() -> int:
    """Hydra's app, and its exit code: each kind of failure in one line."""
    try:
        app()
    except RunnerError as e:  # a sweep refused before any job ran (resume)
        _print_error(e)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        _say(f"error: config: {_one_line(str(e) or str(e.__cause__) or type(e).__name__)}")
        return 2
    except (ValueError, TypeError) as e:  # Hydra's own, for a group given a number or a list: task=1
        if not _raised_by_hydra(e):
            raise
        _say(f"error: config: {_one_line(str(e))}; {GROUP_HINT}")
        return 2
    except OSError as e:
        if not _raised_by_hydra(e):
            raise  # from the runner's own code it is a bug: keep the traceback
        key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in sys.argv[1:]) else "hydra.run.dir"
        _say(f"error: config: {key}: cannot make the run folder {e.filename} ({e.strerror or e}); "
             f"set {key} to a writable folder on a disk")
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        kept = e.kept if isinstance(e, Interrupted) and e.kept else "nothing kept beyond what the run folder holds"
        _say(f"interrupted: {signal.Signals(signum).name}; {kept}")
        return 128 + signum
    if sweeps.finished is not None:  # a sweep: its exit code is the number of jobs that failed
        return min(sweeps.finished.failed, 125) if sweeps.finished.collected else 2
    return 2 if _failed_runs else 0


def _rank_argv(argv: list[str], launch: distributed.Launch) -> list[str]:
    """Every rank of a launch writes into the same run folder (rank 0 names it); only rank 0 keeps Hydra's
    ``.hydra/``, and each rank logs to its own file."""
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv[1:]):
        stamp = distributed.agree(lambda: time.strftime("%Y-%m-%d/%H-%M-%S"))
        extra.append(f"hydra.run.dir=outputs/{stamp}")
    if not launch.main:
        extra += ["hydra.output_subdir=null", f"hydra.job.name=runner-rank{launch.rank}"]
    return [*argv, *extra]


def _raised_by_hydra(e: Exception) -> bool:
    """Whether Hydra itself raised it (making the run folder, opening its log), not the runner's task code."""
    owners = [f.filename for f in traceback.extract_tb(e.__traceback__)
              if f"{os.sep}hydra{os.sep}" in f.filename or f"{os.sep}runner{os.sep}" in f.filename]
    return bool(owners) and f"{os.sep}hydra{os.sep}" in owners[-1]


def _terminated(signum: int, frame) -> None:
    raise Interrupted(signum)


def _print_error(e: RunnerError) -> None:
    for line in e.lines:
        _say(f"error: {e.stage}: {line}")


def _say(line: str) -> None:
    """One line to stderr in one write: the ranks of a torchrun launch share the stream, and a line written in
    pieces could interleave with another rank's."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _one_line(message: str) -> str:
    """Hydra's multi-line messages (a header, then an indented list of options) on one line."""
    message = message.split("Config search path")[0]  # Hydra appends its search path: noise to a user
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    head, options = [], []
    for line in lines:
        (options if head and head[-1].endswith(":") else head).append(line)
    return " ".join(head) + (" " + ", ".join(options) if options else "")


if __name__ == "__main__":
    sys.exit(main())
