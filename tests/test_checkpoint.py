"""Stage 2 on real safetensors files: opening every layout, corrupt files, key checks, synthetic weights."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runner.plan.blocks import describe_model
from runner.load.build import build_skeleton
from runner.load.checkpoint import check_keys
from runner.load.checkpoint.files import INDEX_NAME, Checkpoint, open_safetensors
from runner.load.checkpoint.synthetic import synthetic_checkpoint
from runner.config import CheckpointSpec, ModelSpec
from runner.errors import CheckpointError
from runner.zoo.gpt import GPT

ARCH = {"_target_": "runner.zoo.gpt.GPT", "vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 16}
TINY = ModelSpec("gpt2tiny", ARCH, ("Block",))


def state_dict(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A valid gpt2tiny checkpoint: the CPU model's tensors, the tied head stored once (as wte)."""
    torch.manual_seed(0)
    model = GPT(**{k: v for k, v in ARCH.items() if k != "_target_"})
    return {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def save(tensors: dict[str, torch.Tensor], file: Path) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file))
    return file


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, index: bool = True) -> Path:
    """Two shards: block 0 in the first, everything else in the second, plus the index."""
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [{k: v for k, v in tensors.items() if k.startswith("transformer.h.0.")},
             {k: v for k, v in tensors.items() if not k.startswith("transformer.h.0.")}]
    for name, part in zip(names, parts):
        save(part, folder / name)
    if index:
        weight_map = {k: name for name, part in zip(names, parts) for k in part}
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def raised(fn, *args) -> tuple[str, ...]:
    """The lines of the CheckpointError ``fn(*args)`` raises (any other exception fails the test)."""
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    return info.value.lines


def open_and_read_all(path: Path) -> Checkpoint:
    checkpoint = open_safetensors(path)
    for key in checkpoint.entries:
        checkpoint.read(key)
    return checkpoint


def tiny_model():
    model = build_skeleton(TINY)
    return model, describe_model(model, TINY.no_split_module_classes, torch.float32)


def synthetic_spec(cache_dir: Path, seed: int = 0, dtype: str = "float32") -> CheckpointSpec:
    return CheckpointSpec(source="synthetic", seed=seed, dtype=dtype, shard_size=20_000, cache_dir=cache_dir)


def summary(checkpoint: Checkpoint) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (e.dtype, e.shape) for k, e in checkpoint.entries.items()}


# --- opening ---------------------------------------------------------------------------------------------------

def test_every_layout_opens_to_the_same_entries(tmp_path):
    tensors = state_dict()
    single = save(tensors, tmp_path / "single" / "model.safetensors")
    sharded = save_sharded(tensors, tmp_path / "sharded")
    no_index = save_sharded(tensors, tmp_path / "no_index", index=False)
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    for path in (single, sharded, sharded / INDEX_NAME, no_index):
        checkpoint = open_safetensors(path)
        assert summary(checkpoint) == expected, path
    assert len(open_safetensors(sharded).files) == 2
    assert torch.equal(open_safetensors(sharded).read("transformer.h.0.ln_1.weight"), tensors["transformer.h.0.ln_1.weight"])


