"""Batched generation: prompts sorted by length into batches, left-padded, decoded step by step over a KV cache.

Each batch is prefilled in one forward (after the prefix all its prompts share, such as a chat template's
system turn, prefilled once and copied to every row), then every step feeds one token per row. A row that stops
(end of sequence, a stop token or string, or ``max_new_tokens``) leaves the batch: its cache rows are
dropped, so it costs nothing more. Results come back in input order.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from runner.infer.model import CausalLM
from runner.infer.sampling import SamplingParams, choose, request_generator
from runner.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
# A shared prefix shorter than this is recomputed per row: one more forward would cost more than it saves.
SHARED_PREFIX_MIN = 16


@dataclass(frozen=True)
class Request:
    index: int                     # position in the caller's list
    prompt: str                    # as the caller wrote it (before any chat template)
    tokens: tuple[int, ...]        # what the model reads


@dataclass(frozen=True)
class Completion:
    """One prompt's result."""

    index: int
    prompt: str
    text: str                      # the new text, stop string and end-of-sequence token excluded
    prompt_tokens: list[int]
    output_tokens: list[int]       # every token generated, a final stop token included
    finish_reason: FinishReason    # "stop": end of sequence, a stop token or string; "length": max_new_tokens


@dataclass
class GenerationStats:
    requests: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    prefix_tokens_reused: int = 0  # prompt tokens not recomputed: a prefix the whole batch shares, prefilled once
    output_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0                 # decode forwards
    decode_rows: int = 0           # rows those forwards computed: finished rows leave the batch


@dataclass
class _Row:
    """A request being decoded: its random stream, tokens so far, and whether and why it stopped."""

    request: Request
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    reason: FinishReason | None = None

    def add(self, token: int, params: SamplingParams, stop_ids: frozenset[int], tokenizer: Tokenizer) -> None:
        self.tokens.append(token)
        if token in stop_ids:
            self.reason = "stop"
            self.text = tokenizer.decode(self.tokens[:-1])
            return
        if params.stop:
            # Decode the whole completion: a stop string may span two tokens, or appear inside a merged one.
            text = tokenizer.decode(self.tokens)
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.reason, self.text = "stop", text[:cut]
                return
        if len(self.tokens) >= params.max_new_tokens:
            self.reason = "length"

    def completion(self, tokenizer: Tokenizer) -> Completion:
        text = self.text if self.text is not None else tokenizer.decode(self.tokens)
        r = self.request
        return Completion(r.index, r.prompt, text, list(r.tokens), self.tokens, self.reason or "length")


@torch.inference_mode()
def generate(lm: CausalLM, tokenizer: Tokenizer, requests: list[Request], params: SamplingParams, *,
             batch_size: int, seed: int, stats: GenerationStats | None = None) -> list[Completion]:
    """Every request's completion, in input order. Batches hold ``batch_size`` requests of similar length."""
    stats = stats if stats is not None else GenerationStats()
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else tokenizer.eos_ids)
    seed = params.seed if params.seed is not None else seed
    by_length = sorted(requests, key=lambda r: (len(r.tokens), r.index))
    done: dict[int, Completion] = {}
    for first in range(0, len(by_length), batch_size):
        rows = [_Row(r, request_generator(seed, r.index)) for r in by_length[first:first + batch_size]]
        _decode_batch(lm, tokenizer, rows, params, stop_ids, stats)
        for row in rows:
            done[row.request.index] = row.completion(tokenizer)
        log.info("batch of %d: %d new tokens", len(rows), sum(len(r.tokens) for r in rows))
    stats.requests += len(requests)
    return [done[r.index] for r in requests]


def _decode_batch(lm: CausalLM, tokenizer: Tokenizer, rows: list[_Row], params: SamplingParams,
                  stop_ids: frozenset[int], stats: GenerationStats) -> None:
    start = time.perf_counter()
    prompts = [r.request.tokens for r in rows]
    cache = lm.new_cache(max(len(p) for p in prompts) + params.max_new_tokens)
    shared = shared_prefix(prompts)
    if shared:  # computed once for the batch (a chat template's system turn), then copied to every row
        lm(torch.tensor([prompts[0][:shared]]), cache=cache)
        cache.repeat_rows(len(rows))
        stats.prefix_tokens_reused += shared * (len(rows) - 1)
    ids, mask = left_pad([p[shared:] for p in prompts], tokenizer.pad_id or 0)
    mask = torch.cat([mask.new_ones(len(rows), shared), mask], dim=1)  # the prefix, then each row's own tokens
    logits = lm(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
    stats.batches += 1
    stats.prompt_tokens += sum(len(r.request.tokens) for r in rows)
    stats.prefill_s += time.perf_counter() - start
    start = time.perf_counter()
    active = rows
    while True:
        chosen = choose(logits[:, -1].float().cpu(), params, [r.generator for r in active])
        for row, token in zip(active, chosen):
            row.add(token, params, stop_ids, tokenizer)
        going = [i for i, r in enumerate(active) if r.reason is None]
        if not going:
            break
        if len(going) < len(active):  # finished rows leave the batch, and their cache rows with them
            keep = torch.tensor(going)
            cache.keep(keep)
            mask = mask[keep]
            active, chosen = [active[i] for i in going], [chosen[i] for i in going]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        logits = lm(torch.tensor(chosen)[:, None], attention_mask=mask, cache=cache, logits_to_keep=1)
        stats.steps += 1
        stats.decode_rows += len(active)
    stats.output_tokens += sum(len(r.tokens) for r in rows)
    stats.decode_s += time.perf_counter() - start


def shared_prefix(prompts: list[tuple[int, ...]], least: int = SHARED_PREFIX_MIN) -> int:
    """How many leading tokens every prompt of the batch shares, when at least ``least`` and the batch has two
    prompts or more; else 0. Each row keeps one token of its own, whose logits start its completion."""
    if len(prompts) < 2:
        return 0
    first, shortest = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < shortest and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= least else 0


def left_pad(sequences: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, longest]`` ids right-aligned on ``pad_id``, and the mask of real tokens (1) against padding (0)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, longest - len(s):] = torch.tensor(s)
            mask[i, longest - len(s):] = 1
    return ids, mask
