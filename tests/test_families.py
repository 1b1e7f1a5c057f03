"""Every zoo family against transformers, on tiny random checkpoints transformers writes here (``save_pretrained``),
run with no ``model=``: the architecture comes from the checkpoint's config.json (``model=auto``).

Each family's logits match transformers' within 1e-4 in fp32 on a left-padded batch; its greedy completions match
transformers' ``generate`` token for token over 16 new tokens, from prompts longer than the family's sliding
window where it has one. Two architectures the zoo lacks run through transformers' own class.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_in_process
from runner.infer.engine import Engine

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402 -- after the skip

WINDOW = 8  # every windowed family gets this sliding window, shorter than every prompt below
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.2,
             pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=48)

# model_type -> (its settings beyond SMALL, whether it has a sliding window)
FAMILIES = {
    "llama": dict(attention_bias=True),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
    "qwen3": dict(tie_word_embeddings=True),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
                   query_pre_attn_scalar=12, tie_word_embeddings=True),
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=16, tie_word_embeddings=True,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "phi3": dict(sliding_window=WINDOW, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                         "partial_rotary_factor": 0.5}),
    "mixtral": dict(num_local_experts=4, sliding_window=WINDOW, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], **EXPERTS),
    "qwen2_moe": dict(num_experts=4, shared_expert_intermediate_size=80, **EXPERTS),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
PROMPTS = ["The quick brown fox jumps over", "Zebras graze while the long evening falls softly", "Hi there, friend"]


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer of exactly 256 tokens, one per byte: every id a tiny model emits decodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def write_checkpoint(folder: Path, model_type: str, settings: dict, seed: int = 0):
    """A random transformers model of ``model_type``, saved with a tokenizer as users' checkpoints are."""
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **settings})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return model


def left_padded(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [byte_tokenizer().encode(p).ids for p in prompts]
    width = max(map(len, ids))
    rows = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    return rows, mask


def transformers_greedy(model, prompts: list[str], new_tokens: int) -> list[str]:
    tok = byte_tokenizer()
    out = []
    for prompt in prompts:  # one at a time: the reference with no padding at all
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.inference_mode():
            generated = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0)
        out.append(tok.decode(generated[0, ids.shape[1]:].tolist()))
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    model_type = request.param
    folder = tmp_path_factory.mktemp(model_type)
    return model_type, folder, write_checkpoint(folder, model_type, FAMILIES[model_type])


def test_logits_match_transformers_on_a_left_padded_batch(family, tmp_path):
    model_type, folder, reference = family
    engine = Engine(compose_config("checkpoint=local", f"checkpoint.path={folder}", "hardware=cpu", "dtype=float32"),
                    tmp_path / "run")
    assert engine.config.model.path == "zoo" and engine.config.model.name == folder.name
    assert type(engine.loaded.model).model_types[0] == model_type
    rows, mask = left_padded(PROMPTS)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ours = engine.loaded.model(rows, attention_mask=mask)
        theirs = reference(input_ids=rows, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()  # padding positions' outputs are never used
    assert rows.shape[1] > WINDOW
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-4)


def test_greedy_completions_match_transformers_generate(family, tmp_path):
    model_type, folder, reference = family
    outcome, errors = run_in_process(tmp_path / "run", "checkpoint=local", f"checkpoint.path={folder}",
                                     "hardware=cpu", "task.max_new_tokens=16", "runtime.batch_size=3",
                                     "data=inline", f"data.prompts={json.dumps(PROMPTS)}")
    assert errors == [] and outcome is not None
    lines = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (report["model"]["path"], report["model"]["name"]) == ("zoo", folder.name)
    assert report["model"]["config"] == str(folder / "config.json")
    ours = [line["completion"]["text"] for line in lines]
    assert [line["completion"]["completion_tokens"] for line in lines] == [16] * len(PROMPTS)
    assert ours == transformers_greedy(reference, PROMPTS, 16)


