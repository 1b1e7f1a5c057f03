"""A batch job's figures as it goes (``JobStats``), and what the report and the screen say of them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.config import RunConfig
from runner.run.rows import Batch


@dataclass
class JobStats:
    total: int | None
    resumed: int = 0
    done: int = 0
    skipped: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    compute_s: float = 0.0
    decode_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)

    def add(self, batch: Batch, seconds: float) -> None:
        self.input_tokens += batch.input_tokens
        self.output_tokens += batch.output_tokens
        self.compute_s += seconds
        self.decode_s += batch.decode_s
        self.latencies.append(seconds)
        if batch.first_token_s is not None:
            self.first_tokens.append(batch.first_token_s)


def job_document(stats: JobStats, config: RunConfig) -> dict[str, Any]:
    """The report's ``job`` section."""
    prefill_s = stats.compute_s - stats.decode_s
    decoded = stats.output_tokens - (stats.done if stats.output_tokens else 0)  # each row's first token is prefill's
    return {
        "task": config.task.name,
        "input": str(config.data.path) if config.data.path else "inline",
        "format": config.data.format,
        "rows": {"total": stats.total, "done": stats.done, "skipped": stats.skipped, "resumed": stats.resumed},
        "tokens": {"input": stats.input_tokens, "output": stats.output_tokens},
        "tokens_per_s": {"prefill": _rate(stats.input_tokens, prefill_s), "decode": _rate(decoded, stats.decode_s)},
        "batch_latency_s": _percentiles(stats.latencies),
        "time_to_first_token_s": _percentiles(stats.first_tokens),
    }


def format_job(stats: JobStats, path: Path) -> str:
    skipped = f", {stats.skipped} skipped" if stats.skipped else ""
    resumed = f", {stats.resumed} already done" if stats.resumed else ""
    return f"{stats.done} rows{skipped}{resumed} -> {path}"


def format_lines(path: Path, key: str, limit: int = 20) -> str:
    """The first output lines, one short line each: what a small inline job shows on screen."""
    shown = []
    with path.open(encoding="utf-8") as f:
        for text, _ in zip(f, range(limit)):
            line = json.loads(text)
            value = line.get(key)
            if value is None:
                result = f"error: {line.get('error')}"
            elif key == "completion":
                result = repr(value["text"])
            elif key == "score":
                result = f"logprob {value['logprob']:.4f} over {value['tokens']} tokens, perplexity {value['perplexity']:.3f}"
            else:
                result = f"{len(value)} dims [{', '.join(f'{x:.4f}' for x in value[:3])}, ...]"
            shown.append(f"[{line['id']}] {result}")
    return "\n".join(shown)


def _rate(tokens: int, seconds: float) -> float | None:
    return round(tokens / seconds, 2) if seconds > 0 and tokens else None


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731 -- nearest rank
    return {"p50": round(pick(0.5), 4), "p95": round(pick(0.95), 4)}
