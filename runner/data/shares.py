"""A batch job over several processes (``parallel.mode=data``): each rank's share, its own output file, and the
merge into one ``predictions.jsonl``.

Every rank reads the same rows and forms the same length-sorted batches as a single process would; each batch
goes to the first rank to claim it through the launch's shared store, so ranks stay busy to the end. A batch thus runs with the same rows, shapes and seeds as in a single process, and
its lines are the same bytes. Each rank appends its lines to ``predictions.rank-K.jsonl`` (fsynced batch by
batch, a torn last line dropped on resume). At the end, rank 0 writes ``predictions.jsonl`` in input order
from every rank file: byte-identical to a single process's.

Resuming skips the ids already in any rank file (or in a ``predictions.jsonl`` written before), whatever rank
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


def read_lines(path: Path, id_key: str, *, repair: bool = False) -> Iterator[tuple[Any, bytes]]:
    """``(id, line)`` of each complete line; a torn last line (no newline) is skipped, or cut off with ``repair``."""
    end = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break
            try:
                yield json.loads(raw)[id_key], raw
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path} line {n}: not a line this job wrote (no JSON object with {id_key!r}); "
                                "it was changed by hand: fix or remove the line, or start a new run folder") from None
            end += len(raw)
    if repair and path.stat().st_size > end:
        log.warning("%s: dropping a torn last line (%d bytes), cut short when the job stopped", path,
                    path.stat().st_size - end)
        os.truncate(path, end)


def done_ids(run_dir: Path, id_key: str) -> set[Any]:
    """The ids with an output line in any rank file, or in a ``predictions.jsonl`` written before."""
    files = rank_files(run_dir) + ([run_dir / PREDICTIONS] if (run_dir / PREDICTIONS).is_file() else [])
    return {i for path in files for i, _ in read_lines(path, id_key)}


class RankFile:
    """This rank's output lines, appended and fsynced as each batch finishes (order is the merge's job)."""

    def __init__(self, run_dir: Path, rank: int, *, id_key: str, done: set[Any]):
        self.path = run_dir / RANK_FILE.format(rank=rank)
        self.id_key = id_key
        self.done = done
        if self.path.exists():
            for _ in read_lines(self.path, id_key, repair=True):
                pass
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pending: list[str] = []
        self.lines = 0  # lines this run appended

    def todo(self, row_id: Any) -> bool:
        return row_id not in self.done

    def put(self, line: dict[str, Any]) -> None:
        self._pending.append(json.dumps(line, ensure_ascii=False) + "\n")

    def flush(self) -> int:
        if not self._pending:
            return 0
        data, count = "".join(self._pending).encode("utf-8"), len(self._pending)
        self._pending.clear()
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)
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


def merge(run_dir: Path, ids: Iterable[Any], id_key: str) -> Merged:
    """``predictions.jsonl`` from every rank file, in input order (``ids``); written whole or not at all.

    With rows missing (a rank died), what exists is still merged, and the missing ids are returned.
    """
    lines: dict[Any, bytes] = {}
    for path in rank_files(run_dir) + ([run_dir / PREDICTIONS] if (run_dir / PREDICTIONS).is_file() else []):
        for i, raw in read_lines(path, id_key):
            lines.setdefault(i, raw)
    out, missing, count = run_dir / PREDICTIONS, [], 0
    tmp = out.with_name(f".{PREDICTIONS}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        for i in ids:
            if i in lines:
                f.write(lines[i])
                count += 1
            else:
                missing.append(i)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    return Merged(out, count, missing)


class ShareOutput:
    """A rank's side of the job's output, shaped as ``PredictionsFile`` is: rows to do, lines put and flushed."""

    def __init__(self, run_dir: Path, rank: int, *, id_key: str):
        self.done = done_ids(run_dir, id_key)  # read by every rank before any writes: the same set everywhere
        self.file = RankFile(run_dir, rank, id_key=id_key, done=self.done)
        self.path = self.file.path

    @property
    def lines(self) -> int:
        return self.file.lines

    def todo(self, row: Any) -> bool:
        return row.id not in self.done

    def expect(self, numbers: Iterable[int]) -> None:
        pass  # a rank's lines go out as they finish: the merge puts them in input order

    def put(self, number: int, line: dict[str, Any]) -> None:
        self.file.put(line)

    def flush(self) -> int:
        return self.file.flush()

    def close(self) -> None:
        self.file.close()


def check_fresh(run_dir: Path, *, resume: bool) -> None:
    """A new data-parallel job may not start over another's rank files."""
    if not resume and rank_files(run_dir):
        raise DataError(f"{run_dir}: already holds a job's {rank_files(run_dir)[0].name}; pass resume=true to "
                        "continue it (with any number of ranks), or pick a new run folder (hydra.run.dir=...)")
