"""``task=score``: the log-likelihood of every row (a text, or a continuation given its prompt), as ``score``."""
from __future__ import annotations

from typing import Any

from runner.config import RunConfig, ScoreTask
from runner.data.rows import Row
from runner.infer.engine import Engine
from runner.errors import GenerateError
from runner.infer.prompts import token_ids
from runner.infer.score import Score, ScoreRequest, pair_request, text_request
from runner.run.rows import Batch, Item


class ScoreRows:
    """Rows as scoring requests; each batch is one forward."""

    def __init__(self, engine: Engine, config: RunConfig):
        assert isinstance(config.task, ScoreTask)
        self.engine, self.task = engine, config.task
        self.vocab = config.model.arch.get("vocab_size")

    def prepare(self, row: Row) -> Item:
        tokenizer = self.engine.tokenizer
        if row.messages is not None:
            raise GenerateError("messages: task=score reads a text, or a prompt and continuation; "
                                "chat messages are for task=generate")
        if row.input_ids is not None:
            request = ScoreRequest(row.number, tuple(token_ids(row.input_ids, self.vocab)), 1)
        elif row.continuation is not None:
            assert row.text is not None
            request = pair_request(tokenizer, row.number, row.text, row.continuation)
        else:
            assert row.text is not None
            request = text_request(tokenizer, row.number, row.text)
        self.engine.fit(request.tokens)
        return Item(row, request, len(request.tokens))

    def run(self, items: list[Item]) -> Batch:
        scores = self.engine.score_batch([i.request for i in items])
        return Batch(scores, sum(i.tokens for i in items))

    def line(self, row: Row, result: Score) -> dict[str, Any]:
        value: dict[str, Any] = {"logprob": result.logprob, "tokens": result.tokens,
                                 "perplexity": result.perplexity, "greedy": result.greedy}
        if self.task.per_token:
            value["token_logprobs"] = list(result.token_logprobs)
        return row.output(self.task.output_key, value)

    def error_line(self, row: Row) -> dict[str, Any]:
        return row.error_output()
