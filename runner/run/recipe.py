"""One job, top to bottom, with no Hydra in sight: what ``python -m runner`` and ``python -m runner.lab.replay``
run, and what a test or a notebook can call with a ``RunConfig`` of its own.

1. check that the way the process was launched fits ``parallel.mode``;
2. ``mode=plan`` or ``mode=check``: build on meta, plan (or check the map file), explain, write ``plan.json``;
3. ``mode=run``: a batch job over the data: plan, check the first rows, load, run the task on every row,
   write ``predictions.jsonl`` as rows finish, then ``report.json`` and ``manifest.json``.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from runner.config import RunConfig
from runner.errors import RunnerError
from runner.lab.status import Outcome
from runner.run import job, plan
from runner.run.embed import EmbedRows
from runner.run.generate import GenerateRows
from runner.run.launch import Launch, check_launch
from runner.run.score import ScoreRows

ROW_TASKS = {"generate": GenerateRows, "score": ScoreRows, "embed": EmbedRows}  # how each task treats a row


def run(config: RunConfig, run_dir: Path, launch: Launch | None = None) -> Outcome:
    """Run one job into ``run_dir``: the text to show and the files written, or the bad input that stopped it
    (``Outcome.error``, one line per problem). An interrupt, or a bug, is raised."""
    try:
        check_launch(config, launch)
        if config.mode in ("plan", "check"):
            if launch is not None and not launch.main:
                return Outcome()  # a plan or a check is made once, by rank 0
            return Outcome(*plan.run(config, run_dir))
        with deterministic(config.runtime.deterministic):
            return Outcome(*job.run(config, run_dir, ROW_TASKS[config.task.name], launch))
    except RunnerError as e:
        return Outcome(error=e)


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """torch's deterministic algorithms, where it has them, for the job alone: a replay on the same machine gives
    the same bytes, and a later job of the same process (a sweep) starts from torch's own setting."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    _set_deterministic(on, warn_only=True)
    try:
        yield
    finally:
        _set_deterministic(*before)


def _set_deterministic(on: bool, warn_only: bool) -> None:
    # torch.use_deterministic_algorithms also imports the compiler's config to set its flag there: 2 s and 80 MB
    # (sympy) per process. The runner compiles nothing, so the eager switch alone is set unless the compiler is
    # already loaded (by a caller of the Python API that compiles).
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(on, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(on, warn_only=warn_only)
