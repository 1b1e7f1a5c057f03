"""One root error per run, one subclass per stage.

A ``RunnerError`` is bad input, never a bug: ``python -m runner`` prints each of
its lines as ``error: <stage>: <line>`` and exits with code 2. Anything else that
escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

import signal
import sys


class RunnerError(Exception):
    """Bad input found by some stage; ``lines`` holds every finding, one per line."""

    stage = "runner"

    def __init__(self, *lines: str):
        self.lines = tuple(lines) or ("unknown error",)
        super().__init__("\n".join(self.lines))

    def said(self) -> list[str]:
        """The lines as the command line prints them: ``error: <stage>: <line>``."""
        return [f"error: {self.stage}: {line}" for line in self.lines]


def say(*lines: str) -> None:
    """Lines to stderr in one write: the ranks of a torchrun launch share the stream, and a line written in pieces
    could interleave with another rank's."""
    sys.stderr.write("".join(line + "\n" for line in lines))
    sys.stderr.flush()


class ConfigError(RunnerError):
    stage = "config"


class HardwareError(RunnerError):
    stage = "hardware"


class BuildError(RunnerError):
    stage = "build"


class CheckpointError(RunnerError):
    stage = "checkpoint"


class PlanError(RunnerError):
    stage = "plan"


class MapError(RunnerError):
    """The device map does not fit the model or the hardware (validate stage)."""

    stage = "validate"


class OffloadError(RunnerError):
    stage = "offload"


class SimulatedOutOfMemory(RunnerError):
    """A simulated GPU was asked to hold more bytes than its budget."""

    stage = "memory"


class GenerateError(RunnerError):
    """A request the loaded engine cannot serve as planned (too long, too many, or the wrong task)."""

    stage = "generate"


class DataError(RunnerError):
    """A batch job's input or output files: a bad row, a missing file, a run folder that cannot be resumed."""

    stage = "data"


class EmbedError(RunnerError):
    """A model that gives no hidden states to embed, or a batch it cannot embed (empty, or past its context)."""

    stage = "embed"


class ScoreError(RunnerError):
    """A text or continuation with nothing to score, or a request the model cannot read whole."""

    stage = "score"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stops, saying what it was doing and what is kept."""

    def __init__(self, signum: int, kept: str = ""):
        self.signum = signum
        self.kept = kept  # what survives, and how to go on; empty: nothing beyond what the run folder holds
        super().__init__(kept)

    @classmethod
    def raise_for(cls, signum: int, frame: object = None) -> None:
        """A signal handler: SIGTERM (a scheduler's stop) ends the run as Ctrl-C does, in one line."""
        raise cls(signum)

    @staticmethod
    def signum_of(e: KeyboardInterrupt) -> int:
        return e.signum if isinstance(e, Interrupted) else signal.SIGINT

    @staticmethod
    def line(e: KeyboardInterrupt) -> str:
        """What the command line says when a run is stopped: the signal, and what is kept."""
        kept = e.kept if isinstance(e, Interrupted) and e.kept else "nothing kept beyond what the run folder holds"
        return f"interrupted: {signal.Signals(Interrupted.signum_of(e)).name}; {kept}"


class SweepError(RunnerError):
    """A sweep that cannot start or resume as asked, or a sweep folder that cannot be collected or replayed."""

    stage = "sweep"


class DiskFull(RunnerError):
    """A folder the runner writes to (the run folder, the offload folder, the cache) has no room left."""

    stage = "disk"


class OutOfMemory(RunnerError):
    """A real allocation failed although the plan fitted: the device had less memory than its budget said."""

    stage = "memory"


def interrupted(e: KeyboardInterrupt, kept: str) -> Interrupted:
    """The same signal (SIGINT for a plain Ctrl-C), now saying what is kept."""
    return Interrupted(Interrupted.signum_of(e), kept)
