"""Scoring: log-likelihoods equal transformers' own on the same checkpoints, loaded through the runner; padding
leaks into no row; pairs are encoded as lm-evaluation-harness encodes them; what has nothing to score is refused."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import compose_config, write_byte_tokenizer
from runner.config import ModelSpec
from runner.errors import ScoreError
from runner.infer.model import causal_lm
from runner.infer.score import ScoreRequest, pair_request, score, text_request
from runner.infer.engine import Engine
from runner.infer.tokenizer import HFTokenizer
from test_generate import GPT2, LLAMA, save_gpt2, save_llama

transformers = pytest.importorskip("transformers")

TEXTS = ["Hi", "The quick brown fox jumps over the lazy dog.", "ok!", "Once upon a time, in a land far away, there "
         "lived a king who had three daughters.", "12345", "é東🙂 and more", "  spaced  out  ", "tab\tand\nnewline",
         "z" * 40, "Why?"]
PAIRS = [("The capital of France is", " Paris"), ("Hello ", "world"), ("1, 2, 3,", " 4, 5"), ("", "Once upon"),
         ("Q: what colour is the sky?\nA:", " blue, mostly.")]
HF_GPT2 = {"_target_": "transformers.GPT2LMHeadModel",
           "config": {"_target_": "transformers.GPT2Config", "n_layer": 2, "n_head": 2, "n_embd": 32,
                      "vocab_size": 300, "n_positions": 128, "bos_token_id": None, "eos_token_id": None}}


class Loaded:
    """A checkpoint written by transformers, loaded through the runner, with transformers' own model beside it."""

    def __init__(self, folder, arch: str):
        self.reference = (save_llama if arch == "llama" else save_gpt2)(folder / "ckpt")
        cfg = compose_config(*(LLAMA if arch == "llama" else GPT2), f"checkpoint.path={folder / 'ckpt'}")
        if arch == "hf-gpt2":  # transformers' own class as the target: TransformersLM
            cfg = replace(cfg, model=ModelSpec("hf-gpt2", HF_GPT2, ()))
        self.result = Engine(cfg, folder / "run").loaded
        self.lm = causal_lm(self.result.model, arch)
        self.tokenizer = HFTokenizer(folder / "ckpt" / "tokenizer.json")

    def expected(self, request: ScoreRequest) -> tuple[list[float], bool]:
        """transformers' log-probabilities of the scored tokens, the request read alone and unpadded, by hand."""
        with torch.inference_mode():
            logits = self.reference(torch.tensor([request.tokens])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        at = torch.arange(request.first_scored - 1, len(request.tokens) - 1)
        targets = torch.tensor(request.tokens[request.first_scored:])
        return logprobs[at, targets].tolist(), bool((logprobs[at].argmax(-1) == targets).all())


@pytest.fixture(scope="module", params=["gpt2", "llama", "hf-gpt2"])
def loaded(request, tmp_path_factory) -> Loaded:
    return Loaded(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Loaded:
    return Loaded(tmp_path_factory.mktemp("llama"), "llama")


def requests_of(tokenizer) -> list[ScoreRequest]:
    texts = [text_request(tokenizer, i, t) for i, t in enumerate(TEXTS)]
    return texts + [pair_request(tokenizer, len(texts) + i, p, c) for i, (p, c) in enumerate(PAIRS[:3])]


def test_scores_equal_transformers_log_likelihoods(loaded):
    requests = requests_of(loaded.tokenizer)
    scores = score(loaded.lm, requests, pad_id=0)  # texts and pairs of 2 to 83 tokens in one right-padded batch
    for r, s in zip(requests, scores):
        expected, greedy = loaded.expected(r)
        assert s.tokens == len(expected) == len(r.tokens) - r.first_scored
        assert s.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert s.logprob == pytest.approx(sum(expected), abs=1e-4)
        assert s.greedy == greedy
        assert s.perplexity == pytest.approx(torch.tensor(expected).neg().mean().exp().item(), rel=1e-4)
    assert len({round(s.logprob, 3) for s in scores}) == len(scores)  # real, distinct values


def test_a_row_scores_the_same_alone_and_in_any_batch(llama):
    """Right padding without a mask: rotary positions start at 0 in every row, and no real token sees padding."""
    requests = requests_of(llama.tokenizer)
    alone = [score(llama.lm, [r], pad_id=0)[0] for r in requests]
    mixed = score(llama.lm, requests[::-1], pad_id=0)[::-1]  # the longest row first, the one-token pair last
    pairs = score(llama.lm, requests[-3:], pad_id=7)        # pairs only: the head computes from the first scored
    for got, want in zip([*mixed, *pairs], [*alone, *alone[-3:]]):
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-5)
        assert got.greedy == want.greedy


def test_no_mask_gives_the_logits_of_a_masked_forward(llama):
    """What ``score`` relies on: a right-padded batch read without a mask (plain causal attention) gives each real
    token the logits it gets with padding masked out, and those it gets read alone."""
    rows = [r.tokens for r in requests_of(llama.tokenizer)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, tokens in enumerate(rows):
        ids[i, :len(tokens)], mask[i, :len(tokens)] = torch.tensor(tokens), 1
    with torch.inference_mode():
        plain, masked = llama.lm(ids), llama.lm(ids, attention_mask=mask)
        for i, tokens in enumerate(rows):
            torch.testing.assert_close(plain[i, :len(tokens)], masked[i, :len(tokens)], rtol=1e-4, atol=1e-5)
            alone = llama.lm(torch.tensor([tokens]))[0]
            torch.testing.assert_close(plain[i, :len(tokens)], alone, rtol=1e-4, atol=1e-5)


def test_greedy_is_whether_every_continuation_token_is_the_argmax(llama):
    prompt = list(b"Once upon a time")
    with torch.inference_mode():
        chosen = []
        for _ in range(4):  # the model's own greedy continuation; top2 ends with the last step's runner-up
            top2 = llama.reference(torch.tensor([prompt + chosen])).logits[0, -1].topk(2).indices.tolist()
            chosen.append(top2[0])
    greedy = ScoreRequest(0, tuple(prompt + chosen), len(prompt))
    off = ScoreRequest(1, tuple(prompt + chosen[:-1] + top2[1:]), len(prompt))  # the last token the runner-up
    got = score(llama.lm, [greedy, off], pad_id=0)
    assert [s.greedy for s in got] == [True, False]
    for r, s in zip((greedy, off), got):
        assert s.logprob == pytest.approx(sum(llama.expected(r)[0]), abs=1e-4)


def test_a_greedy_continuation_given_as_text(llama):
    """pair_request's greedy flag on text: the first of the prompts whose argmax next byte is printable ASCII."""
    found = None
    with torch.inference_mode():
        for prompt in TEXTS:
            best = int(llama.reference(torch.tensor([list(prompt.encode())])).logits[0, -1].argmax())
            if 33 <= best < 127:
                found = prompt, chr(best)
                break
    assert found, "no prompt with a printable greedy byte: pick other prompts"
    prompt, byte = found
    other = "a" if byte != "a" else "b"
    yes, no = score(llama.lm, [pair_request(llama.tokenizer, 0, prompt, byte),
                               pair_request(llama.tokenizer, 1, prompt, byte + other)], pad_id=0)
    assert yes.greedy and yes.tokens == 1
    assert no.tokens == 2 and no.greedy == (llama.expected(pair_request(llama.tokenizer, 1, prompt, byte + other))[1])
    assert no.token_logprobs[0] == pytest.approx(yes.logprob, abs=1e-5)


def save_merging_tokenizer(folder, **special: str) -> HFTokenizer:
    """A BPE with no pre-tokenizer, so merges cross the prompt/continuation boundary: 'ab' and ' c' are tokens;
    ``special`` names its BOS and EOS tokens (<s> and </s>, ids 0 and 1) in tokenizer_config.json."""
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(["<s>", "</s>", " ", *"abcxyz", "ab", " c"])}
    tok = Tokenizer(models.BPE(vocab, [("a", "b"), (" ", "c")]))
    tok.add_special_tokens(["<s>", "</s>"])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(special))
    return HFTokenizer(folder / "tokenizer.json")


