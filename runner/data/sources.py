"""Rows from the config's inline prompts, a text file, a JSONL file or an OpenAI batch file, streamed.

Files are read a line at a time and handed on in windows, so a job over a 1 GB file holds one window of
rows, not the file. Reading checks each row's shape (valid JSON, the fields it needs, a unique id); a bad
row comes out with its ``error`` set, for the job to fail on or skip.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from runner.config import DataSpec, Task
from runner.data.openai import openai_row
from runner.data.rows import RESERVED, Row
from runner.errors import DataError


def read_rows(data: DataSpec, task: Task) -> Iterator[Row]:
    """Every row of the input, in order, each with its id; ids must be unique."""
    if data.format == "inline":
        return _inline_rows(data, task)
    rows = _file_rows(data, task)
    return _unique_ids(rows) if data.id_field is not None or data.format == "openai" else rows


def count_rows(data: DataSpec) -> int:
    """How many rows the input holds (non-blank lines), for the progress bar; a fast pass over the file."""
    if data.format == "inline":
        return len(data.prompts)
    with _open(data) as f:
        return sum(1 for line in f if line.strip())


def windows(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    """The rows in consecutive lists of ``size`` (the last may be shorter)."""
    window: list[Row] = []
    for row in rows:
        window.append(row)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _inline_rows(data: DataSpec, task: Task) -> Iterator[Row]:
    key = data.text_field(task)
    for number, prompt in enumerate(data.prompts):
        yield Row(number, number, f"data.prompts[{number}]", {key: prompt}, text=prompt)


def _file_rows(data: DataSpec, task: Task) -> Iterator[Row]:
    assert data.path is not None  # the schema requires it for files
    number = 0
    with _open(data) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{data.path.name} line {line_no}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield Row(number, line_no, where).failed(f"not UTF-8 text (byte {e.start}); save the file as UTF-8")
            else:
                if data.format == "text":
                    yield Row(number, line_no, where, {data.text_field(task): line}, text=line)
                else:
                    yield _json_row(line, Row(number, line_no, where), data, task)
            number += 1


def _json_row(line: str, row: Row, data: DataSpec, task: Task) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return row.failed(f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object")
    if not isinstance(obj, dict):
        return row.failed(f"expected a JSON object, got {type(obj).__name__}")
    if data.format == "openai":
        return openai_row(obj, row)
    return _fields_row(obj, row, data, task)


def _fields_row(obj: dict[str, Any], row: Row, data: DataSpec, task: Task) -> Row:
    """A JSONL row: its id, the one input it holds, and everything else carried along."""
    if data.id_field is not None:
        if data.id_field not in obj:
            return row.failed(f"no {data.id_field!r} field, which data.id_field names as the id")
        row.id = obj[data.id_field]
        if isinstance(row.id, bool) or not isinstance(row.id, (str, int)):
            return row.failed(f"id {row.id!r} in {data.id_field!r}: expected a string or a whole number")
    row.fields = {k: v for k, v in obj.items() if k != data.id_field}
    clash = [k for k in (*RESERVED, task.output_key) if k in row.fields]
    if clash:
        hint = " or set data.id_field=id to use it as the id" if clash[0] == "id" and data.id_field is None else ""
        return row.failed(f"field {clash[0]!r} is one the output line writes itself; rename it{hint}")
    key = data.text_field(task)
    inputs = [k for k in (key, "messages", "input_ids") if k in obj]
    if task.name == "score" and "continuation" in obj:
        return _pair(obj, row)
    if len(inputs) != 1:
        found = f"both {inputs[0]!r} and {inputs[1]!r}" if inputs else f"no {key!r} field"
        return row.failed(f"{found}; a row holds exactly one of {key!r} (text), 'messages' or 'input_ids'")
    value = obj[inputs[0]]
    if inputs[0] == "messages":
        return _messages(value, row)
    if inputs[0] == "input_ids":
        if not isinstance(value, list) or not value or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            return row.failed("input_ids: expected a non-empty list of token ids (whole numbers from 0)")
        row.input_ids = value
        return row
    return _text(value, key, row)


def _text(value: Any, key: str, row: Row) -> Row:
    if not isinstance(value, str):
        return row.failed(f"{key}: expected a string, got {type(value).__name__}")
    if not value.strip():
        return row.failed(f"{key}: the text is empty; give it some text")
    row.text = value
    return row


def _pair(obj: dict[str, Any], row: Row) -> Row:
    """A score request: the log-likelihood of ``continuation`` after ``prompt``."""
    for key in ("prompt", "continuation"):
        if not isinstance(obj.get(key), str):
            got = "no such field" if key not in obj else f"got {type(obj[key]).__name__}"
            return row.failed(f"{key}: a scored continuation needs 'prompt' and 'continuation' strings ({got})")
    if not obj["continuation"]:
        return row.failed("continuation: empty; there is nothing to score")
    row.text, row.continuation = obj["prompt"], obj["continuation"]
    return row


def _messages(value: Any, row: Row) -> Row:
    if not isinstance(value, list) or not value:
        return row.failed("messages: expected a non-empty list of {role, content} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return row.failed(f"messages[{i}]: expected an object with string 'role' and 'content'")
    row.messages = value
    return row


def _unique_ids(rows: Iterator[Row]) -> Iterator[Row]:
    """The rows, with a repeated id made an error: output lines and resuming go by id."""
    first_seen: dict[str | int, str] = {}
    for row in rows:
        if row.error is None:
            if row.id in first_seen:
                row.failed(f"duplicate id {row.id!r}, already used at {first_seen[row.id]}; ids must be unique")
            else:
                first_seen[row.id] = row.where
        yield row


def _open(data: DataSpec):
    path: Path | None = data.path
    assert path is not None
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DataError(f"data.path: {path} does not exist; point it at the input file") from None
    except IsADirectoryError:
        raise DataError(f"data.path: {path} is a folder; point it at the input file") from None
    except PermissionError:
        raise DataError(f"data.path: {path} cannot be read (permission denied)") from None
