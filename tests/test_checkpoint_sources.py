"""Checkpoint sources on real files: PyTorch pickles (.bin/.pt) and a Hugging Face Hub cache in its real layout.

Hub tests never touch the network: ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` point huggingface_hub at a cache
built here (``models--ORG--NAME/{blobs,snapshots/<commit>,refs/main,trees/<commit>.json}``). huggingface_hub
reads ``HF_HUB_OFFLINE`` once, when imported; the runner also reads the variable at call time, so the in-process
tests set it with monkeypatch whatever was imported before, and the CLI tests set it before Python starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import compose_config, generate_run, write_byte_tokenizer
from runner.load.checkpoint import check_keys
from runner.load.checkpoint.files import INDEX_NAME, open_local, open_safetensors
from runner.load.checkpoint.hub import open_hub, weight_files
from runner.load.checkpoint.names import RenamedCheckpoint
from runner.load.checkpoint.pickled import PICKLE_INDEX_NAME, PickleCheckpoint
from runner.config import CheckpointSpec
from runner.errors import CheckpointError
from runner.infer.engine import Engine
from runner.zoo.gpt import GPT

ROOT = Path(__file__).resolve().parent.parent
ARCH = {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 16}
REPO = "tiny-org/gpt2tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
TINY = ("model=gpt2tiny", "task.max_new_tokens=2")


class Marker:
    """A custom class: pickling an instance needs full unpickling to load it back."""

    def __init__(self, note: str = "trained on Tuesday"):
        self.note = note


def reference() -> GPT:
    torch.manual_seed(0)
    return GPT(**ARCH).eval()


def state_dict() -> dict[str, torch.Tensor]:
    """The reference model's tensors, the tied head stored once (as wte)."""
    return {k: v.detach().clone() for k, v in reference().state_dict().items() if k != "lm_head.weight"}


def two_shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v for k, v in tensors.items() if k.startswith("transformer.h.0.")},
            {k: v for k, v in tensors.items() if not k.startswith("transformer.h.0.")}]


