"""``mode=plan`` and ``mode=check``: plan (or check a map file) from the skeleton and checkpoint headers only."""
from __future__ import annotations

from pathlib import Path

from runner import distributed
from runner.config import RunConfig
from runner.errors import ConfigError
from runner.explain import compact_map, format_plan
from runner.infer.prompts import plan_inputs
from runner.manifest import write_manifest
from runner.pipeline import open_source, plan
from runner.tasks import cluster
from runner.report import format_map, write_plan
from runner.throughput import format_step, measure_rates, runner_cache, step_cost


def run(config: RunConfig, run_dir: Path) -> tuple[str, dict[str, Path]]:
    """The text to show, and ``plan.json``."""
    if config.parallel.mode == "pipeline" and distributed.current() is None:
        return cluster.run(config, run_dir)  # sizing a pipeline over nodes that need not be here
    checkpoint = open_source(config)
    tokenizer = None
    if config.runtime.seq_len is None:  # sized like a run of the task would be
        if checkpoint is None and "vocab_size" not in config.model.arch:
            raise ConfigError(f"runtime.seq_len: model {config.model.name} has no tokenizer to size the plan from "
                              "data.prompts; set the tokens per sequence to plan for, e.g. runtime.seq_len=256")
        config, tokenizer = plan_inputs(config, checkpoint)
    planned = plan(config, run_dir, checkpoint)
    text = format_map(planned) + "\n\n" + format_plan(planned)
    paths = write_manifest(run_dir, config, checkpoint=checkpoint.fingerprint() if checkpoint else
                           {"source": config.checkpoint.source, "files": []}, hardware=planned.hardware,
                           tokenizer=tokenizer, device_map=compact_map(planned.check.block_devices, planned.layout))
    if config.task.name != "generate" or config.mode != "plan":
        return text, write_plan(planned, run_dir) | paths
    rates = measure_rates(planned, runner_cache())
    cost = step_cost(planned, rates)
    text += "\n\nthroughput:\n" + "\n".join(f"  {line}" for line in format_step(cost, rates))
    return text, write_plan(planned, run_dir, cost.document(rates)) | paths
