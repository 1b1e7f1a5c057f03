"""Installed like a user installs it: a built wheel, in a fresh venv, run from a folder far from this checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_configs_and_schemas_and_runs_anywhere(tmp_path):
    # hatchling is in the test extra, so the wheel builds here without a registry.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel, = (tmp_path / "dist").glob("runner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"runner/conf/config.yaml", "runner/conf/model/gpt2tiny.yaml", "runner/conf/hydra/sweeper/resuming.yaml",
            "runner/schemas/report.schema.json", "runner/schemas/manifest.schema.json",
            "hydra_plugins/runner_sweeper/resuming_sweeper.py"} <= names
    assert not any(n.startswith(("tests/", "conf/", "schemas/")) for n in names)

    # A fresh venv that sees this test environment's packages (torch and the rest, through a .pth file: a venv's
    # --system-site-packages would see the base interpreter's, not this environment's); runner comes from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, script = venv / "bin" / "python", venv / "bin" / "runner"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "test-environment.pth").write_text("".join(f"{p}\n" for p in ours))
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "RUNNER_CACHE": str(tmp_path / "cache")}
    where = subprocess.run([str(python), "-c", "import runner.config.resources as r; print(r.CONF_DIR, r.SCHEMA_DIR)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    conf, schemas = where.stdout.split()
    assert conf.startswith(str(venv)) and conf.endswith("runner/conf"), where.stdout + where.stderr
    assert schemas.startswith(str(venv)) and schemas.endswith("runner/schemas")
    proc = subprocess.run([str(script), "mode=plan", "model=gpt2tiny", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "plan.json").is_file() and (tmp_path / "run" / "manifest.json").is_file()
    assert "Wrote plan.json, manifest.json to" in proc.stdout