def save_bin_sharded(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    parts = two_shards(tensors)
    for name, part in zip(names, parts):
        torch.save(part, folder / name)
    weight_map = {k: name for name, part in zip(names, parts) for k in part}
    (folder / PICKLE_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def raised(fn, *args, **kwargs) -> tuple[str, ...]:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    return info.value.lines


def tiny_layout():
    from runner.plan.blocks import describe_model
    from runner.load.build import build_skeleton
    from runner.config import ModelSpec
    spec = ModelSpec("gpt2tiny", {"_target_": "runner.zoo.gpt.GPT", **ARCH}, ("Block",))
    model = build_skeleton(spec)
    return model, describe_model(model, spec.no_split_module_classes, torch.float32)


# --- PyTorch pickles -------------------------------------------------------------------------------------------

def test_bin_loads_the_same_tensors_as_safetensors(tmp_path):
    tensors = state_dict()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    (tmp_path / "st").mkdir()
    save_file(tensors, str(tmp_path / "st" / "model.safetensors"))
    pickled = open_local(tmp_path / "pytorch_model.bin")
    reference_st = open_safetensors(tmp_path / "st" / "model.safetensors")
    assert isinstance(pickled, PickleCheckpoint) and pickled.source == "local" and pickled.revision is None
    assert {k: (e.dtype, e.shape) for k, e in pickled.entries.items()} == \
           {k: (e.dtype, e.shape) for k, e in reference_st.entries.items()}
    for key in tensors:
        assert torch.equal(pickled.read(key), reference_st.read(key)), key
    assert pickled.dtype == torch.float32 and pickled.ignored == {}
    fingerprint = pickled.fingerprint()
    assert fingerprint["files"] == [{"path": str(tmp_path / "pytorch_model.bin"),
                                     "bytes": (tmp_path / "pytorch_model.bin").stat().st_size}]
    model, layout = tiny_layout()
    assert check_keys(pickled, model, layout).ignored == ()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see memory mappings")
def test_bin_is_memory_mapped_not_read(tmp_path):
    file = tmp_path / "mapped.bin"
    torch.save(state_dict(), file)
    checkpoint = open_local(file)
    assert str(file) in Path("/proc/self/maps").read_text()  # the tensor data is a mapping of the file
    assert checkpoint.entries


def test_bfloat16_bin_reports_its_dtype(tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in state_dict().items()}
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].float()  # a minority in fp32
    torch.save(tensors, tmp_path / "model.pt")
    assert open_local(tmp_path / "model.pt").dtype == torch.bfloat16


def test_sharded_bin_with_index_loads_from_folder_or_index(tmp_path):
    tensors = state_dict()
    folder = save_bin_sharded(tensors, tmp_path / "sharded")
    for path in (folder, folder / PICKLE_INDEX_NAME):
        checkpoint = open_local(path)
        assert [f.name for f in checkpoint.files] == ["pytorch_model-00001-of-00002.bin",
                                                      "pytorch_model-00002-of-00002.bin"]
        assert set(checkpoint.entries) == set(tensors)
        assert checkpoint.entries["transformer.h.0.ln_1.weight"].file.name == "pytorch_model-00001-of-00002.bin"
        for key, value in tensors.items():
            assert torch.equal(checkpoint.read(key), value), key


def test_bin_index_naming_a_missing_shard(tmp_path):
    folder = save_bin_sharded(state_dict(), tmp_path)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    (line,) = raised(open_local, folder)
    assert "pytorch_model-00002-of-00002.bin" in line and "incomplete" in line


def test_folder_with_both_kinds_prefers_safetensors(tmp_path):
    tensors = state_dict()
    torch.save({**tensors, "evil": Marker()}, tmp_path / "pytorch_model.bin")  # would be refused, if opened
    save_file(tensors, str(tmp_path / "model.safetensors"))
    checkpoint = open_local(tmp_path)
    assert [f.name for f in checkpoint.files] == ["model.safetensors"]


def test_pickle_needing_full_unpickling_is_refused_in_one_line(tmp_path):
    file = tmp_path / "custom.bin"
    torch.save({**state_dict(), "training_note": Marker()}, file)
    (line,) = raised(open_local, file)
    assert str(file) in line and "Marker" in line
    assert "needs full unpickling" in line and "arbitrary code" in line
    assert "convert it to safetensors" in line and "checkpoint.allow_pickle=true" in line
    assert "\n" not in line and "\x1b" not in line


def test_allow_pickle_loads_it_and_reports_the_object_as_ignored(tmp_path, caplog):
    file = tmp_path / "custom.bin"
    tensors = state_dict()
    torch.save({**tensors, "training_note": Marker()}, file)
    with caplog.at_level(logging.WARNING, logger="runner.load.checkpoint.pickled"):
        checkpoint = open_local(file, allow_pickle=True)
    assert any("allow_pickle=true" in r.getMessage() and "Marker" in r.getMessage() for r in caplog.records)
    assert set(checkpoint.entries) == set(tensors)  # the object is no weight...
    assert "Marker" in checkpoint.ignored["training_note"]  # ...and is listed, as such, in the report
    model, layout = tiny_layout()
    ignored = check_keys(checkpoint, model, layout).ignored
    assert any(entry.startswith("training_note (") and "Marker" in entry for entry in ignored)


def test_whole_module_pickle_is_refused_then_loaded_as_its_state_dict(tmp_path):
    file = tmp_path / "model.pt"
    torch.save(reference(), file)
    (line,) = raised(open_local, file)
    assert str(file) in line and "runner.zoo.gpt.GPT" in line and "needs full unpickling" in line
    checkpoint = open_local(file, allow_pickle=True)
    model, layout = tiny_layout()
    assert check_keys(checkpoint, model, layout).ignored == ("lm_head.weight",)  # the tied copy, ignored
    assert torch.equal(checkpoint.read("transformer.wte.weight"), state_dict()["transformer.wte.weight"])


def test_plain_values_load_with_weights_only_and_are_ignored(tmp_path):
    torch.save({**state_dict(), "version": 3, "format": "pt"}, tmp_path / "m.bin")
    checkpoint = open_local(tmp_path / "m.bin")
    assert sorted(checkpoint.ignored) == ["format", "version"]
    assert "int" in checkpoint.ignored["version"]


@pytest.mark.parametrize("keep", [0, 40, 0.5, -10], ids=["empty", "40-bytes", "half", "last-bytes-missing"])
def test_truncated_bin_is_a_checkpoint_error_naming_it(tmp_path, keep):
    file = tmp_path / "pytorch_model.bin"
    torch.save(state_dict(), file)
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    (line,) = raised(open_local, file)
    assert str(file) in line and "truncated or corrupt" in line and "re-download" in line
    assert "\n" not in line


def test_legacy_format_bin_loads_without_mmap(tmp_path, caplog):
    tensors = state_dict()
    torch.save(tensors, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with caplog.at_level(logging.WARNING, logger="runner.load.checkpoint.pickled"):
        checkpoint = open_local(tmp_path / "old.bin")
    assert "legacy" in caplog.text
    assert torch.equal(checkpoint.read("transformer.wpe.weight"), tensors["transformer.wpe.weight"])


def test_nested_state_dict_names_where_the_tensors_are(tmp_path):
    torch.save({"state_dict": state_dict(), "epoch": 3}, tmp_path / "lightning.pt")
    (line,) = raised(open_local, tmp_path / "lightning.pt")
    assert "no tensors at its top level" in line and "'state_dict'" in line


def test_unknown_suffix_and_empty_folder(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    (line,) = raised(open_local, tmp_path / "weights.npz")
    assert "weights.npz" in line and ".bin/.pt" in line
    (tmp_path / "empty").mkdir()
    (line,) = raised(open_local, tmp_path / "empty")
    assert "no .safetensors or .bin/.pt files" in line


def test_run_from_a_bin_generates_what_the_safetensors_run_does(tmp_path):
    tensors = state_dict()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    write_byte_tokenizer(tmp_path)
    engine, from_bin = generate_run(compose_config(*TINY, "checkpoint=local", f"tokenizer.path={tmp_path}",
                                                   f"checkpoint.path={tmp_path / 'pytorch_model.bin'}"),
                                    tmp_path / "run-bin")
    _, from_st = generate_run(compose_config(*TINY, "checkpoint=local", f"checkpoint.path={tmp_path / 'model.safetensors'}",
                                             f"tokenizer.path={tmp_path / 'tokenizer.json'}"), tmp_path / "run-st")
    assert engine.loaded.checkpoint.files[0].name == "pytorch_model.bin"
    tokens = [p.output_tokens for p in from_bin]
    assert tokens == [p.output_tokens for p in from_st] and all(len(t) == 2 for t in tokens)
    model = reference()  # the same weights, in plain PyTorch
    with torch.no_grad():
        for prediction in from_bin:
            ids = torch.tensor([prediction.prompt_tokens])
            first = int(model(ids)[0, -1].argmax())
            assert prediction.output_tokens[0] == first


def test_run_with_allow_pickle_reports_the_custom_object(tmp_path):
    file = tmp_path / "custom.bin"
    torch.save({**state_dict(), "training_note": Marker()}, file)
    with pytest.raises(CheckpointError):
        Engine(compose_config(*TINY, "checkpoint=local", f"checkpoint.path={file}"), tmp_path / "refused").loaded
    result = Engine(compose_config(*TINY, "checkpoint=local", f"checkpoint.path={file}",
                                    "checkpoint.allow_pickle=true"), tmp_path / "allowed").loaded
    assert any(k.startswith("training_note (") for k in result.keys.ignored)


# --- Hub cache -------------------------------------------------------------------------------------------------

def hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT,
              listing_only: dict[str, int] | None = None, refs: tuple[str, ...] = ("main",)) -> Path:
    """A repo in the real Hub cache layout: content-addressed blobs, a snapshot of symlinks to them named by the
    commit, ``refs/<branch>`` holding the commit (no newline), and, when ``listing_only`` is given, the repo's full
    file listing as huggingface_hub >= 1.x records it (``trees/<commit>.json``), with files that were never fetched.
    """
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    tree = {}
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        blob = storage / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        tree[name] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    if listing_only is not None:
        for name, size in listing_only.items():
            tree[name] = {"size": size, "blob_id": hashlib.sha1(name.encode()).hexdigest(),
                          "lfs_sha256": hashlib.sha256(name.encode()).hexdigest(), "lfs_size": size}
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return storage


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save
    return save(tensors)


def tiny_repo_files() -> dict[str, bytes]:
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = two_shards(state_dict())
    weight_map = {k: name for name, part in zip(names, parts) for k in part}
    return {names[0]: safetensors_bytes(parts[0]), names[1]: safetensors_bytes(parts[1]),
            INDEX_NAME: json.dumps({"metadata": {}, "weight_map": weight_map}).encode(),
            "config.json": json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 16}).encode(),
            "README.md": b"# tiny\n", "tokenizer.json": _byte_tokenizer_json()}


