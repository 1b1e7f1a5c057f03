"""Real transformers models as references: the zoo's Llama matches LlamaForCausalLM, and transformers'
own classes work as ``_target_`` (their ties, non-persistent buffers and ``_no_split_modules``)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import compose_config
from runner.config import ModelSpec
from runner.infer.engine import Engine

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


def save_llama(tmp_path, tie: bool, theta: float = 10000.0):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=theta, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / f"llama-tie{tie}"
    reference.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    return reference, folder


@pytest.mark.parametrize("tie", [False, True])
def test_zoo_llama_reads_config_json_and_matches_transformers(tmp_path, tie):
    reference, folder = save_llama(tmp_path, tie)
    result = Engine(compose_config("model=llama", "checkpoint=local", f"checkpoint.path={folder}", "hardware=cpu"),
                     tmp_path / "run").loaded
    arch = result.config.model.arch
    assert (arch["hidden_size"], arch["num_key_value_heads"], arch["tie_word_embeddings"]) == (64, 2, tie)
    assert (result.model.lm_head.weight is result.model.model.embed_tokens.weight) == tie
    assert not result.model.model.rotary_emb.inv_freq.is_meta  # a non-persistent buffer, rebuilt
    with torch.inference_mode():
        torch.testing.assert_close(result.model(TOKENS), reference(TOKENS).logits, rtol=1e-4, atol=1e-5)


def test_rope_theta_is_read_wherever_config_json_keeps_it(tmp_path):
    """transformers 5 writes rope_theta under rope_parameters; older versions at the top. Either way it is read."""
    reference, folder = save_llama(tmp_path, tie=False, theta=500000.0)
    result = Engine(compose_config("model=llama", "checkpoint=local", f"checkpoint.path={folder}", "hardware=cpu"),
                     tmp_path / "run").loaded
    assert result.model.shape.ropes[0].theta == 500000.0
    with torch.inference_mode():
        torch.testing.assert_close(result.model(TOKENS), reference(TOKENS).logits, rtol=1e-4, atol=1e-5)


def test_zoo_llama_split_over_simulated_gpus_matches(tmp_path):
    reference, folder = save_llama(tmp_path, tie=False)
    result = Engine(compose_config("model=llama", "checkpoint=local", f"checkpoint.path={folder}",
                                    "hardware=sim_2gpu", "placement=balanced", "+device_map.model.layers.1=disk"),
                     tmp_path / "run").loaded
    assert set(result.check.block_devices.values()) == {"cuda:0", "cuda:1", "disk"}
    with torch.inference_mode():
        torch.testing.assert_close(result.model(TOKENS), reference(TOKENS).logits, rtol=1e-4, atol=1e-5)


def test_a_transformers_class_as_target(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path / "gpt2-hf"
    reference.save_pretrained(folder, safe_serialization=True)
    cfg = compose_config("checkpoint=local", f"checkpoint.path={folder}", "hardware=sim_2gpu", "placement=balanced",
                         "task.max_new_tokens=3")
    arch = {"_target_": "transformers.GPT2LMHeadModel",
            "config": {"_target_": "transformers.GPT2Config", "n_layer": 2, "n_head": 2, "n_embd": 32,
                       "vocab_size": 300, "n_positions": 64}}
    cfg = replace(cfg, model=ModelSpec("hf-gpt2", arch, ()))
    result = Engine(cfg, tmp_path / "run").loaded
    assert result.config.model.no_split_module_classes == tuple(reference._no_split_modules)  # from the class
    assert {b.class_name for b in result.layout.blocks} >= {"GPT2Block"}
    assert result.model.lm_head.weight is result.model.transformer.wte.weight  # its own tie, kept
    assert set(result.check.block_devices.values()) == {"cuda:0", "cuda:1"}
    # Its forward keeps keys and values (config.use_cache): at least 2 x 64 tokens (its n_positions caps the planned
    # 256) x 32 wide, fp32, per block.
    assert result.config.runtime.seq_len == 64
    on_1 = [b.name for b in result.layout.blocks
            if b.class_name == "GPT2Block" and result.check.block_devices[b.name] == "cuda:1"]
    assert all(result.request.kv_bytes[name] >= 2 * 64 * 32 * 4 for name in on_1)
    assert on_1 and result.plan.reserves["cuda:1"]["kv_cache"] == sum(result.request.kv_bytes[n] for n in on_1)
    with torch.inference_mode():
        torch.testing.assert_close(result.model(TOKENS).logits, reference(TOKENS).logits, rtol=1e-4, atol=1e-5)
