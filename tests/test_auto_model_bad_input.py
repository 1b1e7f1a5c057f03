"""``model=auto`` given a checkpoint whose config.json is wrong, hostile or foreign: one line each, naming the file
and the key, before anything is built; a config that disagrees with its weights gets the whole key report."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_in_process
from test_families import FAMILIES, write_checkpoint

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    write_checkpoint(folder, "qwen3", FAMILIES["qwen3"])
    return folder


def with_config(qwen3, tmp_path, **changes):
    """A copy of the tiny Qwen3 checkpoint whose config.json has ``changes`` (None: the key removed)."""
    folder = tmp_path / "changed"
    shutil.copytree(qwen3, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def errors_of(tmp_path, folder, *overrides):
    outcome, errors = run_in_process(tmp_path / "run", "checkpoint=local", f"checkpoint.path={folder}",
                                     "hardware=cpu", "mode=plan", "runtime.seq_len=32", *overrides)
    assert outcome is not None and outcome.error is not None
    return errors


CASES = {
    "unknown architecture": (dict(model_type="made_up", architectures=["MadeUpForCausalLM"]),
                             ["architectures ['MadeUpForCausalLM'] (model_type 'made_up') is neither a zoo family",
                              "llama, mistral, qwen2, qwen3"]),
    "remote code": (dict(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}),
                    ["auto_map points at code shipped with the checkpoint (modeling_evil.EvilForCausalLM)",
                     "runs no code from a checkpoint"]),
    "heads that do not divide": (dict(head_dim=None, hidden_size=66),
                                 ["hidden_size 66 does not divide into num_attention_heads 4"]),
    "kv heads that do not divide": (dict(num_key_value_heads=3), ["num_attention_heads 4 is not a multiple of "
                                                                  "num_key_value_heads 3"]),
    "absurd layers": (dict(num_hidden_layers=10**12), ["num_hidden_layers is 1000000000000; expected a whole number "
                                                       "from 1 to 2048"]),
    "negative size": (dict(intermediate_size=-96), ["intermediate_size is -96; expected a whole number"]),
    "size as text": (dict(vocab_size="256"), ["vocab_size is 256; expected a whole number"]),
    "layers times experts": (dict(num_hidden_layers=2048, num_experts=4096), ["2048 layers of 4096 experts"]),
    "a nested target": (dict(rope_parameters={"_target_": "transformers.pipeline", "task": "text-generation"}),
                        ["rope_parameters holds a _target_", "remove the key"]),
    "quantized": (dict(quantization_config={"quant_method": "gptq", "bits": 4}),
                  ["the weights are quantized (gptq)", "unquantized release or its GGUF"]),
    "a bad sliding window": (dict(layer_types=["sliding_attention"] * 3, sliding_window="wide"),
                             ["sliding_window 'wide': expected a positive whole number"]),
    "a bad norm epsilon": (dict(rms_norm_eps="tiny"), ["(model_type 'qwen3')", "could not convert string"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_config_json_is_one_line_naming_the_file(qwen3, tmp_path, case):
    changes, expected = CASES[case]
    folder = with_config(qwen3, tmp_path, **changes)
    errors = errors_of(tmp_path, folder)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: build: {folder / 'config.json'}: "), errors[0]
    for part in expected:
        assert part in errors[0], errors[0]


def test_a_model_type_naming_another_family_gets_the_key_report(qwen3, tmp_path):
    """Qwen3's weights under a config that says Llama: the q/k norms are the difference, every one named."""
    folder = with_config(qwen3, tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    errors = errors_of(tmp_path, folder)
    assert errors[0] == (f"error: checkpoint: {folder / 'config.json'} does not describe these weights (it reads as "
                         "runner.zoo.families.Llama); the config and the weights disagree:")
    assert sorted(e.split(" in ")[0] for e in errors[1:]) == sorted(
        f"error: checkpoint: unexpected tensor model.layers.{i}.self_attn.{n}_norm.weight"
        for i in range(3) for n in "qk")


def test_a_config_whose_sizes_disagree_with_the_weights_gets_every_mismatch(qwen3, tmp_path):
    folder = with_config(qwen3, tmp_path, intermediate_size=80)
    errors = errors_of(tmp_path, folder)
    mismatched = [e for e in errors if "shape mismatch" in e]
    assert len(mismatched) == 9  # gate, up and down of each of the 3 layers, all at once
    assert "the checkpoint has [96, 64], the model expects [80, 64]" in mismatched[0] or \
        "the checkpoint has [64, 96], the model expects [64, 80]" in mismatched[0]


def test_no_config_json_is_one_line(qwen3, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(qwen3, folder)
    (folder / "config.json").unlink()
    errors = errors_of(tmp_path, folder)
    assert len(errors) == 1 and "model=auto: the checkpoint has no config.json beside its weights" in errors[0]


def test_auto_with_synthetic_weights_is_one_line(tmp_path):
    outcome, errors = run_in_process(tmp_path / "run", "checkpoint=synthetic", "mode=plan", "runtime.seq_len=32")
    assert errors == ["error: config: model=auto: synthetic weights carry no config to read the architecture from; "
                      "pick a model config (model=gpt2tiny, model=seq100b, ...) or a real checkpoint"]


def test_a_tokenizer_past_the_vocabulary_config_json_gives_is_one_line(qwen3, tmp_path):
    """The vocabulary comes from config.json under model=auto too, before any weight is read."""
    from tokenizers import Tokenizer, models

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    words.save(str(tmp_path / "tokenizer.json"))
    outcome, errors = run_in_process(tmp_path / "run", "checkpoint=local", f"checkpoint.path={qwen3}",
                                     "hardware=cpu", f"tokenizer.path={tmp_path / 'tokenizer.json'}",
                                     "task.max_new_tokens=2")
    assert len(errors) == 1 and "vocab_size of 256" in errors[0], errors