def _byte_tokenizer_json() -> bytes:
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        return write_byte_tokenizer(Path(folder)).read_bytes()


# Files the Hub repo has that a run must not fetch: another copy of the weights, another format, a subfolder.
DECOYS = {"consolidated.safetensors": 14_000_000_000, "flax_model.msgpack": 500_000_000,
          "onnx/model.safetensors": 500_000_000, "pytorch_model.bin": 500_000_000}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hub cache holding REPO at COMMIT (branch main), whose listing has never-fetched decoys."""
    cache = tmp_path / "hf-cache"
    hub_cache(cache, REPO, tiny_repo_files(), listing_only=DECOYS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def hub_spec(repo: str = REPO, revision: str = "main", cache_dir: Path | None = None, **kw) -> CheckpointSpec:
    return CheckpointSpec(source="hub", repo_id=repo, revision=revision, cache_dir=cache_dir, **kw)


@pytest.mark.parametrize("revision", ["main", COMMIT])
def test_open_hub_offline_resolves_the_commit(offline_cache, revision):
    checkpoint = open_hub(hub_spec(revision=revision))  # cache_dir from HF_HUB_CACHE
    snapshot = offline_cache / "models--tiny-org--gpt2tiny" / "snapshots" / COMMIT
    assert checkpoint.source == "hub" and checkpoint.revision == COMMIT
    assert checkpoint.files == [snapshot / "model-00001-of-00002.safetensors",
                                snapshot / "model-00002-of-00002.safetensors"]
    fingerprint = checkpoint.fingerprint()
    assert fingerprint["source"] == "hub" and fingerprint["revision"] == COMMIT
    tensors = state_dict()
    for key in checkpoint.entries:
        assert torch.equal(checkpoint.read(key), tensors[key]), key
    model, layout = tiny_layout()
    assert check_keys(checkpoint, model, layout).ignored == ()


def test_open_hub_with_cache_dir_setting(offline_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    assert open_hub(hub_spec(cache_dir=offline_cache)).revision == COMMIT


def test_hub_asks_only_for_weights_and_config(offline_cache):
    """Offline, huggingface_hub checks the requested files against the cached listing: asking for any decoy
    (never fetched) would fail. The naive patterns do ask for them, so the check is live."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError
    checkpoint = open_hub(hub_spec())
    assert all(f.suffix == ".safetensors" and "consolidated" not in f.name for f in checkpoint.files)
    for naive in (["*.safetensors"], None):
        with pytest.raises(LocalEntryNotFoundError, match="consolidated.safetensors"):
            snapshot_download(REPO, cache_dir=str(offline_cache), local_files_only=True, allow_patterns=naive)


