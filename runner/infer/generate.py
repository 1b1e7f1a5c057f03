"""Batched generation: prompts sorted by length into batches, left-padded, decoded step by step over a KV cache.

Each batch is prefilled in one forward (after the prefix all its prompts share, such as a chat template's
system turn, prefilled once and copied to every row), then every step feeds one token per row. With
micro-batches, K batches decode together as a column: each step runs all of them through each block
while it is in (``runner.infer.column``). A row that stops
(end of sequence, a stop token or string, or ``max_new_tokens``) leaves the batch: its cache rows are
dropped, so it costs nothing more. Results come back in input order.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from runner.infer.column import Call, Streams, column
from runner.infer.finite import check_rows
from runner.infer.model import Cache, CausalLM
from runner.infer.sampling import SamplingParams, choose, request_generator
from runner.infer.tokenizer import Tokenizer

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
             batch_size: int, seed: int, stats: GenerationStats | None = None, micro_batches: int = 1,
             streams: Streams | None = None, stagger: int = 0) -> list[Completion]:
    """Every request's completion, in input order. Batches hold ``batch_size`` requests of similar length; with
    ``micro_batches`` K > 1, K batches decode together as a column, each streamed block brought in (by ``streams``)
    once per step for all of them, or, with ``stagger`` > 0, as a pipeline over the GPUs (``runner.infer.column``)."""
    stats = stats if stats is not None else GenerationStats()
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else tokenizer.eos_ids)
    seed = params.seed if params.seed is not None else seed
    by_length = sorted(requests, key=lambda r: (len(r.tokens), r.index))
    done: dict[int, Completion] = {}
    per_column = batch_size * micro_batches
    for first in range(0, len(by_length), per_column):
        rows = [_Row(r, request_generator(seed, r.index)) for r in by_length[first:first + per_column]]
        micro = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        _decode_column(lm, tokenizer, micro, params, stop_ids, stats, _Schedule(streams, stagger))
        for row in rows:
            done[row.request.index] = row.completion(tokenizer)
        log.info("%d batch(es) of up to %d: %d new tokens", len(micro), batch_size, sum(len(r.tokens) for r in rows))
    stats.requests += len(requests)
    return [done[r.index] for r in requests]


@dataclass(frozen=True)
class _Schedule:
    """How a column's micro-batches share the model: the streams whose loads they share, and their stagger."""

    streams: Streams | None
    stagger: int

    def run(self, lm: CausalLM, calls: list[Call]) -> list[torch.Tensor]:
        return column(lm, calls, self.streams, self.stagger)


@dataclass
class _MicroBatch:
    """One batch of a column: the rows still decoding, their cache, and their attention mask so far."""

    rows: list[_Row]
    cache: Cache
    mask: torch.Tensor | None = None


def _decode_column(lm: CausalLM, tokenizer: Tokenizer, micro: list[list[_Row]], params: SamplingParams,
                   stop_ids: frozenset[int], stats: GenerationStats, schedule: _Schedule) -> None:
    start = time.perf_counter()
    prompts = [[r.request.tokens for r in rows] for rows in micro]
    capacity = max(len(p) for ps in prompts for p in ps) + params.max_new_tokens
    batches = [_MicroBatch(rows, lm.new_cache(capacity)) for rows in micro]
    shared = shared_prefix([p for ps in prompts for p in ps])
    if shared:  # computed once per batch (a chat template's system turn), then copied to every row
        prefix = torch.tensor([prompts[0][0][:shared]])
        schedule.run(lm, [Call(prefix, cache=b.cache, logits_to_keep=1) for b in batches])
        for b in batches:
            b.cache.repeat_rows(len(b.rows))
        stats.prefix_tokens_reused += shared * (sum(len(b.rows) for b in batches) - len(batches))
    calls = []
    for b, ps in zip(batches, prompts):
        ids, mask = left_pad([p[shared:] for p in ps], tokenizer.pad_id or 0)
        b.mask = torch.cat([mask.new_ones(len(ps), shared), mask], dim=1)  # the prefix, then each row's own tokens
        calls.append(Call(ids, b.mask, b.cache, logits_to_keep=1))
    outputs = schedule.run(lm, calls)
    stats.batches += len(batches)
    stats.prompt_tokens += sum(len(p) for ps in prompts for p in ps)
    stats.prefill_s += time.perf_counter() - start
    start = time.perf_counter()
    while True:
        calls = []
        for b, logits in zip(batches, outputs):
            check_rows(logits[:, -1], lambda row, b=b: _rerun(lm, b.rows[row]), "the next-token logits")
            chosen = _next_tokens(b, logits, params, stop_ids, tokenizer)
            if b.rows:
                assert b.mask is not None
                b.mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
                calls.append(Call(torch.tensor(chosen)[:, None], b.mask, b.cache, logits_to_keep=1))
        batches = [b for b in batches if b.rows]
        if not batches:
            break
        outputs = schedule.run(lm, calls)
        stats.steps += 1
        stats.decode_rows += sum(len(b.rows) for b in batches)
    stats.output_tokens += sum(len(r.tokens) for rows in micro for r in rows)
    stats.decode_s += time.perf_counter() - start


def _rerun(lm: CausalLM, row: _Row) -> Callable[[], torch.Tensor]:
    """One row's forward again, alone and without a cache: its prompt and what it generated so far."""
    return lambda: lm(torch.tensor([row.request.tokens + tuple(row.tokens)]))


def _next_tokens(batch: _MicroBatch, logits: torch.Tensor, params: SamplingParams, stop_ids: frozenset[int],
                 tokenizer: Tokenizer) -> list[int]:
    """Each row's next token; rows that stop leave the batch, and their cache rows with them. The tokens of the
    rows still going, in their order."""
    chosen = choose(logits[:, -1].float().cpu(), params, [r.generator for r in batch.rows])
    for row, token in zip(batch.rows, chosen):
        row.add(token, params, stop_ids, tokenizer)
    going = [i for i, r in enumerate(batch.rows) if r.reason is None]
    if going and len(going) < len(batch.rows):
        keep = torch.tensor(going)
        batch.cache.keep(keep)
        assert batch.mask is not None
        batch.mask = batch.mask[keep]
    batch.rows = [batch.rows[i] for i in going]
    return [chosen[i] for i in going]


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
