"""How the next token is chosen, and when a request stops: one place for every field.

Sampling is seeded per request, from the run seed and the request's index, so a request's
sample does not depend on its batch, its neighbours, their order or the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runner.errors import GenerateError


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of one ``generate`` call.

    Attributes:
        max_new_tokens: tokens generated per prompt at most.
        temperature: 0 is greedy (argmax); above 0 samples from the softmax of logits / temperature.
        top_k: keep the k likeliest tokens before sampling; 0 keeps all.
        top_p: keep the smallest set of likeliest tokens whose probability reaches top_p; 1 keeps all.
        min_p: drop tokens less likely than min_p times the likeliest; 0 keeps all.
        stop: strings that end a completion; the text is cut before the first one found.
        stop_token_ids: token ids that end a completion, besides the tokenizer's end-of-sequence ids.
        ignore_eos: keep generating past end-of-sequence tokens (for benchmarks).
        seed: the seed requests are drawn with, with their index; None takes the run's ``seed``.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: {self.max_new_tokens!r} is not a whole number of at least 1")
        if not 0 <= self.temperature < float("inf"):  # written so that NaN, which passes every bound, fails
            problems.append(f"temperature: {self.temperature} is not a finite number of at least 0; "
                            "use 0 for greedy or a positive value")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k: {self.top_k!r} is below 0; use 0 to keep every token")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: {self.top_p} is outside (0, 1]; use 1 to keep every token")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p: {self.min_p} is outside [0, 1]; use 0 to keep every token")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop: an empty stop string would stop before the first token; remove it")
        if problems:
            raise GenerateError(*problems)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def request_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of one request: the same whatever batch it lands in."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)


def choose(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> list[int]:
    """The next token of each row of ``logits [B, vocab]`` (fp32, on the CPU)."""
    if params.greedy:
        return logits.argmax(-1).tolist()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep a token while the mass before it is below top_p: the likeliest one always stays.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(probs, generators)]
