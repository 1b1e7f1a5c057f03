"""``predictions.jsonl`` written as the job goes, in input order, durable batch by batch, and resumable.

Rows finish out of order (batches are sorted by length), so a finished line waits until every row
before it is written. Each flush is one append of whole lines followed by ``fsync``: after a crash the
file holds complete lines, and at most a torn last one, which has no newline and which resuming drops.

``job.json`` beside it records what the output depends on (model, weights, task, data, seed, batch
shape) and when the job first started. Resuming with different settings would mix two jobs' lines in
one file, so it is refused, naming the setting that changed.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from runner.errors import DataError
from runner.data.writes import atomic_write, disk_full, is_disk_full
from runner.lab.status import changed_keys, short

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
JOB = "job.json"
# What an output line depends on: the same values give the same bytes. (Placement, memory caps and the
# progress interval do not change a line, so a job may resume with a different placement.)
OUTPUT_KEYS = ("model", "checkpoint", "dtype", "tokenizer", "task", "data", "seed", "runtime.batch_size",
               "runtime.seq_len")


def job_settings(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config's values that decide the output lines."""
    out = {}
    for key in OUTPUT_KEYS:
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def start_job(run_dir: Path, settings: dict[str, Any], *, resume: bool) -> None:
    """Record a new job in ``run_dir``, or check that a resumed one has the same settings.

    Raises:
        DataError: the folder holds a job and ``resume`` is false, or it was run with other settings.
    """
    path = run_dir / JOB
    predictions = run_dir / PREDICTIONS
    if path.exists() and resume:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = changed_keys(recorded["settings"], settings)
        if changed:
            k, was, now = changed[0]
            raise DataError(f"resume: {k} was {short(was)} in the job being resumed and is {short(now)} now; "
                            "resume with the same settings, or start a new run folder")
        return
    if not resume and (path.exists() or (predictions.exists() and predictions.stat().st_size)):
        raise DataError(f"{run_dir}: already holds a job's {PREDICTIONS}; pass resume=true to continue it, "
                        "or pick a new run folder (hydra.run.dir=...)")
    created = int(time.time())
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"created": created, "settings": settings}, indent=2) + "\n", "hydra.run.dir")


class PredictionsFile:
    """The job's output lines: appended in input order, each batch flushed and fsynced.

    Args:
        path: the file; on ``resume``, its complete lines are kept: they are the first rows of the input,
            in order (``done`` holds their ids), and the job goes on after them.
        id_key: the output field holding a line's id (``id``, or ``custom_id`` for OpenAI lines).
    """

    def __init__(self, path: Path, *, id_key: str, resume: bool):
        self.path = path
        self.id_key = id_key
        self.done: list[Any] = self._recover() if resume and path.exists() else []
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._order: deque[int] = deque()       # row numbers still to write, in input order
        self._finished: dict[int, str] = {}     # lines finished ahead of an earlier row
        self.lines = len(self.done)              # complete lines in the file
        self._writing: tuple[int, bytes] | None = None  # (file size before, bytes) of the append under way

    def todo(self, row: Any) -> bool:
        """Whether the row still needs its line (resuming keeps the first ``len(done)`` rows' lines)."""
        return row.number >= len(self.done)

    def expect(self, numbers: Iterable[int]) -> None:
        """The next rows to write, in input order (rows already in the file are not expected)."""
        self._order.extend(numbers)

    def put(self, number: int, line: dict[str, Any]) -> None:
        self._finished[number] = json.dumps(line, ensure_ascii=False) + "\n"

    def flush(self) -> int:
        """Append every line whose earlier rows are all written, then fsync; how many were appended."""
        self._settle()
        lines = []
        while self._order and self._order[0] in self._finished:
            lines.append(self._finished.pop(self._order.popleft()))
        if lines:
            data = "".join(lines).encode("utf-8")
            self._writing = (os.fstat(self._fd).st_size, data)
            try:
                while data:  # a regular file takes it in one write; loop for the odd partial one
                    data = data[os.write(self._fd, data):]
                os.fsync(self._fd)
            except OSError as e:
                if not is_disk_full(e):
                    raise
                needed = len(self._writing[1])
                self._cut_back()
                raise disk_full("hydra.run.dir", self.path.parent, f"appending {len(lines)} line(s) to "
                                f"{self.path.name} ({self.lines} already there; resume=true goes on after them)",
                                needed) from e
            self._settle()
        return len(lines)

    def _settle(self) -> None:
        """Count the lines of the last append that reached the file. Ctrl-C can land between a write and its
        count: the next flush (the one that says what is kept) then counts what the file really holds."""
        if self._writing is None:
            return
        before, data = self._writing
        self.lines += data[: max(os.fstat(self._fd).st_size - before, 0)].count(b"\n")
        self._writing = None

    def _cut_back(self) -> None:
        """A full disk took part of the last append: cut the file back to its complete lines, so a resumed job
        starts after the last whole line."""
        before, _ = self._writing
        os.ftruncate(self._fd, before)
        self._writing = (before, b"")  # nothing of it reached the file

    def close(self) -> None:
        assert not self._order, f"rows {list(self._order)[:5]} were expected and never finished (a bug)"
        os.close(self._fd)

    def _recover(self) -> list[Any]:
        """The ids of the complete lines; a torn last line (no newline: the write was cut short) is removed."""
        done = []
        end = 0  # bytes up to the last complete line
        with self.path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break
                try:
                    line = json.loads(raw)
                    done.append(line[self.id_key])
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{self.path} line {n}: not a line this job wrote (no JSON object with "
                                    f"{self.id_key!r}); it was changed by hand: fix or remove the line, "
                                    "or start a new run folder") from None
                end += len(raw)
        size = self.path.stat().st_size
        if size > end:
            log.warning("%s: dropping a torn last line (%d bytes), cut short when the job stopped", self.path,
                        size - end)
            os.truncate(self.path, end)
        log.info("Resuming: %d rows already in %s", len(done), self.path)
        return done


class FollowerOutput:
    """A pipeline rank other than 0: it runs every batch with rank 0, which writes the lines; it writes none."""

    def __init__(self, path: Path, done: list[Any]):
        self.path, self.done, self.lines = path, done, 0

    def todo(self, row: Any) -> bool:
        return row.number >= len(self.done)

    def expect(self, numbers: Iterable[int]) -> None:
        pass

    def put(self, number: int, line: dict[str, Any]) -> None:
        pass

    def flush(self) -> int:
        return 0

    def close(self) -> None:
        pass
