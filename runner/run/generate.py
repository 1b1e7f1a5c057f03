"""``task=generate``: a completion for every row, written as ``completion`` (or in the OpenAI batch shape).

The job itself (reading, batching, writing, resuming) is ``runner.run.job``; this is what generation does
with one row and one batch."""
from __future__ import annotations

from typing import Any

from runner.config import GenerateTask, RunConfig
from runner.data import openai
from runner.data.rows import Row
from runner.infer.engine import Engine, sampling_params
from runner.infer.generate import Completion, Request
from runner.infer.prompts import check_new_tokens, encode_prompt, token_ids
from runner.run.rows import Batch, Item


class GenerateRows:
    """Rows as generation requests: the chat template (or raw text, or given token ids), the row's own sampling
    settings over the task's, and the fit to the context; batches share one set of settings."""

    def __init__(self, engine: Engine, config: RunConfig):
        assert isinstance(config.task, GenerateTask)
        self.engine, self.task = engine, config.task
        self.openai = config.data.format == "openai"
        self.vocab = config.model.arch.get("vocab_size")
        # The task's own max_new_tokens is the config's to fix, not a row's (a row may still ask for more).
        check_new_tokens(self.task.sampling.max_new_tokens, context=engine.context, seq_len=engine.seq_len)

    def prepare(self, row: Row) -> Item:
        params = sampling_params(self.task.sampling, row.sampling)
        tokenizer = self.engine.tokenizer
        if row.input_ids is not None:
            tokens = tuple(token_ids(row.input_ids, self.vocab))
        elif row.messages is not None:
            tokens = encode_prompt(tokenizer, row.messages, chat=True)
        else:
            assert row.text is not None
            tokens = encode_prompt(tokenizer, row.text, chat=self.task.chat and row.endpoint != "completions")
        tokens = self.engine.fit(tokens, params.max_new_tokens, self.task.truncate)
        return Item(row, Request(row.number, row.text or "", tokens), len(tokens), group=params)

    def run(self, items: list[Item]) -> Batch:
        stats = self.engine.stats
        prefill, decode = stats.prefill_s, stats.decode_s
        completions = self.engine.complete([i.request for i in items], items[0].group)
        return Batch(completions, sum(i.tokens for i in items), sum(len(c.output_tokens) for c in completions),
                     first_token_s=stats.prefill_s - prefill, decode_s=stats.decode_s - decode)

    def line(self, row: Row, result: Completion) -> dict[str, Any]:
        if self.openai:
            return openai.response_line(row, result, model=self.engine.config.model.name)
        return row.output(self.task.output_key, {"text": result.text, "finish_reason": result.finish_reason,
                                         "prompt_tokens": len(result.prompt_tokens),
                                         "completion_tokens": len(result.output_tokens)})

    def error_line(self, row: Row) -> dict[str, Any]:
        return openai.error_line(row) if self.openai else row.error_output()

