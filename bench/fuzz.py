#!/usr/bin/env python
"""The long fuzz run: ``tests/test_fuzz.py`` with many more examples per target, drawn at random.

CI runs that file with a few dozen derandomized examples per target. This runs the same tests with
``--examples`` per target (Hydra-composing targets, ~85 ms a case, take ``--config-share`` of it), then
prints how many cases each target ran and how long it all took. A failure keeps pytest's output, with
the falsifying example to paste into the test as an ``@example``.

    python bench/fuzz.py --examples 5000            # ~10 minutes on 2 cores
    python bench/fuzz.py --examples 500 -k gguf     # one target

The exit code is pytest's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="examples per target (default 1000)")
    parser.add_argument("--config-share", type=float, default=0.05,
                        help="the share of --examples that the Hydra-composing targets run (default 0.05)")
    parser.add_argument("-k", default=None, help="only the tests whose names match (pytest -k)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as d:
        counts_file = Path(d, "counts.json")
        env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples), "FUZZ_CONFIG_SHARE": str(args.config_share),
               "FUZZ_COUNTS": str(counts_file)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_fuzz.py")]
        if args.k:
            command += ["-k", args.k]
        start = time.perf_counter()
        code = subprocess.call(command, cwd=ROOT, env=env)
        seconds = time.perf_counter() - start
        counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}

    width = max((len(name) for name in counts), default=10)
    print(f"\nfuzz cases run per target ({args.examples} examples asked for each; Hydra targets "
          f"{args.config_share:g} of that):")
    for name, n in sorted(counts.items()):
        print(f"  {name:<{width}}  {n:>7}")
    print(f"  {'total':<{width}}  {sum(counts.values()):>7}   in {seconds:.0f} s, pytest exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