@pytest.fixture(scope="module")
def merging_tokenizer(tmp_path_factory) -> HFTokenizer:
    return save_merging_tokenizer(tmp_path_factory.mktemp("merging") / "tok", bos_token="<s>", eos_token="</s>")


def test_pairs_are_encoded_as_lm_evaluation_harness_does(merging_tokenizer, tmp_path):
    tok = merging_tokenizer
    ids = {t: tok.encode(t)[0] for t in ("x", "a", "b", "c", "ab", " c", " ", "y")}
    assert tok.encode("xab c") == [ids["x"], ids["ab"], ids[" c"]]  # the merges work across any boundary
    # The prompt's trailing space moves to the continuation, where ' c' is one token (else 'xa ' + 'c' scores nothing).
    assert pair_request(tok, 0, "xa ", "c") == ScoreRequest(0, (ids["x"], ids["a"], ids[" c"]), 2)
    # The continuation is encode(prompt + continuation) past len(encode(prompt)): 'xabc' is x ab c, so 'c' alone;
    # the model reads the prompt's own tokens (x a), then that.
    assert pair_request(tok, 1, "xa", "bc") == ScoreRequest(1, (ids["x"], ids["a"], ids["c"]), 2)
    # No prompt: BOS stands in for it, as lm-eval's prefix token; whitespace alone is no prompt either.
    assert pair_request(tok, 2, "", "xy") == ScoreRequest(2, (0, ids["x"], ids["y"]), 1)
    assert pair_request(tok, 3, "  ", "c") == ScoreRequest(3, (0, ids[" "], ids[" c"]), 1)
    # Without BOS, EOS does.
    eos_only = save_merging_tokenizer(tmp_path / "eos-only", eos_token="</s>")
    assert pair_request(eos_only, 4, "", "x") == ScoreRequest(4, (1, ids["x"]), 1)


