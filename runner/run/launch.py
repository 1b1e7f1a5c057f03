"""Runs launched by ``torchrun``: which process this is, its process group, and what the processes agree on.

``torchrun`` (or ``srun`` + ``torchrun`` on SLURM) starts one process per rank with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. Every rank composes the same
config; rank 0 decides what must be one value for all (the run folder's name, a check's verdict) and the
others take it. The group uses gloo for CPU tensors and Python objects, and NCCL for CUDA tensors.
"""
from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from runner.config import RunConfig
from runner.errors import RunnerError

T = TypeVar("T")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = dt.timedelta(hours=2)  # a collective waits this long for a slow rank (a long share, a slow load)


class ParallelError(RunnerError):
    stage = "parallel"


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch_from_env(env: Mapping[str, str] = os.environ) -> Launch | None:
    """This process's place in a torchrun launch; None when not launched by torchrun.

    Raises:
        ParallelError: some of torchrun's variables are set and others not, or they are not numbers.
    """
    present = [k for k in ENV if k in env]
    if not present:
        return None
    missing = [k for k in ENV if k not in env]
    if missing:
        raise ParallelError(f"{', '.join(present)} set but not {', '.join(missing)}: a partial torchrun "
                            "environment; launch with torchrun --nproc-per-node=N -m runner ..., or unset them")
    try:
        launch = Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"]))
    except ValueError:
        raise ParallelError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers "
                            f"(got {', '.join(env[k] for k in ENV[:4])})") from None
    if not (0 <= launch.rank < launch.world_size and 0 <= launch.local_rank < launch.local_world_size):
        raise ParallelError(f"RANK={launch.rank} of WORLD_SIZE={launch.world_size} (LOCAL_RANK="
                            f"{launch.local_rank} of {launch.local_world_size}) is not a place in the launch")
    return launch


_launch: Launch | None = None


def start(launch: Launch) -> None:
    """Join the process group (once). The collectives below then talk to it; everything else is passed the
    ``Launch`` it needs."""
    global _launch
    if _launch is not None:
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():  # each local rank drives its own GPUs (see owned_gpus)
        gpus = owned_gpus(launch, torch.cuda.device_count())
        if gpus:
            torch.cuda.set_device(gpus[0])
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    _launch = launch


def stop() -> None:
    global _launch
    if _launch is not None and dist.is_initialized():
        dist.destroy_process_group()
    _launch = None


def owned_gpus(launch: Launch, count: int) -> list[int]:
    """The GPUs of this node that a local rank drives: an even, contiguous share (one each, when as many)."""
    per = count // launch.local_world_size
    return list(range(launch.local_rank * per, (launch.local_rank + 1) * per))


def agree(decide: Callable[[], T]) -> T:
    """Rank 0's ``decide()``, on every rank (a single process just decides)."""
    if _launch is None or not dist.is_initialized():
        return decide()
    box = [decide() if _launch.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_or_raise(check: Callable[[], T]) -> T:
    """Rank 0's ``check()``, on every rank; a ``RunnerError`` it raises is raised on every rank, so none is left
    waiting for the others."""
    def verdict() -> tuple[bool, Any]:
        try:
            return True, check()
        except RunnerError as e:
            return False, (type(e).__name__, e.lines)

    ok, value = agree(verdict)
    if not ok:
        raise _error(*value)
    return value


def claimer(job: str) -> Callable[[int], bool] | None:
    """Work items claimed through the launch's key-value store (torchrun's rendezvous store): ``claim(k)`` is
    true on the first rank to ask for item k. None outside a launch."""
    if _launch is None or not dist.is_initialized():
        return None
    store = dist.distributed_c10d._get_default_store()
    return lambda k: store.add(f"runner/{job}/{k}", 1) == 1


def gather(value: T) -> list[T] | None:
    """Every rank's ``value`` on rank 0 (in rank order); None on the other ranks."""
    if _launch is None:
        return [value]
    out: list[Any] | None = [None] * _launch.world_size if _launch.main else None
    dist.gather_object(value, out, dst=0)
    return out


def all_gather(value: T) -> list[T]:
    """Every rank's ``value``, on every rank."""
    if _launch is None:
        return [value]
    out: list[Any] = [None] * _launch.world_size
    dist.all_gather_object(out, value)
    return out


def _error(kind: str, lines: tuple[str, ...]) -> RunnerError:
    """The error rank 0 found, as the same class (so its stage prints the same) on this rank."""
    classes, todo = {}, [RunnerError]
    while todo:
        cls = todo.pop()
        classes[cls.__name__] = cls
        todo += cls.__subclasses__()
    return classes.get(kind, RunnerError)(*lines)


def check_launch(config: RunConfig, launch: Launch | None) -> None:
    """``parallel.mode`` and the way the process was started must agree.

    Raises:
        ParallelError: one line naming the setting to change, or how to launch.
    """
    sizing = config.parallel.mode == "pipeline" and config.mode == "plan"  # a cluster planned from here
    if config.parallel.mode != "none" and launch is None and not sizing:
        raise ParallelError(
            f"parallel.mode={config.parallel.mode}: this process was not started by torchrun (RANK, WORLD_SIZE, "
            f"MASTER_ADDR ... are unset); run torchrun --nproc-per-node=N -m runner parallel.mode="
            f"{config.parallel.mode} ..., or set parallel.mode=none")
    if sizing and launch is not None:
        raise ParallelError("mode=plan with parallel.mode=pipeline plans every rank's stage from one process: run "
                            "it without torchrun (parallel.nodes and parallel.ranks_per_node set the cluster)")
    if config.parallel.mode == "pipeline" and config.mode == "check":
        raise ParallelError("mode=check validates a whole model's map: run it with parallel.mode=none")
    if config.parallel.mode == "pipeline" and config.task.name != "generate":
        raise ParallelError(f"parallel.mode=pipeline runs task=generate, not task={config.task.name}; "
                            "use parallel.mode=data to share scoring or embedding between ranks")
    if config.parallel.mode == "none" and launch is not None and launch.world_size > 1:
        raise ParallelError(
            f"parallel.mode=none, but torchrun started {launch.world_size} processes: each would run the whole job "
            "into the same folder; set parallel.mode=data to share the rows between them")


def joined(argv: list[str]) -> tuple[Launch | None, list[str]]:
    """This process's launch, joined, and the command line its rank runs: every rank writes into the same run
    folder (rank 0 names it); only rank 0 keeps Hydra's ``.hydra/``, and each rank logs to its own file.

    Raises:
        ParallelError: a partial torchrun environment, or a sweep under torchrun.
    """
    launch = launch_from_env()
    if launch is None:
        return None, argv
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise ParallelError("a sweep (-m) cannot run under torchrun: launch each of its jobs with torchrun, or "
                            "sweep in one process")
    start(launch)
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv[1:]):
        stamp = agree(lambda: time.strftime("%Y-%m-%d/%H-%M-%S"))
        extra.append(f"hydra.run.dir=outputs/{stamp}")
    if not launch.main:
        extra += ["hydra.output_subdir=null", f"hydra.job.name=runner-rank{launch.rank}"]
    return launch, [*argv, *extra]
