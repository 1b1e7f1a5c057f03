"""Tokenizers: the one inside a GGUF file (a byte-level BPE, through the ``tokenizers`` library),
with its chat template; and a byte fallback for models that have none.
"""
from __future__ import annotations

from typing import Any

from runner.errors import BuildError, CheckpointError


class ByteTokenizer:
    """UTF-8 bytes are token ids 0-255; ids past 255 have no text and decode as ``<id>``."""

    eos_ids: frozenset[int] = frozenset()
    chat_template: str | None = None

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


class BPETokenizer:
    """A byte-level BPE tokenizer rebuilt from GGUF fields (``ggml.tokens``, ``ggml.merges``, ...)."""

    def __init__(self, fields: dict[str, Any]):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        model = fields.get("ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"tokenizer: GGUF tokenizer model {model!r} is not supported yet "
                                  "(only byte-level BPE, 'gpt2'); set a model with its own tokenizer")
        tokens: list[str] = fields["ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["ggml.merges"]]
        bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False)
        self._tok = Tokenizer(bpe)
        # SmolLM/GPT-2 style pre-tokenisation: digits one by one, then the byte-level regex split.
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self._tok.decoder = decoders.ByteLevel()
        control = [t for t, kind in zip(tokens, fields.get("ggml.token_type", [])) if kind == 3]
        self._tok.add_special_tokens(control)  # <|im_start|> and the like: never split
        self.eos_ids = frozenset(i for i in (fields.get("ggml.eos_token_id"),) if i is not None)
        self.bos_token = tokens[fields["ggml.bos_token_id"]] if "ggml.bos_token_id" in fields else ""
        self.eos_token = tokens[fields["ggml.eos_token_id"]] if "ggml.eos_token_id" in fields else ""
        self.chat_template = fields.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=True)


def apply_chat_template(tokenizer, prompt: str) -> str:
    """The prompt as one user turn in the tokenizer's chat template, ready for the assistant's answer."""
    import jinja2

    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(tokenizer.chat_template)
    return template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                           bos_token=getattr(tokenizer, "bos_token", ""), eos_token=getattr(tokenizer, "eos_token", ""))


def tokenizer_for(checkpoint, vocab_size: int | None):
    """The checkpoint's own tokenizer when it carries one, else bytes."""
    fields = getattr(checkpoint, "tokenizer_fields", None)
    if callable(fields):
        return BPETokenizer(fields())
    if not isinstance(vocab_size, int):
        raise BuildError("model.arch.vocab_size: the model has no token vocabulary the byte tokenizer can use; "
                         "it can be planned (mode=plan) but not run")
    return ByteTokenizer(vocab_size)
