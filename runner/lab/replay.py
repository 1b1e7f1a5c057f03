"""``python -m runner.lab.replay <run folder>``: run again from the folder's ``manifest.json`` alone, into a new folder.

The recipe:

1. read the manifest;
2. warn about every difference in the runner, package versions and hardware since the run;
3. refuse when the checkpoint's files or the input data changed (``--force`` replays anyway);
4. run the recorded resolved config through the same recipe as ``python -m runner`` (``runner.run.recipe``),
   in this process, from the folder the run started in;
5. say whether the new ``predictions.jsonl`` is byte-identical to the old one (exit 0), or where it differs (1).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import runner
from runner.config import load_config
from runner.data.writer import PREDICTIONS
from runner.errors import RunnerError, say
from runner.lab import status
from runner.lab.manifest import MANIFEST, data_hash_of, detected_hardware, file_hash, git_commit, versions
from runner.lab.status import changed_keys, short
from runner.run.recipe import run


class ReplayError(RunnerError):
    stage = "replay"


@dataclass
class Replayed:
    run_dir: Path
    returncode: int
    identical: bool | None = None  # None: the original has no predictions (a plan), or the replay failed
    first_difference: int | None = None  # the first line that differs
    warnings: list[str] = field(default_factory=list)


def replay(run_dir: Path, *, into: Path | None = None, force: bool = False) -> Replayed:
    recorded = read_manifest(run_dir)
    warnings = differences(recorded)
    for line in warnings:
        print(f"warning: replay: {line}", file=sys.stderr)
    changed = changed_inputs(recorded)
    if changed and not force:
        raise ReplayError(*(f"{line}; restore it, or pass --force to replay anyway" for line in changed))
    for line in changed:
        print(f"warning: replay: {line} (replaying anyway: --force)", file=sys.stderr)
    new_dir = (into or Path("outputs") / "replay" / f"{run_dir.name}-{dt.datetime.now():%Y%m%d-%H%M%S}").resolve()
    code = _run(recorded, new_dir)
    result = Replayed(new_dir, code, warnings=warnings)
    old, new = run_dir / PREDICTIONS, new_dir / PREDICTIONS
    if code == 0 and old.is_file() and new.is_file():
        result.identical = old.read_bytes() == new.read_bytes()
        if not result.identical:
            result.first_difference = _first_difference(old, new)
    return result


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    if not path.is_file():
        raise ReplayError(f"{path}: no manifest; give a run folder written by a run of this runner (one holding "
                          f"{MANIFEST})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReplayError(f"{path}: not readable JSON ({e}); it was changed or cut short") from None


def differences(recorded: dict[str, Any]) -> list[str]:
    """What differs now in the runner, the package versions and the machine: each can change the outputs."""
    now = {"runner": {"version": runner.__version__, **git_commit(Path(runner.__file__).parent)},
           "versions": versions(), "detected hardware": detected_hardware()}
    was = {"runner": recorded["runner"], "versions": recorded["versions"],
           "detected hardware": recorded["hardware"]["detected"]}
    return [f"{key} was {short(a)} at the run and is {short(b)} now" for key, a, b in changed_keys(was, now)]


def changed_inputs(recorded: dict[str, Any]) -> list[str]:
    """The checkpoint files and input data that are not what the run read."""
    lines = []
    for f in recorded["checkpoint"]["files"]:
        path = Path(recorded["cwd"], f["path"])
        if not path.is_file():
            lines.append(f"checkpoint file {path} is gone")
        elif path.stat().st_size != f["bytes"]:
            lines.append(f"checkpoint file {path} has {path.stat().st_size} bytes, the run read {f['bytes']}")
        elif file_hash(path, full=f["hash"].startswith("sha256:")) != f["hash"]:
            lines.append(f"checkpoint file {path} changed since the run (its content hash differs)")
    data = recorded["data"]
    if data["path"] is not None:
        path = Path(recorded["cwd"], data["path"])
        if not path.is_file():
            lines.append(f"data file {path} is gone")
        elif data_hash_of(path) != data["hash"]:
            lines.append(f"data file {path} changed since the run (its hash differs)")
    return lines


def _run(recorded: dict[str, Any], new_dir: Path) -> int:
    """The recorded config through the recipe, in this process, from the folder the run started in (its relative
    paths are read from there). The recorded values are final: nothing in them is interpolated again."""
    config = dict(recorded["config"])
    if config.get("parallel", {}).get("mode", "none") != "none":  # ranks give one process's bytes: replay as one
        print(f"warning: replay: the run had parallel.mode={config['parallel']['mode']}; replaying it in one "
              "process, which writes the same predictions", file=sys.stderr)
        config["parallel"] = {**config["parallel"], "mode": "none"}
    print(f"replay: running into {new_dir}", file=sys.stderr)
    new_dir.mkdir(parents=True, exist_ok=True)
    with _working_folder(Path(recorded["cwd"])):
        outcome = status.recorded(new_dir, config, list(recorded["overrides"]),
                                  lambda: run(load_config(config, recorded["overrides"]), new_dir))
    if outcome.error:
        say(*outcome.error.said())
        return 2
    print(outcome.text)
    return 0


@contextlib.contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    """The run's own working folder while it replays, where it still exists."""
    before = Path.cwd()
    if folder.is_dir():
        os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _first_difference(old: Path, new: Path) -> int:
    a, b = old.read_bytes().splitlines(keepends=True), new.read_bytes().splitlines(keepends=True)
    return next((n for n, (x, y) in enumerate(zip(a, b), start=1) if x != y), min(len(a), len(b)) + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.lab.replay", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the run folder to replay (it holds manifest.json)")
    parser.add_argument("--into", type=Path, help="the new run folder (default: outputs/replay/<name>-<time>)")
    parser.add_argument("--force", action="store_true", help="replay even if the checkpoint or the data changed")
    args = parser.parse_args(argv)
    try:
        result = replay(args.folder, into=args.into, force=args.force)
    except RunnerError as e:
        say(*e.said())
        return 2
    if result.returncode != 0:
        print(f"replay: the run failed (exit {result.returncode}); see above", file=sys.stderr)
        return result.returncode
    if result.identical is None:
        print(f"replay: done, into {result.run_dir} (the original has no {PREDICTIONS} to compare)")
        return 0
    if result.identical:
        print(f"replay: {PREDICTIONS} is byte-identical to the original's ({result.run_dir})")
        return 0
    print(f"replay: {PREDICTIONS} differs from the original's, first at line {result.first_difference} "
          f"({result.run_dir})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
