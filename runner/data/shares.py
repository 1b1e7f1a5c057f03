"""A batch job over several processes (``parallel.mode=data``): each rank's share, its own output file, and the
merge into one ``predictions.jsonl``.

Every rank reads the same rows and forms the same length-sorted batches as a single process would; each batch
goes to the first rank to claim it through the launch's shared store, so ranks stay busy to the end. A batch thus runs with the same rows, shapes and seeds as in a single process, and
its lines are the same bytes. Each rank appends its lines to ``predictions.rank-K.jsonl`` (fsynced batch by
batch, a torn last line dropped on resume). At the end, rank 0 writes ``predictions.jsonl`` in input order
from every rank file: byte-identical to a single process's.

Resuming skips the rows already in any rank file (or in a ``predictions.jsonl`` written before), whatever rank
wrote them and however many ranks there were: a batch with one row to do runs whole, as it first ran, and
only its rows not done are written.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.data.writer import PREDICTIONS
from runner.errors import DataError
from runner.data.writes import disk_full, is_disk_full, temp_path

log = logging.getLogger(__name__)

RANK_FILE = "predictions.rank-{rank}.jsonl"


@dataclass
class Share:
    """Which batches are this rank's. With ``claim`` (a counter every rank shares), batch k is the first rank's to
    claim it, so a rank that finishes early takes more; without, batch k (counted over the whole job) is rank
    ``k % world_size``'s. Either way a batch runs whole, on one rank, as it would in one process."""

    rank: int = 0
    world_size: int = 1
    claim: Callable[[int], bool] | None = None
    batches: int = 0   # batches seen so far
    ran: int = 0       # of those, run here (those with rows not done)

    def take(self) -> bool:
        """Whether the next batch is this rank's."""
        k, self.batches = self.batches, self.batches + 1
        if self.claim is not None:
            return self.claim(k)
        return k % self.world_size == self.rank

    @property
    def writes_bad_rows(self) -> bool:
        """Rows refused before batching (``data.on_error=skip``) are written by rank 0."""
        return self.rank == 0


def rank_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(RANK_FILE.format(rank="*")), key=lambda p: int(p.name.split(".")[1][5:]))


def read_lines(path: Path, *, repair: bool = False) -> Iterator[tuple[int, bytes]]:
    """``(row number, output line)`` of each complete line. A rank file's lines are ``<row number>\t<line>`` (ids
    need not be unique or hashable: a skipped row's may be anything); a ``predictions.jsonl`` holds the first rows
    in order. A torn last line (no newline) is skipped, or cut off with ``repair``."""
    ranked = path.name != PREDICTIONS
    end = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f):
            if not raw.endswith(b"\n"):
                break
            number, tab, line = raw.partition(b"\t") if ranked else (str(n).encode(), b"\t", raw)
            if not tab or not number.isdigit():
                raise DataError(f"{path} line {n + 1}: not a line this job wrote (<row number><tab><output line>); "
                                "it was changed by hand: fix or remove the line, or start a new run folder")
            yield int(number), line
            end += len(raw)
    if repair and path.stat().st_size > end:
        log.warning("%s: dropping a torn last line (%d bytes), cut short when the job stopped", path,
                    path.stat().st_size - end)
        os.truncate(path, end)


def _outputs(run_dir: Path) -> list[Path]:
    """Every file holding this job's lines: the rank files, and a ``predictions.jsonl`` written before."""
    return rank_files(run_dir) + ([run_dir / PREDICTIONS] if (run_dir / PREDICTIONS).is_file() else [])


def done_rows(run_dir: Path) -> set[int]:
    """The row numbers with an output line in any rank file, or in a ``predictions.jsonl`` written before."""
    return {number for path in _outputs(run_dir) for number, _ in read_lines(path)}


class RankFile:
    """This rank's output lines, each after its row number, appended and fsynced as each batch finishes (order is
    the merge's job)."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / RANK_FILE.format(rank=rank)
        if self.path.exists():
            for _ in read_lines(self.path, repair=True):
                pass
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pending: list[str] = []
        self.lines = 0  # lines this run appended

    def put(self, number: int, line: dict[str, Any]) -> None:
        self._pending.append(f"{number}\t{json.dumps(line, ensure_ascii=False)}\n")

    def flush(self) -> int:
        if not self._pending:
            return 0
        data, count = "".join(self._pending).encode("utf-8"), len(self._pending)
        self._pending.clear()
        before, needed = os.fstat(self._fd).st_size, len(data)
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError as e:
            if not is_disk_full(e):
                raise
            os.truncate(self.path, before)  # no cut-short line: resume finds whole lines only
            raise disk_full("hydra.run.dir", self.path.parent, f"appending {count} line(s) to {self.path.name} "
                            f"({self.lines} written this run; resume=true goes on after them)", needed) from e
        self.lines += count
        return count

    def close(self) -> None:
        self.flush()
        os.close(self._fd)


@dataclass
class Merged:
    path: Path
    lines: int
    missing: list[Any] = field(default_factory=list)  # ids of input rows no rank file holds


def merge(run_dir: Path, ids: Iterable[Any]) -> Merged:
    """``predictions.jsonl`` from every rank file, in input order (``ids``: each row's id, in order); written
    whole or not at all. With rows missing (a rank died), what exists is still merged, and their ids returned."""
    lines: dict[int, bytes] = {}
    for path in _outputs(run_dir):
        for number, line in read_lines(path):
            lines.setdefault(number, line)
    out, missing, count = run_dir / PREDICTIONS, [], 0
    tmp = temp_path(out)
    try:
        with tmp.open("wb") as f:
            for number, i in enumerate(ids):
                if number in lines:
                    f.write(lines[number])
                    count += 1
                else:
                    missing.append(i)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full("hydra.run.dir", run_dir, f"merging the rank files into {PREDICTIONS}",
                            sum(len(line) for line in lines.values())) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return Merged(out, count, missing)


class ShareOutput:
    """A rank's side of the job's output, shaped as ``PredictionsFile`` is: rows to do, lines put and flushed."""

    def __init__(self, run_dir: Path, rank: int):
        self.done = done_rows(run_dir)  # read by every rank before any writes: the same set everywhere
        self.file = RankFile(run_dir, rank)
        self.path = self.file.path

    @property
    def lines(self) -> int:
        return self.file.lines

    def todo(self, row: Any) -> bool:
        return row.number not in self.done

    def expect(self, numbers: Iterable[int]) -> None:
        pass  # a rank's lines go out as they finish: the merge puts them in input order

    def put(self, number: int, line: dict[str, Any]) -> None:
        self.file.put(number, line)

    def flush(self) -> int:
        return self.file.flush()

    def close(self) -> None:
        self.file.close()


def check_fresh(run_dir: Path, *, resume: bool) -> None:
    """A new data-parallel job may not start over another's rank files."""
    if not resume and rank_files(run_dir):
        raise DataError(f"{run_dir}: already holds a job's {rank_files(run_dir)[0].name}; pass resume=true to "
                        "continue it (with any number of ranks), or pick a new run folder (hydra.run.dir=...)")
