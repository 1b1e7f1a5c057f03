"""Dispatched models compute what the plain model computes, wherever their blocks sit."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config, generate_run
from runner.load.build import build_skeleton
from runner.load.build import import_target
from runner.infer.engine import Engine

STRATEGIES = ["sequential", "balanced", "balanced_low_0", "auto"]
# gpt2tiny with 6 blocks: wte (+ tied head) 16 KiB, wpe 4 KiB, each Block 13120 B, ln_f 128 B.
SIX = ["model=gpt2tiny", "model.arch.n_layer=6", "hardware=sim_2gpu", "runtime.seq_len=1"]
# Budgets that push blocks onto both simulated GPUs, the CPU and disk.
# With runtime.seq_len=1 the runtime reserves are small: 640 B of activations per device, 1 KiB of logits on cuda:0,
# 128 B of KV cache per Block.
TIGHT = ["+max_memory.0=45000B", "+max_memory.1=30000B", "max_memory.cpu=30000B"]
TOKENS = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])


def reference_model(cfg, dtype=torch.float32) -> torch.nn.Module:
    """The plain way: build on CPU, load_state_dict of every shard, no hooks."""
    arch = {k: v for k, v in cfg.model.arch.items() if k != "_target_"}
    model = import_target(cfg.model.arch["_target_"])(**arch)
    state = {}
    for file in sorted(cfg.checkpoint.cache_dir.glob("*/*.safetensors")):
        if file.parent.name.startswith(cfg.model.name):
            state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # the head is tied to wte, stored once
    return model.to(dtype).eval()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tight_budgets_span_every_tier_and_match_the_reference(strategy, tmp_path):
    cfg = compose_config(*SIX, *TIGHT, f"placement={strategy}")
    result = Engine(cfg, tmp_path).loaded
    assert set(result.check.block_devices.values()) == {"cuda:0", "cuda:1", "cpu", "disk"}
    with torch.inference_mode():
        logits = result.model(TOKENS)
        expected = reference_model(cfg)(TOKENS)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_tokens_equal_the_all_cpu_run(strategy, tmp_path):
    # A 2-byte prompt and 6 new tokens: a KV cache of 8 positions is planned for, within the same budgets.
    overrides = [*SIX[:-1], "runtime.seq_len=8", "task.max_new_tokens=6", "data.prompts=[Hi]"]
    _, cpu = generate_run(compose_config(*overrides, "hardware=cpu"), tmp_path / "cpu")
    # cuda:0 also holds more activations and the disk blocks' KV cache: more room than TIGHT.
    tight = ["+max_memory.0=60000B", *TIGHT[1:]]
    spread, spread_out = generate_run(compose_config(*overrides, *tight, f"placement={strategy}"), tmp_path / strategy)
    assert set(spread.loaded.check.block_devices.values()) == {"cuda:0", "cuda:1", "cpu", "disk"}
    assert [p.output_tokens for p in spread_out] == [p.output_tokens for p in cpu]
    assert len(cpu[0].output_tokens) == 6


def test_disk_blocks_hold_only_the_read_ahead_between_forwards_and_stream_within_the_reserve(tmp_path):
    cfg = compose_config(*SIX, *TIGHT, "placement=sequential")
    result = Engine(cfg, tmp_path).loaded
    on_disk = [name for name, device in result.check.block_devices.items() if device == "disk"]
    assert on_disk
    for name in on_disk:
        assert all(p.is_meta for p in result.model.get_submodule(name).parameters())
    resident_cuda0 = result.ledger.current["cuda:0"]
    with torch.inference_mode():
        result.model(TOKENS)
    for name in on_disk:  # dropped again after the forward
        assert all(p.is_meta for p in result.model.get_submodule(name).parameters())
    first = next(b.nbytes for b in result.layout.blocks if b.name in on_disk)
    assert result.ledger.current["cuda:0"] == resident_cuda0 + first  # the next forward's first, read ahead
    # While a disk block ran, cuda:0 held it and the next one (prefetch depth 1) on top of its resident
    # blocks, within the planned staging room.
    biggest = max(b.nbytes for b in result.layout.blocks if b.name in on_disk)
    assert result.ledger.peak["cuda:0"] == resident_cuda0 + 2 * biggest
    assert 2 * biggest <= result.plan.reserves["cuda:0"]["offload_staging"]
    assert result.ledger.peak["cuda:0"] <= result.hardware.get("cuda:0").budget


def test_bfloat16_from_an_fp32_checkpoint_casts_per_tensor_and_converts_disk_blocks(tmp_path):
    cfg = compose_config(*SIX, *TIGHT, "dtype=bfloat16", "placement=sequential", f"offload.folder={tmp_path / 'off'}")
    result = Engine(cfg, tmp_path).loaded
    assert result.dtype == torch.bfloat16
    assert {p.dtype for name, p in result.model.named_parameters() if not p.is_meta} == {torch.bfloat16}
    converted = sorted(f.name for f in (tmp_path / "off").glob("*.safetensors"))
    disk = [n for n, d in result.check.block_devices.items() if d == "disk"]
    assert converted == sorted(f"{n}.safetensors" for n in disk)
    with torch.inference_mode():
        torch.testing.assert_close(result.model(TOKENS), reference_model(cfg, torch.bfloat16)(TOKENS), rtol=0, atol=0)


def test_tied_head_is_one_tensor_on_one_device(tmp_path):
    result = Engine(compose_config("model=gpt2tiny", "hardware=sim_2gpu", "placement=balanced"), tmp_path).loaded
    assert result.model.lm_head.weight is result.model.transformer.wte.weight
    assert not result.model.lm_head.weight.is_meta
    devices = result.check.block_devices
    assert devices["lm_head"] == devices["transformer.wte"]


def test_simulated_gpu_budgets_are_enforced_by_the_ledger(tmp_path):
    from runner.errors import SimulatedOutOfMemory

    result = Engine(compose_config("model=gpt2tiny", "hardware=sim_2gpu"), tmp_path).loaded
    free = result.hardware.get("cuda:0").budget - result.ledger.current["cuda:0"]
    with pytest.raises(SimulatedOutOfMemory, match=r"cuda:0 \(simulated\) is out of memory"):
        result.ledger.allocate("cuda:0", free + 1, "a test tensor")


def test_skeleton_allocates_no_parameter_memory():
    cfg = compose_config("model=gpt2xl")
    model = build_skeleton(cfg.model)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 1_557_611_200  # GPT-2 XL, head tied