@pytest.mark.parametrize("keep", [3, 0.5, -1], ids=["header-too-small", "half", "last-byte-missing"])
def test_truncated_file_is_a_checkpoint_error_naming_it(tmp_path, keep):
    file = save(state_dict(), tmp_path / "model.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    (line,) = raised(open_and_read_all, file)
    assert str(file) in line and ("re-download" in line or "truncated" in line)


@pytest.mark.parametrize("raw", [struct.pack("<Q", 2**60) + b"{}",
                                 struct.pack("<Q", 10) + b"not json!!" + bytes(16),
                                 struct.pack("<Q", 4096) + b'{"a": 1}'],
                         ids=["huge-header-length", "garbage-json", "header-past-end"])
def test_corrupt_header_is_a_checkpoint_error_naming_the_file(tmp_path, raw):
    file = tmp_path / "model.safetensors"
    file.write_bytes(raw)
    (line,) = raised(open_safetensors, file)
    assert str(file) in line and "not a readable safetensors file" in line and "re-download" in line


def test_corrupt_shard_is_named(tmp_path):
    folder = save_sharded(state_dict(), tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    (line,) = raised(open_safetensors, folder)
    assert str(shard) in line


def test_index_naming_a_missing_shard(tmp_path):
    folder = save_sharded(state_dict(), tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    (line,) = raised(open_safetensors, folder)
    assert "model-00002-of-00002.safetensors" in line and "incomplete" in line and INDEX_NAME in line


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    folder = save_sharded(state_dict(), tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["transformer.h.7.attn.c_attn.weight"] = "model-00001-of-00002.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    (line,) = raised(open_safetensors, folder)
    assert "transformer.h.7.attn.c_attn.weight" in line and "model-00001-of-00002.safetensors" in line
    assert "do not match" in line


def test_tensor_stored_in_two_shards(tmp_path):
    save({"transformer.wpe.weight": torch.zeros(64, 16)}, tmp_path / "a.safetensors")
    save({"transformer.wpe.weight": torch.zeros(64, 16)}, tmp_path / "b.safetensors")
    (line,) = raised(open_safetensors, tmp_path)
    assert "transformer.wpe.weight" in line and "a.safetensors" in line and "b.safetensors" in line


def test_missing_path_and_empty_folder(tmp_path):
    (line,) = raised(open_safetensors, tmp_path / "nowhere")
    assert "checkpoint.path" in line and "does not exist" in line
    (line,) = raised(open_safetensors, tmp_path)
    assert "checkpoint.path" in line and "no .safetensors" in line


@pytest.mark.parametrize("stored, expected", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.float32, torch.float32)])
def test_dtype_is_the_stored_one(tmp_path, stored, expected):
    tensors = state_dict(stored)
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].float()  # a minority in another dtype
    assert open_safetensors(save(tensors, tmp_path / "model.safetensors")).dtype == expected


# --- keys ------------------------------------------------------------------------------------------------------

def test_valid_checkpoint_passes_check_keys(tmp_path):
    model, layout = tiny_model()
    report = check_keys(open_safetensors(save(state_dict(), tmp_path / "m.safetensors")), model, layout)
    assert report.ignored == ()


def test_tied_copy_is_ignored(tmp_path):
    tensors = state_dict()
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    model, layout = tiny_model()
    report = check_keys(open_safetensors(save(tensors, tmp_path / "m.safetensors")), model, layout)
    assert report.ignored == ("lm_head.weight",)


def test_check_keys_reports_every_problem_at_once(tmp_path):
    tensors = state_dict()
    tensors["transformer.wpe.weight"] = torch.zeros(32, 16)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    tensors["transformer.h.9.foo"] = torch.zeros(3)
    model, layout = tiny_model()
    lines = raised(check_keys, open_safetensors(save(tensors, tmp_path / "m.safetensors")), model, layout)
    assert len(lines) == 3
    shape, missing, unexpected = (next(line for line in lines if word in line)
                                  for word in ("shape mismatch", "missing", "unexpected"))
    assert "transformer.wpe.weight" in shape and "[32, 16]" in shape and "[64, 16]" in shape
    assert "transformer.h.1.mlp.c_fc.weight" in missing and "module transformer.h.1.mlp.c_fc" in missing
    assert "transformer.h.9.foo" in unexpected and "m.safetensors" in unexpected


# --- synthetic -------------------------------------------------------------------------------------------------

def test_synthetic_checkpoint_is_sharded_and_matches_the_model(tmp_path):
    model, layout = tiny_model()
    folder = synthetic_checkpoint(synthetic_spec(tmp_path), TINY, model)
    assert folder.parent == tmp_path and folder.name.startswith("gpt2tiny-") and (folder / INDEX_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no .tmp-* left behind
    checkpoint = open_safetensors(folder)
    assert len(checkpoint.files) > 1
    assert check_keys(checkpoint, model, layout).ignored == ()
    assert summary(checkpoint) == {k: (torch.float32, tuple(v.shape)) for k, v in state_dict().items()}
    for key in checkpoint.entries:
        t = checkpoint.read(key)
        if key.endswith("bias"):
            assert torch.equal(t, torch.zeros_like(t)), key
        elif ".ln_" in key:
            assert torch.equal(t, torch.ones_like(t)), key
    assert 0.015 < checkpoint.read("transformer.wte.weight").std().item() < 0.025


def test_synthetic_checkpoint_is_reused_not_rewritten(tmp_path, monkeypatch):
    model, _ = tiny_model()
    folder = synthetic_checkpoint(synthetic_spec(tmp_path), TINY, model)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_write(*args):
        raise AssertionError("rewrote a cached synthetic checkpoint")

    monkeypatch.setattr("runner.load.checkpoint.synthetic._write", no_write)
    assert synthetic_checkpoint(synthetic_spec(tmp_path), TINY, model) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


def test_synthetic_weights_depend_on_the_seed_only(tmp_path):
    model, _ = tiny_model()
    a = open_safetensors(synthetic_checkpoint(synthetic_spec(tmp_path / "a", seed=0), TINY, model))
    b = open_safetensors(synthetic_checkpoint(synthetic_spec(tmp_path / "b", seed=0), TINY, model))
    c = open_safetensors(synthetic_checkpoint(synthetic_spec(tmp_path / "a", seed=1), TINY, model))
    assert a.files[0].parent.name == b.files[0].parent.name != c.files[0].parent.name
    for key in a.entries:
        assert torch.equal(a.read(key), b.read(key)), key
    assert not torch.equal(a.read("transformer.wte.weight"), c.read("transformer.wte.weight"))


def test_synthetic_checkpoint_in_bfloat16(tmp_path):
    model, _ = tiny_model()
    checkpoint = open_safetensors(synthetic_checkpoint(synthetic_spec(tmp_path, dtype="bfloat16"), TINY, model))
    assert checkpoint.dtype == torch.bfloat16
    assert {e.dtype for e in checkpoint.entries.values()} == {torch.bfloat16}


def test_unwritable_cache_dir_names_the_setting(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model, _ = tiny_model()
    (line,) = raised(synthetic_checkpoint, synthetic_spec(blocker / "cache"), TINY, model)
    assert "checkpoint.cache_dir" in line and str(blocker / "cache") in line and "writable" in line
