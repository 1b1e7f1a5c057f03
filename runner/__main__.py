"""``python -m runner``: compose the config with Hydra, run the job (``runner.run.recipe``), turn its outcome
into an exit code. Bad input of any kind is one line per problem and exit 2; a bug keeps its traceback."""
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from runner.config import CONF_DIR, load_config
from runner.config.hydra_errors import config_error_line
from runner.errors import Interrupted, RunnerError, say
from runner.lab import sweeps
from runner.lab.status import Outcome, recorded
from runner.run.launch import Launch, joined, stop
from runner.run.recipe import run


def job(cfg, launch: Launch | None) -> Outcome:
    """One job of Hydra's: its status kept in its run folder, and what it wrote shown (rank 0 speaks for all)."""
    hydra_cfg = HydraConfig.get()
    run_dir, overrides = Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)
    outcome = recorded(run_dir, sweeps.resolved_config(cfg), overrides,
                       lambda: run(load_config(cfg, overrides), run_dir, launch), writes=launch is None or launch.main)
    if outcome.error:
        say(*outcome.error.said())
    if outcome.paths:
        print(f"{outcome.text}\n\nWrote {', '.join(outcome.paths)} to {run_dir}")
    return outcome


def main() -> int:
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's own errors reach us, to be said in one line
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts
    signal.signal(signal.SIGTERM, Interrupted.raise_for)
    # Python leaves SIGINT ignored when it starts ignored (a background job of a script): a batch job stops on it
    # all the same, saying what is kept.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    outcomes: list[Outcome] = []
    try:
        launch, sys.argv = joined(sys.argv)
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(
            lambda cfg: outcomes.append(job(cfg, launch)))()
    except RunnerError as e:  # a bad launch, or a sweep refused before any job ran (resume)
        say(*e.said())
        return 2
    except KeyboardInterrupt as e:
        say(Interrupted.line(e))
        return 128 + Interrupted.signum_of(e)
    except Exception as e:  # Hydra's own failures (a bad override, a run folder it cannot make) are one line
        line = config_error_line(e, sweep=any(a in ("-m", "--multirun") for a in sys.argv[1:]))
        if line is None:
            raise  # the runner's own code raised it: a bug
        say(line)
        return 2
    finally:
        stop()
    return sweeps.exit_code(outcomes)


if __name__ == "__main__":
    sys.exit(main())