NOT_IN_ZOO = {
    "opt": dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=None,
                eos_token_id=None),
    "gpt_neox": dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                     eos_token_id=None),
}


@pytest.mark.parametrize("model_type", sorted(NOT_IN_ZOO))
def test_architectures_the_zoo_lacks_run_as_transformers_classes(model_type, tmp_path):
    folder = tmp_path / model_type
    config = transformers.AutoConfig.for_model(model_type, **NOT_IN_ZOO[model_type])
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    reference.save_pretrained(folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    outcome, errors = run_in_process(tmp_path / "run", "checkpoint=local", f"checkpoint.path={folder}",
                                     "hardware=cpu", "task.max_new_tokens=16", "runtime.batch_size=3",
                                     "data=inline", f"data.prompts={json.dumps(PROMPTS)}")
    assert errors == []
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["model"]["path"] == "transformers"
    assert report["model"]["target"] == f"transformers.{type(reference).__name__}"
    lines = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [line["completion"]["text"] for line in lines] == transformers_greedy(reference, PROMPTS, 16)


def test_fast_path_off_runs_a_zoo_family_as_transformers_class(tmp_path):
    folder = tmp_path / "qwen3"
    reference = write_checkpoint(folder, "qwen3", FAMILIES["qwen3"])
    engine = Engine(compose_config("checkpoint=local", f"checkpoint.path={folder}", "hardware=cpu",
                                   "model.fast_path=false"), tmp_path / "run")
    assert engine.config.model.path == "transformers"
    assert type(engine.loaded.model).__name__ == "Qwen3ForCausalLM"
    rows, mask = left_padded(PROMPTS[:1])
    with torch.inference_mode():
        torch.testing.assert_close(engine.loaded.model(rows).logits, reference(rows).logits, rtol=0, atol=1e-5)


def test_a_mixture_of_experts_offloaded_to_cpu_and_disk_matches_all_resident(tmp_path):
    folder = tmp_path / "qwen3_moe"
    write_checkpoint(folder, "qwen3_moe", FAMILIES["qwen3_moe"])
    rows, mask = left_padded(PROMPTS)
    logits = {}
    for name, overrides in {"resident": ("hardware=cpu",),
                            "offloaded": ("hardware=sim_2gpu", "+device_map.model.layers.0=cpu",
                                          "+device_map.model.layers.2=disk")}.items():
        engine = Engine(compose_config("checkpoint=local", f"checkpoint.path={folder}", *overrides),
                        tmp_path / name)
        if name == "offloaded":
            assert {engine.loaded.check.block_devices[f"model.layers.{i}"] for i in (0, 2)} == {"cpu", "disk"}
        with torch.inference_mode():
            logits[name] = engine.loaded.model(rows, attention_mask=mask)
    torch.testing.assert_close(logits["offloaded"], logits["resident"], rtol=0, atol=1e-5)


def test_a_hub_repo_runs_its_own_architecture_with_no_model_named(tmp_path, monkeypatch):
    """``checkpoint=hub checkpoint.repo_id=...`` alone: huggingface_hub reads an offline cache in the Hub layout,
    and the repo's config.json picks the zoo's Qwen2."""
    from test_checkpoint_sources import hub_cache

    folder = tmp_path / "saved"
    reference = write_checkpoint(folder, "qwen2", FAMILIES["qwen2"])
    cache = tmp_path / "hf-cache"
    hub_cache(cache, "tiny-org/qwen2-tiny", {f.name: f.read_bytes() for f in folder.iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    outcome, errors = run_in_process(tmp_path / "run", "checkpoint=hub", "checkpoint.repo_id=tiny-org/qwen2-tiny",
                                     "hardware=cpu", "task.max_new_tokens=16", f"data.prompts={json.dumps(PROMPTS)}")
    assert errors == []
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (report["model"]["name"], report["model"]["target"]) == ("tiny-org/qwen2-tiny", "runner.zoo.families.Qwen2")
    lines = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [line["completion"]["text"] for line in lines] == transformers_greedy(reference, PROMPTS, 16)
