"""A batch job: every row of the data through the task, its output line written as soon as it may be.

The recipe, top to bottom:

1. record the job in the run folder (or check that the job being resumed had the same settings);
2. open ``predictions.jsonl``: on resume, its complete lines are the rows already done;
3. plan the model, and check the first window of rows against the plan before any weight is read;
4. load, then for each window of rows: tokenize and check every row (a bad one ends the run, or is
   written with an ``error``), sort by length into batches, run each batch that holds a row not yet
   done, and append the lines that are ready, in input order, fsynced;
5. write the report: rows, tokens, throughput, latency, peak memory against the plan.

The task (generate, score, embed) is a ``RowTask`` (``runner.run.rows``): how to prepare one row and run one batch.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

from runner.config import RunConfig
from runner.data.rows import Row
from runner.data.sources import count_rows, read_rows, windows
from runner.run import launch as collective
from runner.run.launch import Launch, ParallelError
from runner.data.shares import Share, ShareOutput, check_fresh, merge, rank_files
from runner.data.writer import PREDICTIONS, FollowerOutput, PredictionsFile, job_settings, start_job
from runner.infer.engine import Engine
from runner.errors import DataError, RunnerError, interrupted
from runner.infer.batches import length_batches
from runner.data.progress import Progress
from runner.lab.manifest import write_manifest
from runner.load.memory import peak_rss
from runner.run.job_stats import JobStats, format_job, format_lines, job_document
from runner.run.report import device_map_document, format_summary, write_job_report
from runner.run.rows import Item, RowTask

RUN_COLUMNS = 4  # generation: rows handed to one run of the task, in rows in flight (what waits to take a free row)


@dataclass(frozen=True)
class Role:
    """This process's part in the job: the only process, a data-parallel rank (a share of the rows, into its own
    rank file), or a pipeline stage (every stage runs every batch; rank 0 writes for all)."""

    mode: str                # parallel.mode
    ranks: Launch | None     # this process's place under torchrun

    @property
    def shares_rows(self) -> bool:
        return self.mode == "data" and self.ranks is not None

    @property
    def follows(self) -> bool:
        """A pipeline stage other than rank 0: it runs the batches, and writes nothing."""
        return self.mode == "pipeline" and self.ranks is not None and not self.ranks.main

    @property
    def speaks(self) -> bool:
        """Whether progress goes to the screen from here."""
        return (self.ranks is None or self.ranks.main) and not self.follows


@dataclass
class Lines:
    """Where this process's output lines go, the rows it reads, and its share of the batches."""

    out: Output
    rows: Iterator[Row]
    share: Share


class FirstWindow:
    """The job's first window of rows, prepared (tokenized and checked) once the plan is made and before any
    weight is read: the ``Engine``'s ``before_load``. A bad first row fails the job before the load."""

    def __init__(self, rows: list[Row], task_rows: Callable[[Engine, RunConfig], RowTask], config: RunConfig,
                 run_dir: Path):
        self.rows, self._task_rows, self._config, self._run_dir = rows, task_rows, config, run_dir

    def __call__(self, engine: Engine) -> None:
        engine.tokenizer  # noqa: B018 -- read now: a checkpoint without one fails before its weights are
        self.task = self._task_rows(engine, self._config)
        self.items, self.bad = _prepare(self.task, self.rows, self._config, self._run_dir)


