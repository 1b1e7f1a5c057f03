"""``mode=plan`` and ``mode=check``: the engine's first half (``Engine.plan``), from the skeleton and checkpoint
headers only, explained on screen and written to ``plan.json``; for generation, a decode step's predicted cost."""
from __future__ import annotations

from pathlib import Path

from runner.config import RunConfig
from runner.errors import ConfigError
from runner.infer.engine import Engine
from runner.lab.manifest import write_manifest
from runner.plan.explain import compact_map, format_plan
from runner.config.resources import runner_cache
from runner.plan.throughput import format_step, measure_rates, step_cost
from runner.run import cluster
from runner.run.report import format_map, write_plan


def run(config: RunConfig, run_dir: Path) -> tuple[str, dict[str, Path]]:
    """The text to show, and ``plan.json``."""
    if config.parallel.mode == "pipeline":  # sizing a pipeline over nodes that need not be here (never torchrun)
        return cluster.run(config, run_dir)
    if (config.runtime.seq_len is None and config.checkpoint.source == "synthetic"
            and "vocab_size" not in config.model.arch):
        raise ConfigError(f"runtime.seq_len: model {config.model.name} has no tokenizer to size the plan from "
                          "data.prompts; set the tokens per sequence to plan for, e.g. runtime.seq_len=256")
    planned, tokenizer = Engine.plan(config, run_dir, tokenizer=False)
    text = format_map(planned) + "\n\n" + format_plan(planned)
    checkpoint = planned.checkpoint
    paths = write_manifest(run_dir, config, checkpoint=checkpoint.fingerprint() if checkpoint else
                           {"source": config.checkpoint.source, "files": []}, hardware=planned.hardware,
                           tokenizer=tokenizer, device_map=compact_map(planned.check.block_devices, planned.layout),
                           dtype=str(planned.dtype).removeprefix("torch."))
    if not config.task.decodes or config.mode != "plan":  # a decode step's cost is generation's
        return text, write_plan(planned, run_dir) | paths
    rates = measure_rates(planned, runner_cache())
    cost = step_cost(planned, rates)
    text += "\n\nthroughput:\n" + "\n".join(f"  {line}" for line in format_step(cost, rates))
    return text, write_plan(planned, run_dir, cost.document(rates)) | paths