def test_what_has_nothing_to_score_is_one_line_error(merging_tokenizer, tmp_path, llama):
    bytes_only = HFTokenizer(write_byte_tokenizer(tmp_path / "bytes"))
    for text in ("a", ""):
        with pytest.raises(ScoreError, match=r"^text: the text has fewer than two tokens \(\d\): nothing to score"):
            text_request(bytes_only, 0, text)
    with pytest.raises(ScoreError, match=r"^continuation: 'b' adds no token after the prompt's: nothing to score"):
        pair_request(merging_tokenizer, 0, "xa", "b")  # 'xab' is x ab: the continuation is inside the prompt's token
    with pytest.raises(ScoreError, match=r"^prompt: empty, and tokenizer.json at .* has no BOS or EOS token"):
        pair_request(bytes_only, 0, "", "abc")
    with pytest.raises(ScoreError, match=r"^request 3: first_scored 0 must be from 1 to 2 for 3 tokens"):
        ScoreRequest(3, (1, 2, 3), 0)
    with pytest.raises(ScoreError) as info:  # the model's context is 128: 129 tokens fit (the last is never read)
        requests = [ScoreRequest(i, (1,) * n, first) for i, (n, first) in enumerate([(129, 1), (130, 1), (131, 5)])]
        score(llama.lm, requests, pad_id=0)
    assert info.value.lines == (
        "request 1: 130 tokens; the model reads all but the last, and 129 exceed its context of 128; shorten the text",
        "request 2: 131 tokens; the model reads all but the last, and 130 exceed its context of 128; shorten the text")
    assert ScoreError.stage == "score" and score(llama.lm, [], pad_id=0) == []


@pytest.mark.slow
def test_smollm2_scores_equal_transformers_llama(tmp_path):
    """The default model, its GGUF tokenizer, real text: transformers' LlamaForCausalLM built from the runner's tensors
    (``test_generate`` checks the GGUF's own transformers load against the runner's)."""
    from runner.infer.tokenizer import tokenizer_for

    result = Engine(compose_config("hardware=cpu", "dtype=float32"), tmp_path).loaded  # the fp32 reference's weights
    tokenizer = tokenizer_for(result.checkpoint, None, None, synthetic=False)
    arch = {k: v for k, v in result.config.model.arch.items() if k != "_target_"}
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**arch)).eval()
    reference.load_state_dict(result.model.state_dict(), strict=False)
    reference.tie_weights()
    requests = [*(text_request(tokenizer, i, t) for i, t in enumerate(TEXTS[1:5])),
                *(pair_request(tokenizer, 4 + i, p, c) for i, (p, c) in
                  enumerate([*PAIRS, ("The capital of France is", " London")]))]
    scores = score(result.model, requests, pad_id=tokenizer.pad_id)
    with torch.inference_mode():
        for r, s in zip(requests, scores):
            logprobs = torch.log_softmax(reference(torch.tensor([r.tokens])).logits[0].float(), dim=-1)
            at, targets = torch.arange(r.first_scored - 1, len(r.tokens) - 1), torch.tensor(r.tokens[r.first_scored:])
            assert s.token_logprobs == pytest.approx(logprobs[at, targets].tolist(), abs=1e-4)
            assert s.greedy == bool((logprobs[at].argmax(-1) == targets).all())
    by_index = {r.index: s for r, s in zip(requests, scores)}
    assert by_index[4].greedy and by_index[4].tokens == 1   # ' Paris' after 'The capital of France is'
    assert by_index[6].greedy and by_index[6].tokens == 5   # '1, 2, 3,' then ' 4, 5': ' ', '4', ',', ' ', '5'
    assert not by_index[9].greedy                           # ' London' is not what it says
    assert by_index[9].logprob < by_index[4].logprob - 3    # -4.38 against -0.26
    assert requests[7].tokens[0] == 1                       # no prompt: BOS (<|im_start|>) in its place
