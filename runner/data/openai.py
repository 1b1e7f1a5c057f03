"""The OpenAI batch format, as ``vllm run-batch`` reads and writes it.

A request line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``.
The body's sampling fields override the task's for that request. A result line: ``{"id", "custom_id",
"response": {"status_code": 200, "request_id", "body": <chat.completion | text_completion>}, "error": null}``,
or, for a skipped row, ``"response": null`` and ``"error": {"code", "message"}``. Ids are derived from the
line, not drawn at random, and ``created`` is 0 (no clock time), so a resumed job writes the same bytes as an
uninterrupted one.
"""
from __future__ import annotations

from typing import Any

from runner.data.rows import Row
from runner.infer.generate import Completion

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# Body field -> SamplingParams field. Others (model, user, metadata, logprobs...) are accepted and not acted on.
SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "stop": "stop", "seed": "seed", "ignore_eos": "ignore_eos"}


def openai_row(obj: dict[str, Any], row: Row) -> Row:
    """A request line as a row: its ``custom_id``, prompt or messages, and sampling overrides."""
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return row.failed("custom_id: expected a non-empty string naming the request")
    row.id = custom_id
    if obj.get("method", "POST") != "POST":
        return row.failed(f"method: {obj['method']!r}; batch requests are POST")
    url = obj.get("url")
    if url not in ENDPOINTS:
        return row.failed(f"url: {url!r} is not served; expected one of {', '.join(ENDPOINTS)}")
    row.endpoint = ENDPOINTS[url]
    body = obj.get("body")
    if not isinstance(body, dict):
        return row.failed("body: expected an object holding the request")
    row.model = body.get("model") if isinstance(body.get("model"), str) else None
    if body.get("n", 1) != 1:
        return row.failed(f"body.n: {body['n']!r}; one completion per request is served, set n to 1")
    if body.get("stream"):
        return row.failed("body.stream: a batch request cannot stream; remove it")
    for key, name in SAMPLING_FIELDS.items():
        if key in body and body[key] is not None:
            value = body[key]
            row.sampling[name] = ((value,) if isinstance(value, str) else tuple(value)) if name == "stop" else value
    if row.endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            return row.failed("body.messages: expected a non-empty list of objects with string role and content")
        row.messages = messages
        return row
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return row.failed("body.prompt: expected one non-empty string (lists of prompts are not served)")
    row.text = prompt
    return row


def response_line(row: Row, completion: Completion, *, model: str) -> dict[str, Any]:
    """The OpenAI batch output line for a completed request."""
    usage = {"prompt_tokens": len(completion.prompt_tokens), "completion_tokens": len(completion.output_tokens),
             "total_tokens": len(completion.prompt_tokens) + len(completion.output_tokens)}
    if row.endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": completion.text}, "logprobs": None,
                  "finish_reason": completion.finish_reason}
        body = {"id": f"chatcmpl-{row.number}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}
        body = {"id": f"cmpl-{row.number}", "object": "text_completion"}
    body |= {"created": 0, "model": row.model or model, "choices": [choice], "usage": usage}
    return {"id": f"batch_req_{row.number}", "custom_id": row.id,
            "response": {"status_code": 200, "request_id": f"req_{row.number}", "body": body}, "error": None}


def error_line(row: Row) -> dict[str, Any]:
    """The OpenAI batch output line for a request that was skipped."""
    return {"id": f"batch_req_{row.number}", "custom_id": row.id, "response": None,
            "error": {"code": "invalid_request", "message": f"{row.where}: {row.error}"}}
