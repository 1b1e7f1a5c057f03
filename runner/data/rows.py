"""A row of a batch job: what one input line asks for, its id, and the fields carried into its output line."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Fields an output line writes itself: an input field of the same name would be overwritten.
RESERVED = ("id", "error")


@dataclass
class Row:
    """One input line, read and checked for shape (not yet tokenized).

    A row holds one of ``text`` (with ``continuation`` for a score pair), ``messages`` or ``input_ids``;
    a row that could not be read holds ``error`` instead, and is written (``on_error: skip``) or ends the run.
    """

    number: int                       # position among the input's rows, from 0: orders the output, seeds sampling
    id: str | int                     # the id field, custom_id, or the line number (inline: the position)
    where: str                        # for messages: "rows.jsonl line 17", "data.prompts[3]"
    fields: dict[str, Any] = field(default_factory=dict)  # carried into the output line unchanged
    text: str | None = None
    continuation: str | None = None   # score pairs: log p(continuation | text)
    messages: list[dict[str, str]] | None = None
    input_ids: list[int] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # per-request overrides (an OpenAI body's)
    endpoint: Literal["chat", "completions"] | None = None   # OpenAI requests only
    model: str | None = None          # OpenAI requests: the body's model name, echoed in the response
    error: str | None = None

    def failed(self, error: str) -> Row:
        self.error = error
        return self

    def output(self, key: str, value: Any) -> dict[str, Any]:
        """The output line: the id, the input's other fields as they were, then the result under ``key``."""
        return {"id": self.id, **self.fields, key: value}

    def error_output(self) -> dict[str, Any]:
        """The output line of a row skipped for its error, which names the line and what is wrong."""
        return {"id": self.id, **self.fields, "error": f"{self.where}: {self.error}"}
