"""Prompts to requests: the chat template, token ids, and the fit to the model's context and the planned length."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from runner.load.checkpoint import Checkpoint
from runner.config import GenerateTask, RunConfig
from runner.errors import GenerateError
from runner.infer.generate import Request
from runner.infer.tokenizer import Tokenizer, apply_chat_template, tokenizer_for


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], chat: bool) -> list[Request]:
    """Each prompt as token ids (see ``encode_prompt``)."""
    if isinstance(prompts, str):
        raise GenerateError("prompts: expected a list of strings, got one string; wrap it in a list")
    requests = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerateError(f"prompts[{index}]: expected a string, got {type(prompt).__name__}")
        try:
            requests.append(Request(index, prompt, encode_prompt(tokenizer, prompt, chat)))
        except GenerateError as e:
            raise GenerateError(f"prompts[{index}]: {e.lines[0]}") from None
    return requests


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[dict[str, str]], chat: bool) -> tuple[int, ...]:
    """A prompt as token ids, inside the tokenizer's chat template when ``chat`` and it has one (chat messages
    always: they need one). Without a template, the tokenizer adds what it adds to any text (a BOS token, for
    most), as transformers does."""
    if isinstance(prompt, list):
        if not tokenizer.chat_template:
            raise GenerateError(f"messages: the tokenizer ({tokenizer.name}) has no chat template to render them "
                                "with; give the row a text prompt, or a tokenizer.path whose tokenizer has one")
        tokens = tokenizer.encode(apply_chat_template(tokenizer, prompt), add_special_tokens=False)
    elif chat and tokenizer.chat_template:
        tokens = tokenizer.encode(apply_chat_template(tokenizer, prompt), add_special_tokens=False)
    else:
        tokens = tokenizer.encode(prompt, add_special_tokens=True)
    if not tokens:
        raise GenerateError(f"{prompt!r} has no tokens; give it some text")
    return tuple(tokens)


def fit(requests: list[Request], max_new_tokens: int, *, context: int, seq_len: int,
        truncate: Literal["left"] | None) -> list[Request]:
    """The requests, checked (or cut on the left, with ``truncate: left``) so that prompt plus ``max_new_tokens``
    fits the model's ``context`` and the ``seq_len`` the plan reserved a cache for.

    Raises:
        GenerateError: naming the prompt, the limit, and what to lower or raise.
    """
    fitted = []
    for r in requests:
        try:
            tokens = fit_tokens(r.tokens, max_new_tokens, context=context, seq_len=seq_len, truncate=truncate)
        except GenerateError as e:
            raise GenerateError(f"prompts[{r.index}]: {e.lines[0]}") from None
        fitted.append(r if tokens is r.tokens else Request(r.index, r.prompt, tokens))
    return fitted


def fit_tokens(tokens: tuple[int, ...], max_new_tokens: int, *, context: int, seq_len: int,
               truncate: Literal["left"] | None) -> tuple[int, ...]:
    """One prompt's tokens, checked or cut on the left to leave ``max_new_tokens`` within the context and the
    planned ``seq_len`` (0 new tokens: the prompt alone must fit, as for scoring and embedding)."""
    check_new_tokens(max_new_tokens, context=context, seq_len=seq_len)
    room = min(context, seq_len) - max_new_tokens
    if len(tokens) <= room:
        return tokens
    if truncate == "left":
        return tokens[-room:]
    new = f" prompt tokens + max_new_tokens {max_new_tokens}" if max_new_tokens else " tokens"
    lower = ", lower max_new_tokens" if max_new_tokens else ""
    if len(tokens) + max_new_tokens > context:
        cut = ", or set task.truncate=left to drop its oldest tokens" if max_new_tokens else ""
        raise GenerateError(f"{len(tokens)}{new} exceed the model's context of {context} tokens; "
                            f"shorten the text{lower}{cut}")
    raise GenerateError(f"{len(tokens)}{new} exceed runtime.seq_len {seq_len}, the length planned for; "
                        f"raise runtime.seq_len (null: sized from inline rows, else the model's context){lower}")


def check_new_tokens(max_new_tokens: int, *, context: int, seq_len: int) -> None:
    """``max_new_tokens`` leaves room for a prompt within the context and the planned length."""
    limit = min(context, seq_len)
    if max_new_tokens and max_new_tokens >= limit:
        what = (f"the model's context of {context} tokens" if context <= seq_len
                else f"runtime.seq_len {seq_len}, the length the KV cache was planned for")
        raise GenerateError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt within {what}; lower it "
                            f"below {limit} (prompt and new tokens share it; a completion also ends at its "
                            "end-of-sequence token)")


def planned_length(requests: list[Request], max_new_tokens: int) -> int:
    """The ``runtime.seq_len`` these requests need: the longest prompt plus the new tokens."""
    return max(len(r.tokens) for r in requests) + max_new_tokens


def plan_inputs(config: RunConfig, checkpoint: Checkpoint | None) -> tuple[RunConfig, Tokenizer]:
    """The tokenizer, and the config with ``runtime.seq_len`` derived from inline rows when it is not set:
    the cache the task needs, and no more. Rows from a file are not read ahead: the length stays unset, and
    the plan takes the model's context."""
    tokenizer = tokenizer_for(checkpoint, config.tokenizer_path, config.model.arch.get("vocab_size"),
                              synthetic=config.checkpoint.source == "synthetic")
    if config.runtime.seq_len is None and config.data.format == "inline":
        task = config.task
        if isinstance(task, GenerateTask):
            requests = encode_prompts(tokenizer, config.data.prompts, task.chat)
            seq_len = planned_length(requests, task.sampling.max_new_tokens)
        else:
            seq_len = max(len(tokenizer.encode(p, add_special_tokens=True)) for p in config.data.prompts)
        config = replace(config, runtime=replace(config.runtime, seq_len=seq_len))
    return config, tokenizer


def token_ids(ids: list[int], vocab: int | None) -> list[int]:
    """Given token ids, checked against the model's vocabulary."""
    if vocab is not None and max(ids) >= vocab:
        raise GenerateError(f"input_ids: id {max(ids)} is past the model's vocabulary of {vocab} tokens")
    return ids