def run(config: RunConfig, run_dir: Path, task_rows: Callable[[Engine, RunConfig], RowTask],
        ranks: Launch | None = None) -> tuple[str, dict[str, Path]]:
    """The text to show, and the files written. ``task_rows(engine, config)`` makes the ``RowTask``
    (``GenerateRows``, ``ScoreRows``, ``EmbedRows``); ``ranks``: this process's place under torchrun."""
    role = Role(config.parallel.mode, ranks)
    lines = _rank_lines(config, run_dir, ranks) if role.shares_rows else _job_lines(config, run_dir, role)
    out = lines.out
    stats = JobStats(None if role.shares_rows else count_rows(config.data), resumed=len(out.done))
    chunks = windows(lines.rows, config.data.window)
    first = FirstWindow(next(chunks, []), task_rows, config, run_dir)
    if not first.rows and not out.done:
        raise DataError(f"data.path: {config.data.path} holds no rows; give it one row per line")
    engine = _engine_on_every_rank(ranks, lambda: Engine(config, run_dir, launch=ranks, before_load=first))
    task, items, bad = first.task, first.items, first.bad
    progress = Progress(stats.total, initial=0 if role.shares_rows else stats.resumed,  # other ranks keep quiet
                        log_every=config.runtime.log_every if role.speaks else float("inf"))
    start = time.perf_counter()
    failure: RunnerError | None = None
    try:
        # NaN or Inf in any task's outputs, or a real allocation failing despite the plan: one line each
        with engine.explain_non_finite(), engine.memory_checked():
            for window in chain([first.rows], chunks):
                if window is not first.rows:
                    items, bad = _prepare(task, window, config, run_dir)
                _run_window(task, window, items, bad, out, lines.share, stats, progress, config)
    except RunnerError as e:
        if not role.shares_rows:
            raise
        failure = e  # this rank stops; the others finish their shares, and the merge names what is missing
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see __main__): say what is kept and how to go on
        out.flush()
        raise interrupted(e, f"{out.lines} rows are in {out.path}; "
                             f"resume=true hydra.run.dir={run_dir} continues the job") from None
    finally:  # what finished is on disk whatever stops the job
        out.flush()
        progress.close()
    out.close()
    engine.loaded.timings[config.task.name] = round(time.perf_counter() - start, 4)
    if role.shares_rows:
        assert ranks is not None
        return _finish_share(ranks, engine, run_dir, stats, lines.share, failure, config)
    if role.follows:
        return "", {}
    paths = _write_reports(engine, run_dir, job_document(stats, config), config)
    paths[PREDICTIONS] = out.path
    shown = "\n\n" + format_lines(out.path, config.task.output_key) if config.data.format == "inline" else ""
    return format_summary(engine.loaded) + shown + "\n\n" + format_job(stats, out.path), paths


def _job_lines(config: RunConfig, run_dir: Path, role: Role) -> Lines:
    """One ``predictions.jsonl``: the job recorded (or checked, on resume), the rows already done read back.
    A pipeline's stages run the same batches: every stage follows rank 0's rows done, and only rank 0 writes."""
    id_key = "custom_id" if config.data.format == "openai" else "id"

    def open_output() -> PredictionsFile:
        if rank_files(run_dir):
            raise DataError(f"{run_dir}: holds a data-parallel job's {rank_files(run_dir)[0].name}; resume it with "
                            "torchrun ... parallel.mode=data resume=true (any number of ranks), or pick a new run "
                            "folder (hydra.run.dir=...)")
        start_job(run_dir, job_settings(config.resolved), resume=config.resume)
        return PredictionsFile(run_dir / PREDICTIONS, id_key=id_key, resume=config.resume)

    if config.parallel.mode != "pipeline":
        out: Output = open_output()
    else:
        opened: list[PredictionsFile] = []  # rank 0's own file; the other stages get its rows done

        def opened_on_rank_0() -> list[Any]:
            opened.append(open_output())
            return opened[0].done

        done = collective.agree_or_raise(opened_on_rank_0)
        out = FollowerOutput(run_dir / PREDICTIONS, done) if role.follows else opened[0]
    return Lines(out, _check_done(read_rows(config.data, config.task), out.done), Share())


def _rank_lines(config: RunConfig, run_dir: Path, ranks: Launch) -> Lines:
    """Data parallel: rank 0 records the job; every rank then reads what any rank has done (its rank file)
    before any rank writes more, and claims batches through the launch's store."""
    collective.agree_or_raise(lambda: (check_fresh(run_dir, resume=config.resume),
                                       start_job(run_dir, job_settings(config.resolved), resume=config.resume)))
    out = ShareOutput(run_dir, ranks.rank)
    collective.agree(lambda: None)  # every rank has read what is done before any rank writes more
    job = collective.agree(lambda: uuid.uuid4().hex)  # names this run's claims in the launch's store
    return Lines(out, read_rows(config.data, config.task),
                 Share(ranks.rank, ranks.world_size, claim=collective.claimer(job)))


