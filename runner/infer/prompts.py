"""Prompts to requests: the chat template, token ids, and the fit to the model's context and the planned length."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from runner.checkpoint import Checkpoint
from runner.config import RunConfig
from runner.errors import GenerateError
from runner.infer.generate import Request
from runner.tokenizer import Tokenizer, apply_chat_template, tokenizer_for


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], chat: bool) -> list[Request]:
    """Each prompt as token ids, inside the tokenizer's chat template when ``chat`` and it has one. Without a
    template, the tokenizer adds what it adds to any text (a BOS token, for most), as transformers does."""
    if isinstance(prompts, str):
        raise GenerateError("prompts: expected a list of strings, got one string; wrap it in a list")
    requests = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerateError(f"prompts[{index}]: expected a string, got {type(prompt).__name__}")
        if chat and tokenizer.chat_template:
            tokens = tokenizer.encode(apply_chat_template(tokenizer, prompt), add_special_tokens=False)
        else:
            tokens = tokenizer.encode(prompt, add_special_tokens=True)
        if not tokens:
            raise GenerateError(f"prompts[{index}]: {prompt!r} has no tokens; give it some text")
        requests.append(Request(index, prompt, tuple(tokens)))
    return requests


def fit(requests: list[Request], max_new_tokens: int, *, context: int, seq_len: int,
        truncate: Literal["left"] | None) -> list[Request]:
    """The requests, checked (or cut on the left, with ``truncate: left``) so that prompt plus ``max_new_tokens``
    fits the model's ``context`` and the ``seq_len`` the plan reserved a cache for.

    Raises:
        GenerateError: naming the prompt, the limit, and what to lower or raise.
    """
    limit = min(context, seq_len)
    if max_new_tokens >= limit:
        what = (f"the model's context of {context} tokens" if context <= seq_len
                else f"runtime.seq_len {seq_len}, the length the KV cache was planned for")
        raise GenerateError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt within {what}; lower it")
    room = limit - max_new_tokens
    fitted = []
    for r in requests:
        if len(r.tokens) <= room:
            fitted.append(r)
        elif truncate == "left":
            fitted.append(Request(r.index, r.prompt, r.tokens[-room:]))
        elif len(r.tokens) + max_new_tokens > context:
            raise GenerateError(f"prompts[{r.index}]: {len(r.tokens)} prompt tokens + max_new_tokens {max_new_tokens} "
                                f"exceed the model's context of {context} tokens; shorten the prompt, lower "
                                "max_new_tokens, or set task.truncate=left to drop its oldest tokens")
        else:
            raise GenerateError(f"prompts[{r.index}]: {len(r.tokens)} prompt tokens + max_new_tokens {max_new_tokens} "
                                f"exceed runtime.seq_len {seq_len}, the length the KV cache was planned for; "
                                "raise runtime.seq_len (or leave it null to size it from the prompts), "
                                "or lower max_new_tokens")
    return fitted


def planned_length(requests: list[Request], max_new_tokens: int) -> int:
    """The ``runtime.seq_len`` these requests need: the longest prompt plus the new tokens."""
    return max(len(r.tokens) for r in requests) + max_new_tokens


def task_requests(config: RunConfig, checkpoint: Checkpoint | None) -> tuple[RunConfig, Tokenizer, list[Request]]:
    """The tokenizer, the task's prompts as requests, and the config with ``runtime.seq_len`` derived from them
    when it is not set: the cache the task needs, and no more."""
    tokenizer = tokenizer_for(checkpoint, config.tokenizer_path, config.model.arch.get("vocab_size"),
                              synthetic=config.checkpoint.source == "synthetic")
    task = config.task
    requests = encode_prompts(tokenizer, task.prompts, task.chat)
    if config.runtime.seq_len is None:
        seq_len = planned_length(requests, task.sampling.max_new_tokens)
        config = replace(config, runtime=replace(config.runtime, seq_len=seq_len))
    return config, tokenizer, requests
