"""JSON Schema checks for the config and for every file a run writes.

Every violation is collected and turned into one readable line naming its path,
so a user fixes all of them in one go.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import jsonschema

from runner.config.resources import SCHEMA_DIR



@functools.cache
def load_schema(name: str) -> dict:
    """The schema ``schemas/<name>.schema.json``."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def schema_errors(instance: Any, name: str) -> list[str]:
    """One line per violation of schema ``name``, sorted by path; empty when valid."""
    validator = jsonschema.Draft202012Validator(load_schema(name))
    errors = sorted(validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [_describe(error) for error in errors]


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "(root)"


def _describe(error: jsonschema.ValidationError) -> str:
    path = _path(error)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        prefix = "" if path == "(root)" else path + "."
        expected = schema.get("errorMessage") or f"expected one of: {', '.join(allowed)}"
        return "; ".join(f"{prefix}{key}: unknown key; {expected}" for key in unknown)
    if error.validator == "required":
        return f"{path}: {error.message.replace(' is a required property', '')} is missing"
    if "errorMessage" in schema:
        return f"{path}: {_shown(error.instance)} is not valid; {schema['errorMessage']}"
    if error.validator == "enum":
        options = ", ".join(map(str, error.validator_value))
        return f"{path}: {_shown(error.instance)} is not valid; expected one of: {options}"
    return f"{path}: {error.message}"


def _shown(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it, cut short: a 400-digit number or a pasted file stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."