def _engine_on_every_rank(ranks: Launch | None, make: Callable[[], Engine]) -> Engine:
    """The engine; under torchrun, a rank that cannot make its own (a plan that does not fit its share, a load that
    fails) stops every rank, rather than leaving the others waiting for it."""
    if ranks is None:
        return make()
    engine, problem = None, None
    try:
        engine = make()
    except RunnerError as e:
        problem = e
    found = collective.all_gather(None if problem is None else f"{problem.stage}: {problem.lines[0]}")
    if problem is not None:
        raise problem
    rank, line = next((r, f) for r, f in enumerate(found) if f is not None) if any(found) else (None, None)
    if line is not None:
        raise ParallelError(f"rank {rank} stopped ({line}); every rank stops with it")
    assert engine is not None
    return engine


def _write_reports(engine: Engine, run_dir: Path, job: dict[str, Any], config: RunConfig,
                   parallel: dict[str, Any] | None = None) -> dict[str, Path]:
    paths = write_job_report(engine.loaded, run_dir, job, engine.stats if config.task.decodes else None,
                             parallel=parallel)
    return paths | write_manifest(run_dir, config, checkpoint=engine.loaded.checkpoint.fingerprint(),
                                  hardware=engine.loaded.hardware, tokenizer=engine.tokenizer,
                                  device_map=device_map_document(engine.loaded)["device_map"],
                                  dtype=str(engine.loaded.dtype).removeprefix("torch."))


def _finish_share(launch: Launch, engine: Engine, run_dir: Path, stats: JobStats, share: Share,
                  failure: RunnerError | None, config: RunConfig) -> tuple[str, dict[str, Path]]:
    """Data parallel: every rank's figures gathered on rank 0, which merges the rank files into
    ``predictions.jsonl`` in input order and writes the report; rows no rank wrote are named."""
    seconds = engine.loaded.timings[config.task.name]
    ranks = collective.gather({
        "rank": launch.rank, "batches": share.ran, "rows": stats.done, "skipped": stats.skipped, "seconds": seconds,
        "input_tokens": stats.input_tokens, "output_tokens": stats.output_tokens,
        "tokens_per_s": round(stats.output_tokens / max(seconds, 1e-9), 2), "peak_rss_bytes": peak_rss(),
        "error": None if failure is None else f"{failure.stage}: {failure.lines[0]}"})
    if not launch.main:
        if failure is not None:
            raise failure
        return "", {}
    merged = merge(run_dir, (row.id for row in read_rows(config.data, config.task)))
    wall = max(r["seconds"] for r in ranks)
    job = job_document(stats, config)
    job["rows"] = {"total": merged.lines + len(merged.missing), "done": sum(r["rows"] for r in ranks),
                   "skipped": sum(r["skipped"] for r in ranks), "resumed": stats.resumed}
    job["tokens"] = {"input": sum(r["input_tokens"] for r in ranks), "output": sum(r["output_tokens"] for r in ranks)}
    parallel = {"mode": "data", "world_size": launch.world_size, "seconds": wall,
                "tokens_per_s": round(job["tokens"]["output"] / max(wall, 1e-9), 2),
                "missing": [str(i) for i in merged.missing], "ranks": ranks}
    paths = _write_reports(engine, run_dir, job, config, parallel)
    paths[PREDICTIONS] = merged.path
    if failure is not None:
        raise failure
    if merged.missing:
        shown = ", ".join(map(repr, merged.missing[:5])) + (" ..." if len(merged.missing) > 5 else "")
        stopped = "; ".join(f"rank {r['rank']}: {r['error']}" for r in ranks if r["error"]) or "a rank stopped early"
        raise DataError(f"{len(merged.missing)} rows have no output line ({shown}): {stopped}; resume=true "
                        f"hydra.run.dir={run_dir} completes them, with any number of ranks")
    lines = "\n".join(f"rank {r['rank']}: {r['rows']} rows in {r['batches']} batches, {r['seconds']:.2f} s, "
                      f"{r['tokens_per_s']:.1f} tokens/s" for r in ranks)
    shown = "\n\n" + format_lines(merged.path, config.task.output_key) if config.data.format == "inline" else ""
    return (format_summary(engine.loaded) + shown + f"\n\n{lines}\n{merged.lines} rows from {launch.world_size} "
            f"ranks, {parallel['tokens_per_s']:.1f} tokens/s -> {merged.path}", paths)


