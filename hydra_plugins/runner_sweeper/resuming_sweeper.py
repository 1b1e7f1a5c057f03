"""Hydra's basic sweeper, made to resume: before the first job starts, every job of the sweep is composed and its
folder read; with ``resume=true``, jobs done with the same config are not launched again (see ``runner.lab.sweeps``).

Hydra finds sweepers only in the ``hydra_plugins`` namespace, hence this thin module outside ``runner``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class ResumingSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self._launch: set[tuple[str, ...]] | None = None

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        if self._launch is None:  # the first batch: decide for the whole sweep before anything runs
            self._launch = self._jobs_to_launch()
        return [overrides for overrides in super().get_job_batch() if tuple(overrides) in self._launch]

    def _jobs_to_launch(self) -> set[tuple[str, ...]]:
        from runner.lab.sweeps import jobs_to_run, sweep_job

        assert self.overrides is not None and self.hydra_context is not None and self.config is not None
        loader = self.hydra_context.config_loader
        jobs = [sweep_job(loader.load_sweep_config(self.config, list(overrides)), list(overrides))
                for batch in self.overrides for overrides in batch]
        to_run = jobs_to_run(jobs, Path(str(self.config.hydra.sweep.dir)), list(self.config.hydra.overrides.task))
        return {job.overrides for job in to_run}
