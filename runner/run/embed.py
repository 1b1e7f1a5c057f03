"""``task=embed``: one pooled vector per row, as ``embedding``."""
from __future__ import annotations

from typing import Any

from runner.config import EmbedTask, RunConfig
from runner.data.rows import Row
from runner.infer.engine import Engine
from runner.errors import GenerateError
from runner.infer.prompts import token_ids
from runner.run.rows import Batch, Item


class EmbedRows:
    """Rows as token ids (the tokenizer's special tokens added, as the model was trained); a batch is one forward."""

    def __init__(self, engine: Engine, config: RunConfig):
        assert isinstance(config.task, EmbedTask)
        self.engine, self.task = engine, config.task
        self.vocab = config.model.arch.get("vocab_size")

    def prepare(self, row: Row) -> Item:
        if row.messages is not None:
            raise GenerateError("messages: task=embed reads a text or input_ids; chat messages are for task=generate")
        if row.input_ids is not None:
            tokens = tuple(token_ids(row.input_ids, self.vocab))
        else:
            assert row.text is not None
            tokens = tuple(self.engine.tokenizer.encode(row.text, add_special_tokens=True))
        self.engine.fit(tokens)
        return Item(row, tokens, len(tokens))

    def run(self, items: list[Item]) -> Batch:
        vectors = self.engine.embed_batch([i.request for i in items], pooling=self.task.pooling,
                                          normalize=self.task.normalize)
        return Batch(vectors.tolist(), sum(i.tokens for i in items))

    def line(self, row: Row, result: list[float]) -> dict[str, Any]:
        return row.output(self.task.output_key, result)

    def error_line(self, row: Row) -> dict[str, Any]:
        return row.error_output()