def _check_done(rows: Iterator[Row], done: list[Any]) -> Iterator[Row]:
    """The rows, after checking that the ones already written are the same rows (same ids, same order)."""
    for row in rows:
        if row.number < len(done) and row.id != done[row.number]:
            raise DataError(f"resume: {row.where} has id {row.id!r} but output line {row.number + 1} is for "
                            f"{done[row.number]!r}: the input changed since the job started; restore it, or "
                            "start a new run folder")
        yield row
    # (a shorter input than the output is caught by the writer: nothing more to write)


def _prepare(task: RowTask, window: list[Row], config: RunConfig, run_dir: Path) -> tuple[list[Item], list[Row]]:
    """The window's rows ready to run, and the bad ones; with ``on_error: fail``, the first bad row ends the run."""
    items, bad = [], []
    for row in window:
        if row.error is None:
            try:
                items.append(task.prepare(row))
                continue
            except RunnerError as e:
                row.failed(e.lines[0])
        if config.data.on_error == "fail":
            fix = ("fix it" if config.data.format == "inline" else
                   f"fix the row and resume (resume=true hydra.run.dir={run_dir} keeps the rows done)")
            raise DataError(f"{row.where}: {row.error}; {fix}, or set data.on_error=skip to write it with an error "
                            "and go on")
        bad.append(row)
    return items, bad


class Output(Protocol):
    """Where a job's lines go: ``PredictionsFile`` (one process) or ``ShareOutput`` (a rank's file)."""

    path: Path
    lines: int
    done: Any  # the rows already written: their ids in order (one file), or their numbers (a rank's share)

    def todo(self, row: Row) -> bool: ...

    def expect(self, numbers: Iterable[int]) -> None: ...

    def put(self, number: int, line: dict[str, Any]) -> None: ...

    def flush(self) -> int: ...

    def close(self) -> None: ...


def _run_window(task: RowTask, window: list[Row], items: list[Item], bad: list[Row], out: Output, share: Share,
                stats: JobStats, progress: Progress, config: RunConfig) -> None:
    out.expect(row.number for row in window if out.todo(row))
    for row in bad:
        if out.todo(row) and share.writes_bad_rows:
            out.put(row.number, task.error_line(row))
            stats.skipped += 1
    # One run of the task takes every micro-batch of a column (generation), in length order; for generation,
    # RUN_COLUMNS columns' worth, so rows that finish early make room for waiting ones (continuous batching). Every
    # rank forms the same batches; each runs its share of them.
    in_flight = config.runtime.rows_in_flight
    rows = in_flight * (RUN_COLUMNS if config.task.decodes and in_flight > 1 else 1)  # one row in flight: no refill
    for batch in length_batches(items, rows, length=lambda i: i.tokens, group=lambda i: i.group):
        todo = [i for i in batch if out.todo(i.row)]
        if not share.take() or not todo:
            continue  # another rank's, or every row already written; a batch with one row to do runs whole
        start = time.perf_counter()
        result = task.run(batch)
        seconds = time.perf_counter() - start
        share.ran += 1
        for item, value in zip(batch, result.results):
            if out.todo(item.row):
                out.put(item.row.number, task.line(item.row, value))
        written = out.flush()
        stats.done += len(todo)
        stats.add(result, seconds)
        progress.update(written, tokens=result.input_tokens + result.output_tokens)
    progress.update(out.flush())
