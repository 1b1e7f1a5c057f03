"""Batched generation with continuous batching: rows in flight stay full until the requests run out.

Requests wait longest first. A batch takes as many as it has free rows; they are prefilled apart (in groups of
similar length, so little padding is computed, after the prefix they share: ``runner.infer.prefixes``), and
their keys and values are written into the batch's free rows, right-aligned on the columns the running rows span
(``KVCache.place``). Every decode step then feeds one token per row. A row that stops (end of sequence, a stop
token or string, or ``max_new_tokens``) frees its row; once an eighth of a batch's rows are free (half, with
weights streamed in, where every refill forward reads them all), the next waiting requests take them. When no
request waits, finished rows leave the batch and cost nothing more. Results come back in input order; each
request's tokens depend only on its prompt and its own seeded sampler, not on the rows beside it.

With micro-batches, K batches decode together as a column: each step runs all of them through each block while
it is in (``runner.infer.column``). A cache that cannot take rows in place (a transformers one) runs its batches
one after another instead: each is filled once, prefix shared within it, and drains.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from runner.infer.column import Call, Streams, column
from runner.infer.finite import check_rows
from runner.infer.model import Cache, CausalLM, SlotCache
from runner.infer.prefixes import PrefixCache, shared_prefix
from runner.infer.sampling import SamplingParams, choose, request_generator
from runner.infer.slots import PrefillGroup, Slots, like_lengths
from runner.infer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
# A batch is refilled once 1/REFILL_SHARE of its rows are free: each refill is one more forward (one more read of
# every streamed weight, hence the smaller share when weights stream in).
REFILL_SHARE, STREAMED_REFILL_SHARE = 8, 2
# A prefill forward's fixed cost, in padded token rows: splitting a fill into groups of like length pays when it
# saves more padding than this per extra forward (SmolLM2 on 2 cores: a forward of 64 rows x 1 token ~ 30 ms of
# weight traffic, ~30 tokens' compute).
SPLIT_TOKENS = 32


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
    decode_rows: int = 0           # rows those forwards computed for a request still going
    refills: int = 0               # fills of a batch that was already running
    prefix_lookups: int = 0        # groups of prompts that asked the job's prefix cache
    prefix_hits: int = 0           # ... and found a prefix kept from an earlier group


@dataclass
class _Row:
    """A request being decoded: its random stream, tokens so far, and whether and why it stopped."""

    request: Request
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    reason: FinishReason | None = None

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.tokens

    @property
    def stopped(self) -> bool:
        return self.reason is not None

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
             streams: Streams | None = None, stagger: int = 0, room: int | None = None,
             prefixes: PrefixCache | None = None) -> list[Completion]:
    """Every request's completion, in input order.

    Args:
        batch_size: rows a batch holds; with ``micro_batches`` K > 1, K batches decode together as a column, each
            streamed block brought in (by ``streams``) once per step for all of them, or, with ``stagger`` > 0, as a
            pipeline over the GPUs (``runner.infer.column``).
        room: positions each row may use in the cache (the plan's ``runtime.seq_len``); more than a request needs
            lets the batch's columns run on longer before they are compacted.
        prefixes: the job's prefix cache, kept across calls (default: none kept).
    """
    stats = stats if stats is not None else GenerationStats()
    if not requests:
        return []
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else tokenizer.eos_ids)
    seed = params.seed if params.seed is not None else seed
    span = max(len(r.tokens) for r in requests) + params.max_new_tokens
    capacity = max(span, min(room or span, 2 * span))
    streamed = streams is not None and streams.streaming
    decoding = _Decoding(lm, tokenizer, params, stop_ids, stats, _Schedule(streams, stagger),
                         prefixes if prefixes is not None else PrefixCache(0),
                         split_tokens=1 << 30 if streamed else SPLIT_TOKENS)
    # Longest first: a request that joins later fits within the columns the running rows already span.
    waiting = deque(_Row(r, request_generator(seed, r.index)) for r in sorted(requests, key=lambda r: (-len(r.tokens), r.index)))
    refill_at = max(1, batch_size // (STREAMED_REFILL_SHARE if streamed else REFILL_SHARE))
    batches: list[Slots[_Row]] = [Slots(lm.new_cache(capacity)) for _ in range(micro_batches)]
    done: dict[int, Completion] = {}
    while True:
        fills = []
        for b in batches:
            free = batch_size - b.live
            if waiting and (not b.live or (isinstance(b.cache, SlotCache) and free >= refill_at)):
                if not b.live:
                    b.reset(lm.new_cache(capacity))
                fills.append((b, [waiting.popleft() for _ in range(min(free, len(waiting)))]))
        if fills:
            decoding.fill(fills)
        for b in batches:
            done.update((row.request.index, row.completion(tokenizer)) for row in b.release())
            if not waiting or not isinstance(b.cache, SlotCache):  # no request will take a free row
                b.drop_free()
        running = [b for b in batches if b.live]
        if not running:
            if waiting:
                continue
            break
        decoding.step(running)
    new_tokens = sum(len(c.output_tokens) for c in done.values())
    stats.requests += len(requests)
    stats.output_tokens += new_tokens
    log.info("%d request(s) in batches of up to %d: %d new tokens", len(requests), batch_size, new_tokens)
    return [done[r.index] for r in requests]


@dataclass(frozen=True)
class _Schedule:
    """How a column's micro-batches share the model: the streams whose loads they share, and their stagger."""

    streams: Streams | None
    stagger: int

    def run(self, lm: CausalLM, calls: list[Call]) -> list[torch.Tensor]:
        return column(lm, calls, self.streams, self.stagger) if calls else []


class _Decoding:
    """What a generate call does to its batches: fill them (prefill) and step them (decode)."""

    def __init__(self, lm: CausalLM, tokenizer: Tokenizer, params: SamplingParams, stop_ids: frozenset[int],
                 stats: GenerationStats, schedule: _Schedule, prefixes: PrefixCache, *, split_tokens: int):
        self.lm, self.tokenizer, self.params, self.stop_ids = lm, tokenizer, params, stop_ids
        self.stats, self.schedule, self.prefixes, self.split_tokens = stats, schedule, prefixes, split_tokens

    def fill(self, fills: list[tuple[Slots[_Row], list[_Row]]]) -> None:
        """Prefill each batch's new rows, choose their first tokens, and put them in the batch."""
        start = time.perf_counter()
        groups = []
        for b, rows in fills:
            self.stats.batches += 1
            self.stats.refills += bool(b.live)
            slots = isinstance(b.cache, SlotCache)
            b.make_room(len(rows))
            parts = like_lengths(rows, self.split_tokens) if slots else [rows]
            groups += [(b, PrefillGroup(part, cache=None if slots else b.cache)) for part in parts]
        self._prefixes(groups)
        # Groups that share each streamed block's load (or a pipeline's stagger) run as one column, their caches
        # all held at once; otherwise one at a time, each placed and dropped before the next is made, so a fill
        # holds one group's cache beside the batch's.
        together = self.schedule.stagger > 0 or (self.schedule.streams is not None and self.schedule.streams.streaming)
        for part in [groups] if together else [[group] for group in groups]:
            self._prefill(part)
        self.stats.prompt_tokens += sum(len(r.request.tokens) for _, rows in fills for r in rows)
        self.stats.prefill_s += time.perf_counter() - start

    def _prefill(self, groups: list[tuple[Slots[_Row], PrefillGroup[_Row]]]) -> None:
        """Prefill ``groups`` as one column, choose their first tokens, and put their rows in their batches (a
        group's own cache is dropped once placed)."""
        for _, g in groups:
            if g.cache is None:
                g.cache = self.lm.new_cache(g.width)
        calls = [g.call(self.tokenizer.pad_id or 0) for _, g in groups]
        for (b, g), call, logits in zip(groups, calls, self.schedule.run(self.lm, calls)):
            self._choose(g.rows, list(range(len(g.rows))), logits)
            if g.cache is b.cache:  # filled in place
                b.rows, b.mask = list(g.rows), call.attention_mask
            else:
                b.place(g, b.slots_for(len(g.rows)))
                g.cache = None

    def _prefixes(self, groups: list[tuple[Slots[_Row], PrefillGroup[_Row]]]) -> None:
        """Each group's shared prefix: kept from an earlier group, or computed once now (one row) and kept."""
        computing: dict[tuple[int, ...], Cache] = {}
        calls = []
        for b, g in groups:
            prompts = g.prompts
            if g.cache is None:
                self.stats.prefix_lookups += 1
                found = self.prefixes.find(prompts)
                if found is not None:
                    self.stats.prefix_hits += 1
                    tokens, cache = found
                    g.prefix, g.source, g.cache = len(tokens), cache, cache.seeded(len(g.rows), g.width)
                    self.stats.prefix_tokens_reused += len(tokens) * len(g.rows)
                    continue
            shared = shared_prefix(prompts)
            if not shared:
                continue
            tokens = prompts[0][:shared]
            g.prefix = shared
            self.stats.prefix_tokens_reused += shared * (len(g.rows) - 1)
            if g.cache is not None:  # the batch's own cache: the prefix row goes there
                calls.append(Call(torch.tensor([tokens]), cache=g.cache, logits_to_keep=1))
            elif tokens not in computing:
                computing[tokens] = self.lm.new_cache(shared)
                calls.append(Call(torch.tensor([tokens]), cache=computing[tokens], logits_to_keep=1))
        self.schedule.run(self.lm, calls)
        for b, g in groups:
            if not g.prefix:
                continue
            if g.cache is b.cache:  # a cache that cannot take rows in place: the prefix row, repeated
                b.cache.repeat_rows(len(g.rows))
            elif g.cache is None:
                tokens = g.prompts[0][:g.prefix]
                self.prefixes.keep(tokens, computing[tokens])
                g.source, g.cache = computing[tokens], computing[tokens].seeded(len(g.rows), g.width)

    def step(self, running: list[Slots[_Row]]) -> None:
        """One decode step: a token for every running row."""
        start = time.perf_counter()
        calls = []
        for b in running:
            assert b.mask is not None
            if b.needs_compaction():
                b.compact()
            b.mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
            pad = self.tokenizer.pad_id or 0
            tokens = [r.tokens[-1] if r is not None else pad for r in b.rows]
            calls.append(Call(torch.tensor(tokens)[:, None], b.mask, b.cache, logits_to_keep=1))
        outputs = self.schedule.run(self.lm, calls)
        for b, logits in zip(running, outputs):
            going = b.going()
            self.stats.decode_rows += len(going)
            self._choose([b.rows[i] for i in going], going, logits)  # type: ignore[misc]
        self.stats.steps += 1
        self.stats.decode_s += time.perf_counter() - start

    def _choose(self, rows: list[_Row], at: list[int], logits: torch.Tensor) -> None:
        """Each row's next token, from its row ``at`` of ``logits``."""
        last = logits[:, -1]
        if len(at) < last.shape[0]:
            last = last[torch.tensor(at, device=last.device)]
        check_rows(last, lambda k: _rerun(self.lm, rows[k]), "the next-token logits")
        chosen = choose(last.float().cpu(), self.params, [r.generator for r in rows])
        for row, token in zip(rows, chosen):
            row.add(token, self.params, self.stop_ids, self.tokenizer)


def _rerun(lm: CausalLM, row: _Row) -> Callable[[], torch.Tensor]:
    """One row's forward again, alone and without a cache: its prompt and what it generated so far."""
    return lambda: lm(torch.tensor([row.request.tokens + tuple(row.tokens)]))
