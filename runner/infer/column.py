"""Micro-batches in a column: K forwards run block by block, each streamed block brought in once for all K.

When weights stream in from the CPU or disk, a forward costs the bytes of every streamed block
however few rows it computes. FlexGen's answer is to run a whole column of micro-batches through
a block while it is in: micro-batch j runs block i right after micro-batch j-1 did, and the block
is dropped after the last. Weight traffic per generated token then falls by K, while the hidden
states of only one micro-batch are in flight at a time and each keeps its own KV cache.

A zoo model's forward is a generator that yields between its blocks (``SteppedLM``); ``column``
advances the K generators in turn, and the prefetcher (``Prefetcher.shared_by``) keeps each block
in until its K-th use. Over several GPUs with nothing streamed, the same generators run staggered
instead (``stagger``): GPipe's pipeline, each GPU working on another micro-batch. A model that cannot step (a transformers one) runs its micro-batches one
after another, each streaming every block itself: the same results, without the saving.
"""
from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

Steps = Generator[None, None, torch.Tensor]  # yields between blocks, returns the forward's output


@dataclass(frozen=True)
class Call:
    """One micro-batch's forward: the arguments of ``CausalLM.__call__``."""

    idx: torch.Tensor
    attention_mask: torch.Tensor | None = None
    cache: Any = None
    logits_to_keep: int = 0


@runtime_checkable
class SteppedLM(Protocol):
    """A causal LM whose forward can be run a block at a time."""

    def forward_steps(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, cache: Any = None, logits_to_keep: int = 0) -> Steps: ...


@runtime_checkable
class ColumnLM(Protocol):
    """A model that runs a column's calls itself (a pipeline stage, ``runner.infer.pipelined``)."""

    def forward_column(self, calls: list[Call]) -> list[torch.Tensor]: ...


class Streams(Protocol):
    """What brings streamed blocks in (``runner.load.offload.Prefetcher``): it can keep each load for K uses."""

    @property
    def streaming(self) -> bool:
        """Whether a forward brings weights in at all."""
        ...

    def shared_by(self, micro_batches: int) -> AbstractContextManager[None]: ...


def run_steps(steps: Steps) -> torch.Tensor:
    """A stepped forward run to its end: the plain forward."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def column(lm: Any, calls: list[Call], streams: Streams | None, stagger: int = 0) -> list[torch.Tensor]:
    """Every call's output, in order.

    With ``stagger`` 0, block i runs for every micro-batch before block i + 1: each streamed block is brought in
    once for all of them. With ``stagger`` S > 0 (a map over several GPUs, nothing streamed), micro-batch j starts
    S blocks after micro-batch j - 1, GPipe's schedule: while micro-batch j runs the blocks of one GPU, j - 1 runs
    the next GPU's. Kernels are queued on each GPU's own stream and the host never waits between them, so the GPUs
    work at once. Each micro-batch runs the same computations in the same order whatever the schedule, so the
    outputs are those of running the calls one by one.
    """
    if isinstance(lm, ColumnLM):
        return lm.forward_column(calls)
    if len(calls) == 1 or not isinstance(lm, SteppedLM):
        return [lm(c.idx, attention_mask=c.attention_mask, cache=c.cache, logits_to_keep=c.logits_to_keep)
                for c in calls]
    running = {j: lm.forward_steps(c.idx, attention_mask=c.attention_mask, cache=c.cache,
                                   logits_to_keep=c.logits_to_keep) for j, c in enumerate(calls)}
    out: dict[int, torch.Tensor] = {}
    shared = streams.shared_by(len(calls)) if streams is not None and not stagger else contextlib.nullcontext()
    with shared:
        for _, j in schedule(running, stagger):
            try:
                next(running[j])
            except StopIteration as done:
                out[j] = done.value
                del running[j]
    return [out[j] for j in range(len(calls))]


def schedule(running: dict[int, Any], stagger: int) -> Iterator[tuple[int, int]]:
    """``(tick, micro-batch)`` in the order their next block runs, while ``running`` holds them: at each tick every
    started micro-batch runs one block, the furthest along first (its stage is downstream); micro-batch j starts at
    tick ``j * stagger``."""
    tick = 0
    while running:
        for j in sorted(running):
            if j * stagger > tick:
                break
            yield tick, j
        tick += 1
