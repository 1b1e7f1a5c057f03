"""The byte tokenizer: UTF-8 bytes are token ids 0-255.

It serves models without a tokenizer of their own (synthetic zoo models); ids past 255
have no text and decode as ``<id>``.
"""
from __future__ import annotations

from runner.errors import BuildError


class ByteTokenizer:
    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise BuildError(f"model.arch.vocab_size: the byte tokenizer needs at least 256 ids, the model has {vocab_size}")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            out.append(f"<{i}>")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)