def test_weight_file_choice():
    hf = ["config.json", "generation_config.json", "model-00001-of-00003.safetensors",
          "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", INDEX_NAME,
          "consolidated.safetensors", "pytorch_model.bin", "original/consolidated.00.pth", "tokenizer.json"]
    assert weight_files(hf) == [INDEX_NAME, "config.json"]
    assert weight_files(["model.safetensors", "adapter.safetensors", "onnx/model.safetensors"]) == \
           ["model.safetensors"]
    assert weight_files(["pytorch_model.bin", "training_args.bin", "tf_model.h5", "config.json"]) == \
           ["pytorch_model.bin", "config.json"]
    assert weight_files([PICKLE_INDEX_NAME, "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]) \
        == [PICKLE_INDEX_NAME]
    assert weight_files(["weights.pt", "training_args.bin", "optimizer.pt"]) == ["weights.pt"]
    assert weight_files(["tf_model.h5", "config.json"]) == ["config.json"]


def test_cache_without_listing_does_not_open_other_weights(tmp_path, monkeypatch):
    """Without a recorded listing (huggingface_hub < 1.x caches), the snapshot's own files decide; a garbage copy
    of the weights beside the index is never opened."""
    cache = tmp_path / "hf-cache"
    hub_cache(cache, REPO, {**tiny_repo_files(), "consolidated.safetensors": b"\x00not safetensors"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = open_hub(hub_spec(cache_dir=cache))
    assert checkpoint.revision == COMMIT and len(checkpoint.files) == 2


def test_hub_repo_with_only_a_bin(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    import io
    buffer = io.BytesIO()
    torch.save(state_dict(), buffer)
    hub_cache(cache, "old-org/gpt2tiny-bin", {"pytorch_model.bin": buffer.getvalue(), "training_args.bin": b"junk"},
              listing_only={"tf_model.h5": 10})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = open_hub(hub_spec("old-org/gpt2tiny-bin", cache_dir=cache))
    assert [f.name for f in checkpoint.files] == ["pytorch_model.bin"] and checkpoint.revision == COMMIT


def test_hub_metadata_dir_holds_the_cached_tokenizer(tmp_path, monkeypatch):
    """The snapshot folder is the metadata folder, under the model's names too; offline, a listed file the cache
    never fetched (tokenizer_config.json) is optional, not an error."""
    cache = tmp_path / "hf-cache"
    tokenizer = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}).encode()
    hub_cache(cache, REPO, {**tiny_repo_files(), "tokenizer.json": tokenizer},
              listing_only={"tokenizer_config.json": 100})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = open_hub(hub_spec(cache_dir=cache))
    snapshot = cache / "models--tiny-org--gpt2tiny" / "snapshots" / COMMIT
    renamed = RenamedCheckpoint(checkpoint, GPT.checkpoint_names(checkpoint.entries))
    assert checkpoint.metadata_dir == renamed.metadata_dir == snapshot
    assert (renamed.metadata_dir / "tokenizer.json").read_bytes() == tokenizer
    assert renamed.config()["model_type"] == "gpt2" and renamed.tokenizer_fields() is None


def test_hub_online_asks_for_the_tokenizer_files_the_repo_has(offline_cache, monkeypatch):
    """Online, the optional files are asked for by name with the weights, and only those the repo lists."""
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = [*tiny_repo_files(), *DECOYS, "tokenizer.json", "generation_config.json", "vocab.txt"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: listing)
    asked: list[list[str]] = []

    def snapshot_download(repo, revision, cache_dir, allow_patterns, local_files_only):
        asked.append(allow_patterns)
        return str(offline_cache / "models--tiny-org--gpt2tiny" / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert open_hub(hub_spec()).revision == COMMIT
    assert sorted(asked[0]) == sorted([INDEX_NAME, "config.json", "tokenizer.json", "generation_config.json"])


def test_repo_not_in_the_cache_is_one_line(offline_cache):
    (line,) = raised(open_hub, hub_spec("tiny-org/absent"))
    assert "tiny-org/absent" in line and "revision main" in line and "not in the Hugging Face cache" in line
    assert str(offline_cache) in line and "HF_HUB_OFFLINE" in line
    assert "hf download tiny-org/absent --revision main" in line and "huggingface-cli" in line
    assert "checkpoint.cache_dir" in line and "checkpoint=local checkpoint.path=" in line


@pytest.mark.parametrize("revision", ["v2.0", OTHER_COMMIT])
def test_revision_not_in_the_cache_is_one_line(offline_cache, revision):
    (line,) = raised(open_hub, hub_spec(revision=revision))
    assert REPO in line and f"revision {revision}" in line and "but not at revision" in line
    assert "cached: main" in line and COMMIT[:12] in line and "hf download" in line


def test_incomplete_snapshot_is_one_line(tmp_path, monkeypatch):
    files = tiny_repo_files()
    del files["model-00002-of-00002.safetensors"]  # an interrupted download
    cache = tmp_path / "hf-cache"
    hub_cache(cache, REPO, files, listing_only={"model-00002-of-00002.safetensors": 1000})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (line,) = raised(open_hub, hub_spec(cache_dir=cache))
    assert REPO in line and "lacks files" in line and "model-00002-of-00002.safetensors" in line


# --- the CLI ---------------------------------------------------------------------------------------------------

def run_cli(cli, run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A real process: huggingface_hub reads HF_HUB_OFFLINE when imported, so it is set before Python starts."""
    env = {**cli.env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache / "unused")}
    return cli(*overrides, f"hydra.run.dir={run_dir}", env=env, timeout=300)


def test_cli_runs_from_the_hub_cache_and_records_the_commit(tmp_path, cli):
    cache = tmp_path / "hf-cache"
    hub_cache(cache, REPO, tiny_repo_files(), listing_only=DECOYS)
    done = run_cli(cli, tmp_path / "run", cache, *TINY, "checkpoint=hub", f"checkpoint.repo_id={REPO}",
                   f"checkpoint.cache_dir={cache}")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["checkpoint"]["source"] == "hub" and report["checkpoint"]["revision"] == COMMIT
    assert [Path(f["path"]).name for f in report["checkpoint"]["files"]] == \
           ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

    missing = run_cli(cli, tmp_path / "run2", cache, *TINY, "checkpoint=hub", "checkpoint.repo_id=tiny-org/absent",
                      f"checkpoint.cache_dir={cache}")
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1, missing.stderr
    assert lines[0].startswith("error: checkpoint: ") and "tiny-org/absent" in lines[0]
