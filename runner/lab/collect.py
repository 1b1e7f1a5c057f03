"""``python -m runner.lab.collect <sweep folder>``: one table (CSV and Markdown) and one plot (PNG) for a sweep.

Each job folder (one holding a ``status.json``) is a row: its swept values, its status (and reason), time to
first token, tokens/s, peak memory per device against its budget, bytes per tier and hops. Run jobs give
measured figures (``report.json``); ``mode=plan`` jobs give the plan's predictions (``plan.json``). The plot
shows throughput and peak memory against the swept budget, one line per combination of the other swept keys.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import RunnerError, SweepError, say
from runner.config.sizes import format_bytes, parse_size
from runner.lab.status import STATUS, read_status
from runner.data.writes import atomic_write, temp_path

TABLE_CSV, TABLE_MD, PLOT = "sweep.csv", "sweep.md", "sweep.png"
TIERS = ("gpu", "cpu", "disk")
KEY = "hydra.sweep.dir"  # the setting that picks the folder the table is written to
RUN_ONLY = ("resume", "force", "runtime.log_every")  # how a job was run, not what it computed: never a column


@dataclass
class Peak:
    peak: int | None    # measured for a run (the ledger's figure where nothing measures), predicted for a plan
    budget: int


@dataclass
class JobRow:
    folder: str
    overrides: dict[str, str]
    status: str
    reason: str | None = None
    first_token_s: float | None = None  # median time to first token
    tokens_per_s: float | None = None
    measured: bool = True               # false: the plan's prediction (mode=plan)
    peaks: dict[str, Peak] = field(default_factory=dict)
    tiers: dict[str, int] = field(default_factory=dict)
    hops: int | None = None


@dataclass
class SweepTable:
    folder: Path
    rows: list[JobRow]
    swept: list[str]                    # the override keys whose values differ between jobs
    fixed: dict[str, str]               # the overrides every job shares
    paths: list[Path] = field(default_factory=list)

    @property
    def devices(self) -> list[str]:
        return list(dict.fromkeys(d for row in self.rows for d in row.peaks))


def collect(sweep_dir: Path) -> SweepTable:
    """Read every job of the sweep, then write its table and plot into the sweep folder."""
    if not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir}: no such folder; give the sweep's folder (hydra.sweep.dir, e.g. "
                         "multirun/2026-01-31/12-00-00)")
    rows = [read_job(status.parent) for status in sorted(sweep_dir.glob(f"*/{STATUS}"))
            if ".superseded-" not in status.parent.name]  # a forced resume's old folders: not this sweep's jobs
    if not rows:
        raise SweepError(f"{sweep_dir}: holds no job folders (none has a {STATUS}); give the folder a sweep "
                         "(python -m runner -m ...) wrote")
    keys = list(dict.fromkeys(k for row in rows for k in row.overrides))
    swept = [k for k in keys if len({row.overrides.get(k) for row in rows}) > 1]
    fixed = {k: rows[0].overrides[k] for k in keys if k not in swept and k in rows[0].overrides}
    table = SweepTable(sweep_dir, rows, swept, fixed)
    table.paths = [atomic_write(sweep_dir / TABLE_CSV, to_csv(table), KEY), atomic_write(sweep_dir / TABLE_MD, to_markdown(table), KEY),
                   plot(table, sweep_dir / PLOT)]
    return table


def read_job(run_dir: Path) -> JobRow:
    status = read_status(run_dir)
    assert status is not None
    overrides = dict(_split(o) for o in status.overrides)
    row = JobRow(run_dir.name, {k: v for k, v in overrides.items() if k not in RUN_ONLY}, status.state, status.reason)
    if status.state == "running" and not status.in_flight():
        row.status, row.reason = "failed", "stopped without a word (killed, or its machine went down)"
    report, planned = _json(run_dir / "report.json"), _json(run_dir / "plan.json")
    if status.state != "done":
        return row
    if report is not None:
        _from_report(row, report, _json(run_dir / "device_map.json"))
    elif planned is not None:
        _from_plan(row, planned)
    return row


def _from_report(row: JobRow, report: dict, device_map: dict | None) -> None:
    job, generation = report.get("job", {}), report.get("generation")
    row.first_token_s = (job.get("time_to_first_token_s") or {}).get("p50")
    row.tokens_per_s = generation["tokens_per_s"] if generation else (job.get("tokens_per_s") or {}).get("prefill")
    for d in report["devices"]:
        peak = d["measured_peak_bytes"] if d["measured_peak_bytes"] is not None else d["peak_bytes"]
        row.peaks[d["name"]] = Peak(peak, d["budget"])
        row.tiers[d["kind"]] = row.tiers.get(d["kind"], 0) + d["planned_bytes"]
    if device_map is not None:
        row.hops = _hops(b["device"] for b in device_map["blocks"])


def _from_plan(row: JobRow, planned: dict) -> None:
    row.measured = False
    row.tokens_per_s = (planned.get("throughput") or {}).get("tokens_per_s")
    for d in planned["devices"]:
        row.peaks[d["name"]] = Peak(d["weights"] + sum(d["reserves"].values()), d["budget"])
        row.tiers[d["kind"]] = row.tiers.get(d["kind"], 0) + d["weights"]
    row.hops = len(planned["hops"])


def _hops(devices: Iterable[str]) -> int:
    ordered = list(devices)
    return sum(a != b for a, b in zip(ordered, ordered[1:]))


COLUMNS = ("status", "reason", "first_token_s", "tokens_per_s", "figures")


def _cells(table: SweepTable, row: JobRow, *, human: bool) -> list[Any]:
    size = format_bytes if human else (lambda n: n)
    cells: list[Any] = [row.overrides.get(k, "") for k in table.swept]
    cells += [row.status, row.reason or "", _round(row.first_token_s), _round(row.tokens_per_s),
              "" if row.status != "done" else "measured" if row.measured else "predicted"]
    for device in table.devices:
        p = row.peaks.get(device)
        cells += ["" if p is None or p.peak is None else size(p.peak), "" if p is None else size(p.budget)]
    cells += [size(row.tiers[t]) if t in row.tiers else "" for t in TIERS]
    cells.append("" if row.hops is None else row.hops)
    return cells


def _header(table: SweepTable) -> list[str]:
    return [*table.swept, *COLUMNS, *(f"{d} {w}" for d in table.devices for w in ("peak", "budget")),
            *(f"{t} bytes" for t in TIERS), "hops"]


def to_csv(table: SweepTable) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_header(table))
    writer.writerows(_cells(table, row, human=False) for row in table.rows)
    return out.getvalue()


def to_markdown(table: SweepTable) -> str:
    header = _header(table)
    lines = [f"# Sweep {table.folder}", ""]
    if table.fixed:
        lines += ["Every job: " + ", ".join(f"`{k}={v}`" for k, v in table.fixed.items()), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in _cells(table, row, human=True)) + " |")
    return "\n".join(lines) + "\n"


def plot(table: SweepTable, path: Path) -> Path:
    """Throughput and peak memory against the swept budget; a line per combination of the other swept keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = next((k for k in table.swept if k.startswith("max_memory")), table.swept[0] if table.swept else None)
    device = _budget_device(x_key)
    others = [k for k in table.swept if k != x_key]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.8))
    lines: dict[str, list[JobRow]] = {}
    for row in table.rows:
        lines.setdefault(", ".join(f"{k}={row.overrides.get(k, '')}" for k in others) or "all jobs", []).append(row)
    numeric = x_key is not None and all(_number(row.overrides.get(x_key)) is not None for row in table.rows)
    order = sorted({row.overrides.get(x_key, "") for row in table.rows},
                   key=lambda v: _number(v) if numeric else str(v))
    x_of = (lambda r: _number(r.overrides.get(x_key))) if numeric else (lambda r: order.index(r.overrides.get(x_key, "")))
    for label, rows in lines.items():
        rows = sorted(rows, key=x_of)
        done = [r for r in rows if r.status == "done"]
        colour = speed.plot([x_of(r) for r in done], [r.tokens_per_s or 0 for r in done], "o-", label=label)[0].get_color()
        peaks = [(x_of(r), r.peaks[device].peak / 2**30) for r in done
                 if device in r.peaks and r.peaks[device].peak is not None]
        memory.plot([p[0] for p in peaks], [p[1] for p in peaks], "o-", color=colour, label=label)
        failed = [r for r in rows if r.status != "done"]
        if failed:
            speed.plot([x_of(r) for r in failed], [0] * len(failed), "x", color=colour, markersize=10, mew=2,
                       label=f"{label}: failed")
    kind = "measured" if all(r.measured for r in table.rows if r.status == "done") else "predicted by the plan"
    speed.set(title=f"throughput ({kind}; x at 0 = job failed)", ylabel="tokens/s", ylim=(0, None))
    if numeric and x_key and x_key.startswith("max_memory."):  # the budget itself: a peak above this line broke it
        budgets = sorted({_number(r.overrides.get(x_key)) for r in table.rows})
        memory.plot(budgets, budgets, "--", color="grey", label="budget")
    memory.set(title=f"peak memory on {device or 'each device'}", ylabel="GiB", ylim=(0, None))
    for ax in (speed, memory):
        ax.set_xlabel(f"{x_key} (GiB)" if numeric and x_key and x_key.startswith("max_memory") else x_key or "job")
        if not numeric:
            ax.set_xticks(range(len(order)), [str(v) for v in order], rotation=20)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fixed = ", ".join(f"{k}={v}" for k, v in table.fixed.items())
    fig.suptitle(f"sweep {table.folder.name}" + (f"  ({fixed})" if fixed else ""), fontsize=10)
    fig.tight_layout()
    tmp = temp_path(path)
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _budget_device(key: str | None) -> str | None:
    """The device a swept ``max_memory.<device>`` caps: ``cpu``, ``disk``, ``0`` -> ``cuda:0``."""
    if key is None or not key.startswith("max_memory."):
        return "cpu"
    name = key.removeprefix("max_memory.")
    return f"cuda:{name}" if name.isdigit() else name


def _number(value: str | None) -> float | None:
    """A swept value as a number: a size in GiB, or a plain number; None if it is neither."""
    if value is None:
        return None
    try:
        return parse_size(value) / 2**30
    except (RunnerError, ValueError, TypeError):
        pass
    try:
        return float(value)
    except ValueError:
        return None


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _round(value: float | None) -> Any:
    return "" if value is None else round(value, 4)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a file cut short by a crash: the row shows what the status says


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.lab.collect", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the sweep's folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    try:
        table = collect(args.folder)
    except RunnerError as e:
        say(*e.said())
        return 2
    print(to_markdown(table))
    print(f"Wrote {', '.join(p.name for p in table.paths)} to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
