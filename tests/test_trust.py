"""What a config or a checkpoint can make the runner do: build only from allowed modules (refused before
import), read package files without importing the package, and open only the shard files inside a
checkpoint's folder."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import compose_config, run_in_process
from runner.load.build import build_skeleton
from runner.load.checkpoint.base import shard_path
from runner.config import _path
from runner.errors import BuildError, CheckpointError, ConfigError
from runner.plan.planned import plan

MARKER_CODE = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


def plan_in(cwd: Path, *overrides: str) -> list[str]:
    """The error lines of ``python -m runner mode=plan model=gpt2tiny <overrides>`` started in ``cwd``."""
    outcome, lines = run_in_process(cwd / "run", "mode=plan", "model=gpt2tiny", *overrides)
    assert outcome is None or outcome.error, "the plan was made"  # the command line would exit 2
    return lines


def test_a_nested_target_outside_the_allowed_modules_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "touched"
    lines = plan_in(tmp_path, "+model.arch.x._target_=subprocess.Popen", f"+model.arch.x.args=[touch,{marker}]")
    assert not marker.exists()
    assert lines == [
        "error: build: model.arch.x._target_: subprocess.Popen is outside the modules a config may build from "
        "(runner.zoo, torch.nn, transformers); if you trust it, add its module to trust.allow_targets "
        "(e.g. 'trust.allow_targets=[subprocess]')"]


def test_a_module_in_the_working_folder_is_not_imported_unless_trusted(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "labmodel.py").write_text(MARKER_CODE.format(marker=str(marker)) + "class Model: pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, as the working folder is to python -m runner
    refused = plan_in(tmp_path, "model.arch._target_=labmodel.Model")
    assert not marker.exists() and "labmodel" not in sys.modules
    assert len(refused) == 1 and "labmodel.Model is outside the modules a config may build from" in refused[0]
    trusted = plan_in(tmp_path, "model.arch._target_=labmodel.Model", "trust.allow_targets=[labmodel]")
    sys.modules.pop("labmodel", None)  # this process goes on
    assert marker.exists()  # the user vouched for it: imported, then refused as no nn.Module
    assert trusted == ["error: build: model.arch._target_: labmodel.Model is not an nn.Module class; "
                       "expected a model class such as runner.zoo.gpt.GPT"]


def test_a_trusted_module_that_raises_on_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "brokenlab.py").write_text("raise RuntimeError('half-installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config("model=gpt2tiny", "model.arch._target_=brokenlab.Model", "trust.allow_targets=[brokenlab]")
    with pytest.raises(BuildError, match=r"^model.arch._target_: cannot import 'brokenlab.Model' "
                                         r"\(RuntimeError: half-installed\)"):
        build_skeleton(cfg.model)


def test_allowed_targets_match_whole_module_names():
    cfg = compose_config("model=gpt2tiny", "model.arch._target_=torch.nnx.Linear")
    with pytest.raises(BuildError, match="torch.nnx.Linear is outside the modules"):
        build_skeleton(cfg.model)
    with pytest.raises(ConfigError, match=r"trust.allow_targets.0: .*expected a dotted module name"):
        compose_config("trust.allow_targets=[../evil]")


def test_a_package_path_does_not_import_the_package(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    package = tmp_path / "weightspkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text(MARKER_CODE.format(marker=str(marker)))
    (package / "sub" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _path("pkg://weightspkg.sub/model.gguf") == package / "sub" / "model.gguf"
    assert not marker.exists()
    with pytest.raises(ConfigError, match="leaves package weightspkg"):
        _path("pkg://weightspkg/../../etc/passwd", "checkpoint.path")


def write_sharded(folder: Path, shard_names: dict[str, str]) -> Path:
    """A two-tensor checkpoint whose index names the shards given (tensor -> name in the index)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.zeros(2)}, folder / "real.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": shard_names}))
    return index


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"])
def test_an_index_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    index = write_sharded(tmp_path / "ckpt", {"a": name})
    with pytest.raises(CheckpointError, match=r"names shard .* outside its folder; an index names files beside it"):
        shard_path(index, name)


def test_shards_that_link_out_or_are_not_files_are_refused_without_opening_them(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"a": torch.zeros(2)}, other / "theirs.safetensors")
    folder = tmp_path / "ckpt"
    index = write_sharded(folder, {"a": "linked.safetensors"})
    os.symlink(other / "theirs.safetensors", folder / "linked.safetensors")
    cfg = compose_config("model=gpt2tiny", "checkpoint=local", f"checkpoint.path={index}")
    with pytest.raises(CheckpointError, match=r"shard 'linked.safetensors' links to .*theirs.safetensors, outside"):
        plan(cfg, tmp_path / "run")
    os.mkfifo(folder / "pipe.safetensors")  # opening a FIFO would block the run for good
    index.write_text(json.dumps({"weight_map": {"a": "pipe.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard pipe.safetensors is not a regular file"):
        plan(cfg, tmp_path / "run")


def test_a_hub_snapshot_links_into_its_own_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_bytes(b"x")
    os.symlink("../../blobs/f00d", snapshot / "model-00001.safetensors")
    index = snapshot / "model.safetensors.index.json"
    assert shard_path(index, "model-00001.safetensors") == snapshot / "model-00001.safetensors"
