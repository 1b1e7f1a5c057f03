"""Disk offload: streamed reads, prefetch, and an offload folder that is reused, rebuilt or refused clearly."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import compose_config, evict_page_cache
from runner.errors import CheckpointError, DiskFull, OffloadError
from runner.load.conversions import MANIFEST
from runner.infer.engine import Engine

TOKENS = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])
# gpt2tiny with 6 blocks (about 100 kB in fp32, 50 kB in bf16) on a CPU of 60 kB: some blocks go to disk.
DISKY = ["model=gpt2tiny", "model.arch.n_layer=6", "hardware=cpu", "runtime.seq_len=1"]


def converted(root: Path) -> Path:
    """The one folder of ``root`` the conversions went to (one per checkpoint and dtype)."""
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def logits(*overrides: str, tmp_path) -> tuple[torch.Tensor, object]:
    half = any(o.startswith("dtype=") and o != "dtype=float32" for o in overrides)
    cap = "max_memory.cpu=30000B" if half else "max_memory.cpu=60000B"
    result = Engine(compose_config(*DISKY, cap, *overrides), tmp_path).loaded
    assert "disk" in result.check.block_devices.values()
    with torch.inference_mode():
        return result.model(TOKENS), result


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_prefetch_depths_give_identical_outputs(depth, tmp_path):
    resident = Engine(compose_config("model=gpt2tiny", "model.arch.n_layer=6", "hardware=cpu"), tmp_path / "all").loaded
    with torch.inference_mode():
        expected = resident.model(TOKENS)
    out, result = logits(f"offload.prefetch={depth}", tmp_path=tmp_path / f"d{depth}")
    assert torch.equal(out, expected)
    layout = result.layout
    # What streaming a block moves: a tied head (0 B in the plan) streams its owner's table.
    streamed = {b.name: sum(layout.tensor_bytes[layout.ties.get(t, t)] for t in b.tensors) for b in layout.blocks}
    disk = [streamed[b.name] for b in layout.blocks if result.check.block_devices[b.name] == "disk"]
    held = sum(sorted(disk, reverse=True)[: 1 + depth])  # the running block and `depth` read ahead
    assert result.ledger.peak["cpu"] <= result.check.loads["cpu"] + held
    # Every block dropped again, but the next forward's first `depth` disk blocks are already read ahead.
    first = [streamed[b.name] for b in layout.blocks if result.check.block_devices[b.name] == "disk"][:depth]
    assert result.ledger.current["cpu"] == result.check.loads["cpu"] + sum(first)
    with torch.inference_mode():
        assert torch.equal(result.model(TOKENS), expected)  # the second forward uses what was read ahead
    assert result.ledger.current["cpu"] == result.check.loads["cpu"] + sum(first)


def test_disk_reads_bypass_the_memory_map(tmp_path):
    """Weights in the compute dtype are read from the checkpoint itself, into private buffers."""
    _, result = logits("offload.prefetch=0", f"offload.folder={tmp_path / 'off'}", tmp_path=tmp_path)
    assert not (tmp_path / "off").exists()  # nothing converted: fp32 checkpoint, fp32 compute
    key = next(s for b in result.layout.blocks if result.check.block_devices[b.name] == "disk"
               for s in b.tensors if s.endswith("weight"))
    direct = result.checkpoint.read_uncached(key)
    assert torch.equal(direct, result.checkpoint.read(key))
    assert direct.untyped_storage().nbytes() == direct.numel() * direct.element_size()  # its own buffer


def test_converted_weights_are_written_once_and_reused(tmp_path):
    folder = tmp_path / "off"
    first, _ = logits("dtype=bfloat16", f"offload.folder={folder}", tmp_path=tmp_path / "a")
    files = sorted(converted(folder).glob("*.safetensors"))
    assert files and (converted(folder) / MANIFEST).is_file()
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second, _ = logits("dtype=bfloat16", f"offload.folder={folder}", tmp_path=tmp_path / "b")
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # reused, not rewritten
    assert torch.equal(first, second)
    # A smaller budget puts more blocks on disk: those already converted are reused, only the others written.
    third = Engine(compose_config(*DISKY, "max_memory.cpu=20000B", "dtype=bfloat16", f"offload.folder={folder}"),
                    tmp_path / "c").loaded
    more = sorted(converted(folder).glob("*.safetensors"))
    assert len(more) > len(files) and {f: f.stat().st_mtime_ns for f in files} == stamps
    with torch.inference_mode():
        assert torch.equal(third.model(TOKENS), first)


def test_a_stale_folder_is_rebuilt(tmp_path):
    folder = tmp_path / "off"
    logits("dtype=bfloat16", f"offload.folder={folder}", tmp_path=tmp_path / "a")
    # A manifest recorded for another checkpoint or dtype is not trusted: its blocks are converted again.
    (bf16,) = [p for p in folder.iterdir()]
    float16 = folder / "f16"
    float16.mkdir()
    for f in bf16.iterdir():
        (float16 / f.name).write_bytes(f.read_bytes())
    reference, _ = logits("dtype=float16", f"offload.folder={tmp_path / 'fresh'}", tmp_path=tmp_path / "c")
    fresh = converted(tmp_path / "fresh")
    float16.rename(folder / fresh.name)  # bf16 files and manifest where the float16 ones belong
    out, _ = logits("dtype=float16", f"offload.folder={folder}", tmp_path=tmp_path / "b")
    assert torch.equal(out, reference)


def test_an_interrupted_conversion_is_detected_and_redone(tmp_path):
    folder = tmp_path / "off"
    expected, _ = logits("dtype=bfloat16", f"offload.folder={folder}", tmp_path=tmp_path / "a")
    # As if the run died mid-write: the manifest is written last, so it is missing, and a file is cut short.
    (converted(folder) / MANIFEST).unlink()
    victim = sorted(converted(folder).glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    out, _ = logits("dtype=bfloat16", f"offload.folder={folder}", tmp_path=tmp_path / "b")
    assert torch.equal(out, expected)
    assert (converted(folder) / MANIFEST).is_file()


@pytest.mark.parametrize("cut", [100, -1], ids=["header", "last-byte"])
def test_a_converted_file_cut_short_under_an_intact_manifest_is_rewritten(tmp_path, cut):
    """The runner wrote the file, so it checks it: a short one is converted again, not blamed on the checkpoint."""
    folder = tmp_path / "off"
    expected, _ = logits("dtype=bfloat16", f"offload.folder={folder}", tmp_path=tmp_path / "a")
    victim = sorted(converted(folder).glob("*.safetensors"))[-1]
    whole = victim.read_bytes()
    victim.write_bytes(whole[:cut])
    out, _ = logits("dtype=bfloat16", f"offload.folder={folder}", tmp_path=tmp_path / "b")
    assert torch.equal(out, expected)
    assert victim.read_bytes() == whole
    assert not [p for p in converted(folder).iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the offload folder should be")
    with pytest.raises(OffloadError) as e:
        logits("dtype=bfloat16", f"offload.folder={blocker / 'off'}", tmp_path=tmp_path)
    assert len(e.value.lines) == 1
    assert e.value.lines[0].startswith(f"offload.folder: cannot write {blocker / 'off'}")
    assert "set offload.folder to a writable folder" in e.value.lines[0]


def test_a_full_disk_is_one_clear_error(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(DiskFull) as e:
            logits("dtype=bfloat16", f"offload.folder={mount / 'off'}", "max_memory.disk=1GB", tmp_path=tmp_path)
        (line,) = e.value.lines
        assert line.startswith(f"offload.folder: {mount / 'off'}/") and " is full: converting " in line
        assert not [p for p in (mount / "off").rglob("*") if p.name.endswith(".tmp")]  # no partial block
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_cpu_blocks_compute_where_fewer_bytes_move():
    from runner.plan.blocks import Block
    from runner.plan.compute import compute_plan

    blocks = (Block("emb", "Embedding", 4000, ("emb.weight",)), Block("small", "Block", 1000, ("small.w",)),
              Block("big", "Block", 50000, ("big.w",)), Block("far", "Block", 100, ("far.w",)),
              Block("head", "Linear", 0, ("head.weight",), tied_to="emb"))
    devices = {"emb": "cpu", "small": "cpu", "big": "cpu", "far": "disk", "head": "cpu"}
    act = {"small": 64, "big": 64}
    plan = compute_plan(blocks, devices, "cuda:0", act, tokens=32, room=3000, prefetch=1)
    assert plan["emb"].device == "cpu" and "embedding lookup" in plan["emb"].reason
    # 1000 B of weights < 2 x 32 tokens x 64 B of activations, and 2 copies fit the 3000 B of room: copy it in.
    assert plan["small"].device == "cuda:0" and plan["small"].streamed
    # 50000 B of weights take 2 us to copy; 32 tokens take 4 us of CPU work (2 x 32 x 12500 FLOPs at 200 GFLOP/s)
    # plus their activations' 0.16 us: copy it in too, room allowing.
    roomy = compute_plan(blocks, devices, "cuda:0", act, tokens=32, room=10**6, prefetch=1)
    assert roomy["big"].device == "cuda:0" and "costs less than computing 32 tokens on the CPU" in roomy["big"].reason
    # Two tokens take 0.25 us of CPU work: less than the copy, so it computes on the CPU.
    few = compute_plan(blocks, devices, "cuda:0", act, tokens=2, room=10**6, prefetch=1)
    assert few["big"].device == "cpu" and "cost less than copying its 48.83 KiB of weights" in few["big"].reason
    assert plan["big"].device == "cpu" and "no room" in plan["big"].reason
    assert plan["far"].device == "cuda:0" and plan["far"].streamed
    # A tied head counts 0 B (its bytes are the table's): copying it would move 4000 B the plan never reserved.
    assert plan["head"].device == "cpu" and not plan["head"].streamed and "shares its weights with emb" in plan["head"].reason
    tight = compute_plan(blocks, devices, "cuda:0", act, tokens=32, room=1500, prefetch=1)
    assert tight["small"].device == "cpu" and "no room" in tight["small"].reason
    cpu_only = compute_plan(blocks, {**devices, "far": "disk"}, "cpu", act, tokens=32, room=10**9)
    assert cpu_only["small"].device == "cpu" and not cpu_only["small"].streamed


def test_a_streamed_cpu_block_gives_the_same_output(tmp_path):
    overrides = ["model=gpt2tiny", "hardware=sim_2gpu", "runtime.batch_size=64", "+device_map.transformer.h.1=cpu"]
    result = Engine(compose_config(*overrides), tmp_path / "s").loaded
    assert result.compute["transformer.h.1"].streamed  # 13 kB of weights against 64 x 256 tokens of activations
    reference = Engine(compose_config("model=gpt2tiny", "hardware=cpu"), tmp_path / "r").loaded
    with torch.inference_mode():
        assert torch.equal(result.model(TOKENS), reference.model(TOKENS))
    assert all(p.is_meta for p in result.model.transformer.h[1].parameters())  # dropped after the forward
    h1 = next(b for b in result.layout.blocks if b.name == "transformer.h.1")
    assert result.ledger.current["cpu"] == h1.nbytes  # its weights stay in RAM between forwards
    # It computes on cuda:0, so its KV cache fills there: the plan counts it there, not in RAM.
    kv = result.request.kv_bytes["transformer.h.1"]
    on_gpu = sum(n for b, n in result.request.kv_bytes.items() if result.check.block_devices[b] == "cuda:0")
    assert kv > 0 and "kv_cache" not in result.plan.reserves.get("cpu", {})
    assert result.plan.reserves["cuda:0"]["kv_cache"] == on_gpu + kv


def test_a_cpu_block_whose_kv_cache_does_not_fit_the_gpu_computes_on_the_cpu():
    from runner.plan.blocks import Block
    from runner.plan.compute import compute_plan

    blocks = tuple(Block(f"h{i}", "Block", 1000, (f"h{i}.w",)) for i in range(3))
    devices = dict.fromkeys(("h0", "h1", "h2"), "cpu")
    plan = compute_plan(blocks, devices, "cuda:0", {}, tokens=64, room=2000 + 2 * 500, prefetch=1,
                        kv_bytes=dict.fromkeys(("h0", "h1", "h2"), 500))
    # Each copy in needs 2 x 1000 B at a time, and its KV cache stays: room for two caches, not three.
    assert [plan[b].device for b in ("h0", "h1", "h2")] == ["cuda:0", "cuda:0", "cpu"]
    assert "no room" in plan["h2"].reason


def test_disk_blocks_are_read_into_reused_buffers(tmp_path):
    """No allocation per forward: every disk block's weights land in one of depth + 1 reused buffers when they
    come from the device (bytes in the page cache would be mapped in place instead)."""
    # bfloat16 from fp32: disk blocks come from the offload folder, whose pages nothing else maps or reads ahead.
    result = Engine(compose_config(*DISKY, "max_memory.cpu=30000B", "dtype=bfloat16", "offload.prefetch=1",
                                    f"offload.folder={tmp_path / 'off'}"), tmp_path).loaded
    evict_page_cache(tmp_path.glob("off/*/*.safetensors"))
    storages = []
    for name, device in result.check.block_devices.items():
        if device == "disk" and name.startswith("transformer.h."):
            layer = result.model.get_submodule(name).mlp.c_fc
            layer.register_forward_pre_hook(lambda m, _: storages.append(m.weight.untyped_storage().data_ptr()))
    with torch.inference_mode():
        for _ in range(3):
            result.model(TOKENS)
    assert len(storages) >= 6
    assert len(set(storages)) == 2  # the running block's buffer and the one read ahead, over and over


def test_a_checkpoint_cut_short_under_a_running_model_is_one_clear_error(tmp_path):
    # Its own synthetic checkpoint, not the session's shared one, since this one gets cut short.
    result = Engine(compose_config(*DISKY, "max_memory.cpu=60000B", "offload.prefetch=0",
                                    f"checkpoint.cache_dir={tmp_path / 'cache'}"), tmp_path).loaded
    disk = next(b for b in result.layout.blocks if result.check.block_devices[b.name] == "disk")
    shard = result.checkpoint.entries[disk.tensors[0]].file
    # Replaced by a shorter file mid-run (resident weights keep mapping the old one, so nothing else breaks).
    short = shard.with_suffix(".short")
    short.write_bytes(shard.read_bytes()[:4096])
    short.replace(shard)
    with pytest.raises(CheckpointError) as e, torch.inference_mode():
        result.model(TOKENS)
    assert len(e.value.lines) == 1
    assert e.value.lines[0].startswith(f"{shard}: cannot read disk block {disk.name} (short read")
    assert str(tmp_path / "cache") in e.value.lines[0]


def test_a_lone_disk_block_is_not_read_twice_by_the_wrap_around(tmp_path):
    """Read-ahead wraps to the next forward's first block, but never to a block that is running: the planner
    reserves one copy of each, so a second one would overrun a tight simulated GPU."""
    resident = [f"+device_map.transformer.{m}=cuda:0" for m in ("wte", "wpe", "ln_f", *(f"h.{i}" for i in range(5)))]
    overrides = ["model=gpt2tiny", "model.arch.n_layer=6", "hardware=sim_2gpu", "runtime.seq_len=1",
                 "offload.prefetch=1", "+device_map.transformer.h.5=disk", *resident]
    planned = Engine(compose_config(*overrides), tmp_path / "probe").loaded
    h5 = next(b for b in planned.layout.blocks if b.name == "transformer.h.5")
    # Room for one copy, and for the block's KV cache, which lives where it computes.
    assert planned.plan.reserves["cuda:0"]["offload_staging"] == h5.nbytes + planned.request.kv_bytes[h5.name]
    need = planned.check.loads["cuda:0"] + sum(planned.plan.reserves["cuda:0"].values())
    tight = Engine(compose_config(*overrides, f"+max_memory.0={need}B"), tmp_path / "tight").loaded
    with torch.inference_mode():
        for _ in range(2):
            tight.model(TOKENS)
    assert tight.ledger.peak["cuda:0"] == tight.check.loads["cuda:0"] + h5.nbytes


def test_an_offload_folder_with_no_storage_is_named_when_the_plan_needs_disk(tmp_path):
    """/proc has no free space: the plan's want of disk is put down to offload.folder, not to a budget."""
    with pytest.raises(OffloadError) as e:
        logits("offload.folder=/proc/runner-offload", tmp_path=tmp_path)
    assert len(e.value.lines) == 1
    assert e.value.lines[0].startswith("offload.folder: /proc/runner-offload is on a filesystem with no storage")
    assert e.value.lines[0].endswith("point offload.folder at a writable folder on a disk")


def test_an_offload_folder_inside_the_checkpoint_folder_is_refused(tmp_path):
    """Converted blocks beside the user's weights would be read as the checkpoint's own by the next run."""
    resident = Engine(compose_config("model=gpt2tiny", "model.arch.n_layer=6", "hardware=cpu"), tmp_path / "all").loaded
    home = resident.checkpoint.files[0].parent
    with pytest.raises(OffloadError) as e:
        logits("dtype=bfloat16", f"offload.folder={home / 'off'}", tmp_path=tmp_path / "run")
    assert list(e.value.lines) == [f"offload.folder: {home / 'off'} lies inside the checkpoint's folder {home}; converted "
                             "blocks would be written beside its weights. Point offload.folder elsewhere"]
    assert not (home / "off").exists()
