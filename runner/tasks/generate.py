"""``task=generate``: load once, complete every prompt, write the map, the report and the completions."""
from __future__ import annotations

import time
from pathlib import Path

from runner.config import RunConfig
from runner.engine import Engine
from runner.report import format_completions, format_summary, write_outputs


def run(config: RunConfig, run_dir: Path) -> tuple[str, dict[str, Path]]:
    """The text to show, and the files written."""
    engine = Engine(config, run_dir, check_task=True)  # a prompt that cannot run fails before loading
    start = time.perf_counter()
    completions = engine.generate(config.task.prompts)
    engine.loaded.timings["generate"] = round(time.perf_counter() - start, 4)
    paths = write_outputs(engine.loaded, run_dir, completions, engine.stats)
    return format_summary(engine.loaded) + "\n\n" + format_completions(completions), paths
