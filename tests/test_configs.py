"""Every shipped config option composes with Hydra and validates against schemas/config.schema.json."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CONF_DIR, compose_config
from runner.errors import ConfigError
from runner.config.schema import schema_errors

GROUPS = {group.name: sorted(p.stem for p in group.glob("*.yaml")) for group in Path(CONF_DIR).iterdir()
          if group.is_dir() and group.name != "hydra"}  # conf/hydra holds Hydra's own options (the sweeper)
OPTIONS = [(group, option) for group, options in sorted(GROUPS.items()) for option in options]


def test_every_group_is_shipped():
    assert set(GROUPS) == {"model", "checkpoint", "placement", "hardware", "task", "data", "experiment"}
    assert set(GROUPS["task"]) == {"generate", "score", "embed"}
    assert set(GROUPS["data"]) == {"inline", "text", "jsonl", "openai"}
    assert set(GROUPS["model"]) <= set(GROUPS["checkpoint"])  # every model names the weights it comes with
    assert {"gpt2tiny", "gpt2mini", "gpt2", "gpt2medium", "gpt2large", "gpt2xl"} <= set(GROUPS["model"])
    assert set(GROUPS["placement"]) == {"auto", "balanced", "balanced_low_0", "sequential"}
    assert {"auto", "cpu", "sim_2gpu", "a100_8x80gb", "rtx4090_2x", "h100_4x80gb"} <= set(GROUPS["hardware"])


@pytest.mark.parametrize("group, option", OPTIONS)
def test_option_composes_and_validates(group, option):
    needs = {"local": ["checkpoint.path=/models/gpt2.safetensors"], "gguf": ["checkpoint.path=/models/m.gguf"],
             "llama": ["checkpoint.path=/models/m.gguf"], "hub": ["checkpoint.repo_id=org/name"],
             "text": ["data.path=rows.txt"], "jsonl": ["data.path=rows.jsonl"], "openai": ["data.path=batch.jsonl"]}
    extra = needs.get(option, []) if group in ("checkpoint", "model", "data") else []
    cfg = compose_config(f"{group}={option}", *extra)
    assert schema_errors(cfg.resolved, "config") == []
    if group == "placement":
        assert cfg.placement.strategy == option
    if group == "model":
        assert cfg.model.name == option
        expected = {"auto": (), "seq100b": (), "llama": ("DecoderLayer",), "smollm2_135m": ("DecoderLayer",),
                    "minilm": ("BertLayer",)}
        assert cfg.model.no_split_module_classes == expected.get(option, ("Block",))


def test_gpt2xl_is_the_designs_example():
    arch = compose_config("model=gpt2xl").model.arch
    assert (arch["n_layer"], arch["n_head"], arch["n_embd"], arch["vocab_size"]) == (48, 25, 1600, 50257)


def test_sim_2gpu_declares_two_4gib_gpus():
    hw = compose_config("hardware=sim_2gpu").hardware
    assert hw.simulated and hw.gpus == {"cuda:0": 4 * 2**30, "cuda:1": 4 * 2**30}


def test_command_line_caps_and_pins_are_typed():
    cfg = compose_config("hardware=sim_2gpu", "max_memory.cpu=2GiB", "+max_memory.0=500MB",
                         "+device_map.lm_head=cpu", "+device_map.transformer.h.0=cuda:1")
    assert cfg.placement.max_memory == {"cpu": 2 * 2**30, "cuda:0": 500 * 10**6}
    assert cfg.placement.device_map == {"lm_head": "cpu", "transformer.h.0": "cuda:1"}


def test_every_schema_error_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        compose_config("max_memory.cpu=10GX", "dtype=fp8", "task.max_new_tokens=0", "+bogus=1")
    assert e.value.lines == (
        "bogus: unknown key; expected one of: checkpoint, data, device_map, dtype, force, hardware, manifest, "
        "map_file, max_memory, mode, model, offload, parallel, placement, quantize, resume, runtime, seed, task, "
        "tokenizer, trust",
        "dtype: 'fp8' is not valid; expected one of: auto, float32, float16, bfloat16",
        "max_memory.cpu: '10GX' is not valid; expected a size with a unit, such as 500MB or 10GiB",
        "task.max_new_tokens: 0 is less than the minimum of 1",
    )
