"""Log-likelihood scoring: how likely a causal LM finds a text, or a continuation after a prompt.

A ``ScoreRequest`` is token ids and the position of the first one scored; ``text_request`` and ``pair_request``
make one from text, the second with lm-evaluation-harness' ``loglikelihood`` encoding. ``score`` reads a batch in
one forward, right-padded: a causal model never attends to later positions, so a row's padding changes none of
its logits and every row's positions start at 0, and no attention mask is needed (the plain causal attention
path, the fastest). The scored positions' logits are normalized (``log_softmax`` in float32) one row at a time:
beside the model's own ``[B, T, vocab]`` logits, only one row's float32 log-probabilities are ever held, and
positions of padding or of unscored context are never normalized.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runner.errors import ScoreError
from runner.infer.finite import check_rows
from runner.infer.model import CausalLM
from runner.infer.tokenizer import Tokenizer


@dataclass(frozen=True)
class ScoreRequest:
    index: int                 # the row's position in the input (the caller orders by it)
    tokens: tuple[int, ...]    # what the model reads: context then scored tokens
    first_scored: int          # tokens[first_scored:] are scored; >= 1 (position 0 has nothing to predict it)

    def __post_init__(self):
        if not 1 <= self.first_scored < len(self.tokens):
            raise ScoreError(f"request {self.index}: first_scored {self.first_scored} must be from 1 to "
                             f"{len(self.tokens) - 1} for {len(self.tokens)} tokens: at least one token is scored, "
                             "and at least one comes before it")


@dataclass(frozen=True)
class Score:
    logprob: float                     # sum of log p(token | all before it) over the scored tokens
    tokens: int                        # how many tokens were scored
    greedy: bool                       # every scored token is the argmax of its position's prediction
    token_logprobs: tuple[float, ...]  # one per scored token

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.tokens)


def text_request(tokenizer: Tokenizer, index: int, text: str) -> ScoreRequest:
    """The whole text, as ``encode(text, add_special_tokens=True)`` gives it; every token after the first is scored
    (so a tokenizer that adds BOS has every token of the text scored).

    Raises:
        ScoreError: the text has fewer than two tokens.
    """
    tokens = tokenizer.encode(text, add_special_tokens=True)
    if len(tokens) < 2:
        raise ScoreError(f"text: the text has fewer than two tokens ({len(tokens)}): nothing to score (the first "
                         "token has nothing before it to predict it); give a longer text")
    return ScoreRequest(index, tuple(tokens), 1)


def pair_request(tokenizer: Tokenizer, index: int, prompt: str, continuation: str) -> ScoreRequest:
    """log p(continuation | prompt), encoded as lm-evaluation-harness' ``loglikelihood`` does (``HFLM``, whose
    default adds no special tokens): the prompt's trailing whitespace moves to the continuation; the continuation's
    tokens are those of ``encode(prompt + continuation)`` past as many as ``encode(prompt)`` has (a token merging
    across the boundary counts as the prompt's, and is not scored); the model reads the prompt's own tokens, then
    those. An empty prompt (or one of whitespace only) reads the tokenizer's BOS token, else its EOS token, in its
    place, as lm-eval reads its prefix token.

    Raises:
        ScoreError: the continuation adds no token, or the prompt is empty and the tokenizer has neither BOS nor EOS.
    """
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, continuation = prompt[:-spaces], prompt[-spaces:] + continuation
    context = tokenizer.encode(prompt) if prompt else []
    if context:
        scored = tokenizer.encode(prompt + continuation)[len(context):]
    else:
        start = _prefix_id(tokenizer)
        if start is None:
            raise ScoreError(f"prompt: empty, and {tokenizer.name} has no BOS or EOS token to read in its place; "
                             "give a prompt, or score the continuation as a text")
        context, scored = [start], tokenizer.encode(continuation)
    if not scored:
        raise ScoreError(f"continuation: {continuation!r} adds no token after the prompt's: nothing to score")
    return ScoreRequest(index, (*context, *scored), len(context))


@torch.inference_mode()
def score(lm: CausalLM, requests: Sequence[ScoreRequest], *, pad_id: int) -> list[Score]:
    """Every request's score, in the requests' order, from one forward over them all (the caller batches).

    Args:
        lm: the model; it reads each request's tokens but the last (whose prediction nothing scores).
        requests: what to score.
        pad_id: the id right-padding the shorter rows; any id in the vocabulary will do, as no real token sees it.

    Raises:
        ScoreError: a request is longer than the model's context (plus the last token, which it never reads).
    """
    if not requests:
        return []
    too_long = [r for r in requests if len(r.tokens) - 1 > lm.block_size]
    if too_long:
        raise ScoreError(*(f"request {r.index}: {len(r.tokens)} tokens; the model reads all but the last, and "
                           f"{len(r.tokens) - 1} exceed its context of {lm.block_size}; shorten the text"
                           for r in too_long))
    width = max(len(r.tokens) for r in requests) - 1
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    for row, r in enumerate(requests):
        ids[row, :len(r.tokens) - 1] = torch.tensor(r.tokens[:-1])
    # Logits before the first position any row scores are never used: the head computes only from there on.
    start = min(r.first_scored for r in requests) - 1
    logits = lm(ids, logits_to_keep=width - start if start else 0)  # position p is logits[:, p - start]

    per_token, greedy = [], []
    for row, r in enumerate(requests):
        # Position p predicts token p + 1: positions first_scored - 1 .. len - 2 predict the scored tokens.
        # log_softmax's fused kernel, cast on the way in: faster on the CPU than logsumexp, which allocates x - max.
        predicted = torch.log_softmax(logits[row, r.first_scored - 1 - start:len(r.tokens) - 1 - start], dim=-1,
                                      dtype=torch.float32)
        targets = torch.tensor(r.tokens[r.first_scored:], device=predicted.device)
        per_token.append(predicted.gather(-1, targets[:, None])[:, 0])
        greedy.append((predicted.argmax(dim=-1) == targets).all())
        del predicted  # one row's float32 log-probabilities at a time
    # NaN or Inf in a row's logits makes its log-probabilities NaN or -inf; checked here, on the scored positions
    # alone, rather than over the whole [B, T, vocab] logits (0.56 s of each 16-text batch at one thread), which would
    # also refuse a legitimate -inf logit
    check_rows(torch.stack([t.sum() for t in per_token]), lambda row: (lambda: lm(ids[row:row + 1])),
               "the log-probabilities")
    flat = torch.cat(per_token).tolist()  # one transfer from the device for the whole batch
    greedy = torch.stack(greedy).tolist()
    out, at = [], 0
    for r, g in zip(requests, greedy):
        n = len(r.tokens) - r.first_scored
        values = tuple(flat[at:at + n])
        out.append(Score(logprob=math.fsum(values), tokens=n, greedy=g, token_logprobs=values))
        at += n
    return out


def _prefix_id(tokenizer: Tokenizer) -> int | None:
    """The id lm-evaluation-harness reads before a continuation with no prompt: BOS, else EOS; None without either."""
    for token in (tokenizer.bos_token, tokenizer.eos_token):
        ids = tokenizer.encode(token) if token else []
        if len(ids) == 1:
            return ids[0]
    return next(iter(tokenizer.eos_ids)) if len(tokenizer.eos_ids) == 1 else None
