"""Shared fixtures: real Hydra composition of the shipped configs, one synthetic-weights cache per session, and
the one way tests start the command line in a real process (``cli``)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

# pytest-xdist runs a worker per core. torch's default of a thread per core in every worker (and in every process a
# test starts) oversubscribes the cores, and its threads spin waiting for each other: the suite took 1.75x as long.
# So each worker, and what it starts, gets its share of the cores; set before torch is first imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# dtype=auto picks bf16 where the CPU has it natively (runner.plan.arithmetic); the suite's exact maps, bytes and
# logits are those of float32, so every test, and every process a test starts, runs as on a CPU without it. Tests of
# that choice set it themselves.
os.environ["RUNNER_NATIVE_BF16"] = "0"

from hydra import compose, initialize_config_dir  # noqa: E402 -- after the thread count

from runner.config import RunConfig, load_config  # noqa: E402
from runner.lab.status import Outcome  # noqa: E402

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@pytest.fixture(scope="session", autouse=True)
def runner_cache(tmp_path_factory) -> Path:
    """Synthetic checkpoints are written once per session, into a temporary cache."""
    cache = tmp_path_factory.mktemp("runner-cache")
    os.environ["RUNNER_CACHE"] = str(cache)
    return cache


ROOT = Path(__file__).resolve().parent.parent

# Runs a command and prints the peak resident bytes of its process tree's largest process (ru_maxrss of the
# children of this small wrapper: Linux carries ru_maxrss over from a forking parent, and pytest is large).
_PEAK = ("import resource, subprocess, sys\n"
         "code = subprocess.run(sys.argv[1:]).returncode\n"
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)\n"
         "sys.exit(code)\n")


class CLI:
    """``python -m runner ...`` (or another of the runner's modules) in a real process, as a user types it.

    Tests use it where the process boundary is the point: exit codes and the one-line errors on stderr, signals,
    resume after a kill, torchrun, the installed wheel, whole-process memory. Everything else runs in-process.
    """

    def __init__(self, cache: Path):
        self.env = {**os.environ, "RUNNER_CACHE": str(cache)}

    def command(self, *args: str, module: str = "runner") -> list[str]:
        return [sys.executable, "-m", module, *args]

    def __call__(self, *args: str, module: str = "runner", cwd: Path | str = ROOT, env: dict | None = None,
                 timeout: float = 600, peak: bool = False) -> subprocess.CompletedProcess:
        """Run to the end; ``peak=True`` wraps it to measure its peak RSS (``peak_of``)."""
        command = self.command(*args, module=module)
        if peak:
            command = [sys.executable, "-c", _PEAK, *command]
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env or self.env, timeout=timeout)

    def start(self, *args: str, module: str = "runner", cwd: Path | str = ROOT, env: dict | None = None,
              **popen) -> subprocess.Popen:
        """Start it and return at once (to signal it, or kill it mid-job)."""
        return subprocess.Popen(self.command(*args, module=module), cwd=cwd, env=env or self.env, text=True,
                                **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen})

    @staticmethod
    def peak_of(proc: subprocess.CompletedProcess) -> int:
        """The peak resident bytes of a run made with ``peak=True``."""
        return int(proc.stderr.strip().splitlines()[-1])


@pytest.fixture
def cli(runner_cache) -> CLI:
    """The command line in a real process; a test that takes it is marked ``slow`` by that alone."""
    return CLI(runner_cache)


def pytest_collection_modifyitems(items: Sequence[pytest.Item]) -> None:
    for item in items:
        if "cli" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def run_in_process(run_dir: Path, *overrides: str) -> tuple[Outcome | None, list[str]]:
    """What ``python -m runner <overrides> hydra.run.dir=<run_dir>`` does, in this process: Hydra's composition of
    the shipped configs, the job's status in its folder, the recipe. Returns the outcome (None when Hydra refused
    the overrides) and the error lines the command line would print."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.config.hydra_errors import config_error_line
    from runner.lab.status import recorded
    from runner.lab.sweeps import resolved_config
    from runner.run.recipe import run

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="runner"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 -- what the command line says of it, or a bug
        line = config_error_line(e, sweep=False)
        if line is None:
            raise
        return None, [line]
    outcome = recorded(run_dir, resolved_config(cfg), list(overrides),
                       lambda: run(load_config(cfg, overrides), run_dir))
    return outcome, outcome.error.said() if outcome.error else []


def compose_config(*overrides: str) -> RunConfig:
    """The config ``python -m runner <overrides>`` would run with, typed; planned for 256-token sequences unless
    ``runtime.seq_len`` is among the overrides (a run derives it from the prompts; tests of the stages fix it)."""
    if not any(o.startswith("runtime.seq_len=") for o in overrides):
        overrides = ("runtime.seq_len=256", *overrides)
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return load_config(compose(config_name="config", overrides=list(overrides)))


def evict_page_cache(files) -> None:
    """Drop the files' clean pages from the page cache, so the next read of them comes from the device."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_byte_tokenizer(folder: Path) -> Path:
    """A real ``tokenizer.json`` whose ids are UTF-8 bytes (0-255), for hand-sized models saved as local checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    to_char = {b: c for b, c in _bytes_to_unicode().items() if c in alphabet}
    tokenizer = Tokenizer(models.BPE({to_char[b]: b for b in range(256)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, which byte-level tokenizers use as their alphabet."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def generate_run(cfg: RunConfig, run_dir: Path):
    """Load an engine for ``cfg`` and complete the config's prompts: (engine, completions)."""
    from runner.infer.engine import Engine

    engine = Engine(cfg, run_dir)
    return engine, engine.generate(cfg.data.prompts)
