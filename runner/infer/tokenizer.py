"""Tokenizers: the checkpoint's own, through the ``tokenizers`` library, with its chat template.

Three kinds satisfy ``Tokenizer``: ``HFTokenizer`` (a Hugging Face ``tokenizer.json`` and the
files saved beside it), ``BPETokenizer`` (the byte-level BPE inside a GGUF file) and
``ByteTokenizer`` (UTF-8 bytes, for synthetic models only). ``tokenizer_for`` picks one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import tokenizers
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from runner.load.checkpoint.base import one_line
from runner.errors import BuildError, CheckpointError

log = logging.getLogger(__name__)

_WHAT_PATH_TAKES = "a folder holding tokenizer.json, or a tokenizer.json file"
# GGUF ``tokenizer.ggml.pre`` values whose byte-level split is GPT-2's, after splitting digits one by one or not
# (llama.cpp's groups); any other split is refused rather than approximated.
_GPT2_SPLIT = {"default", "gpt-2", "gpt2"}
_DIGITS_THEN_GPT2_SPLIT = {"smollm", "starcoder", "refact"}


@dataclass(frozen=True)
class _Split:
    """A pre-tokenizer as its ``tokenizer.json`` has it: a ``Split`` on ``regex``, then ByteLevel with no regex."""

    regex: str
    nfc: bool = False            # Qwen's tokenizer.json normalizes to NFC first
    ignore_merges: bool = False  # Llama 3's BPE takes a whole word that is in the vocabulary as it is


# Llama 3's and Qwen2's splits differ in digits: up to three together, or one by one.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = _Split(_CONTRACTIONS + r"\p{N}{1,3}" + _REST, ignore_merges=True)
_QWEN2 = _Split(_CONTRACTIONS + r"\p{N}" + _REST, nfc=True)
_REGEX_SPLIT = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "qwen2": _QWEN2,
                "deepseek-r1-qwen": _QWEN2}
_PRE_RULES = sorted(_GPT2_SPLIT | _DIGITS_THEN_GPT2_SPLIT | set(_REGEX_SPLIT))


class Tokenizer(Protocol):
    """What generation needs from a tokenizer."""

    name: str                     # for logs and reports: "gguf", "tokenizer.json at <folder>", "bytes"
    eos_ids: frozenset[int]       # generation stops at any of these
    special_ids: frozenset[int]   # never shown by decode
    pad_id: int | None
    bos_token: str                # the text chat templates receive as bos_token / eos_token ("" when none)
    eos_token: str
    chat_template: str | None
    chat_template_source: str     # where the template came from, for error messages

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` also what the post-processor adds (e.g. BOS)."""
        ...

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        ...

    def content_hash(self) -> str:
        """A hash of what decides the token ids (vocabulary, merges, special tokens): the run's manifest records it."""
        ...


class ByteTokenizer:
    """UTF-8 bytes are token ids 0-255; ids past 255 have no text and decode as ``<id>``."""

    name = "bytes"
    eos_ids: frozenset[int] = frozenset()
    special_ids: frozenset[int] = frozenset()
    pad_id = None
    bos_token = eos_token = ""
    chat_template = None
    chat_template_source = "bytes"

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise BuildError(f"model.arch.vocab_size: the byte tokenizer needs at least 256 ids, the model has {vocab_size}")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
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

    def content_hash(self) -> str:
        return hashlib.sha256(b"utf-8 bytes").hexdigest()


class _Backed:
    """A ``tokenizers.Tokenizer`` with the special tokens and chat template that go with it."""

    name: str
    chat_template: str | None
    chat_template_source: str
    eos_ids: frozenset[int]
    special_ids: frozenset[int]
    pad_id: int | None
    bos_token: str
    eos_token: str
    _cleanup = False  # transformers' clean_up_tokenization_spaces, for WordPiece-style decoders

    def __init__(self, tok):
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.id_span = max(vocab.values(), default=-1) + 1  # ids run from 0 to id_span - 1

    def content_hash(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    def _id(self, token: str) -> int | None:
        return self._tok.token_to_id(token) if token else None

    def _special(self, *ids: int | None) -> frozenset[int]:
        marked = (i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        return frozenset(i for i in (*marked, *ids, *self.eos_ids) if i is not None)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        text = self._tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=True)
        return _clean_up(text) if self._cleanup else text


class BPETokenizer(_Backed):
    """A byte-level BPE tokenizer rebuilt from GGUF fields (``ggml.tokens``, ``ggml.merges``, ...)."""

    def __init__(self, fields: dict[str, Any]):
        model, pre = fields.get("ggml.model"), fields.get("ggml.pre", "default")
        if model != "gpt2":
            raise CheckpointError(f"tokenizer.path: the GGUF's tokenizer model {model!r} is not supported (only "
                                  f"byte-level BPE, 'gpt2'); set tokenizer.path to {_WHAT_PATH_TAKES} of this model")
        if pre not in _PRE_RULES:
            raise CheckpointError(f"tokenizer.path: the GGUF's pre-tokenizer {str(pre)[:40]!r} is not supported "
                                  f"(only {', '.join(_PRE_RULES)}); set tokenizer.path to {_WHAT_PATH_TAKES} of "
                                  "this model")
        tokens: list[str] = fields["ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields.get("ggml.merges", [])]  # none: a BPE of single tokens
        rule = _REGEX_SPLIT.get(pre)
        tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                              ignore_merges=rule is not None and rule.ignore_merges))
        if rule is not None:
            if rule.nfc:
                tok.normalizer = normalizers.NFC()
            split = [pre_tokenizers.Split(Regex(rule.regex), behavior="isolated", invert=False),
                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        else:
            split = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
            if pre in _DIGITS_THEN_GPT2_SPLIT:
                split.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(split)
        tok.decoder = decoders.ByteLevel()
        kinds = fields.get("ggml.token_type", [])
        # llama.cpp's token types: 3 control (<|im_start|> and the like), 4 user-defined; both are matched whole.
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, kinds) if k == 3])
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, kinds) if k == 4])
        bos, eos = fields.get("ggml.bos_token_id"), fields.get("ggml.eos_token_id")
        around = [[tokens[i]] if i is not None and fields.get(flag) else []
                  for i, flag in ((bos, "ggml.add_bos_token"), (eos, "ggml.add_eos_token"))]
        if around[0] or around[1]:  # what llama.cpp adds around a text; transformers' post-processor does the same
            tok.post_processor = processors.TemplateProcessing(
                single=[*around[0], "$A", *around[1]], special_tokens=[(tokens[i], i) for i in {bos, eos} - {None}])
        super().__init__(tok)
        self.name = "gguf"
        self.eos_ids = frozenset(i for i in (eos,) if i is not None)
        self.bos_token = tokens[bos] if bos is not None else ""
        self.eos_token = tokens[eos] if eos is not None else ""
        self.pad_id = fields.get("ggml.padding_token_id")
        self.special_ids = self._special(bos, self.pad_id)
        self.chat_template = fields.get("chat_template")
        self.chat_template_source = "the GGUF's tokenizer.chat_template"


class HFTokenizer(_Backed):
    """A Hugging Face ``tokenizer.json``, with what the files saved beside it add.

    ``tokenizer_config.json`` (or the older ``special_tokens_map.json``) names the BOS, EOS and pad
    tokens, declares added tokens and may hold the chat template; ``chat_template.jinja`` or
    ``chat_template.json`` hold it in newer saves; ``generation_config.json`` adds EOS ids.
    """

    def __init__(self, file: Path):
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a plain Exception for any unreadable file
            raise CheckpointError(f"{file} is not a tokenizer ({one_line(e)}); "
                                  "expected a Hugging Face tokenizer.json") from e
        tok.no_padding()  # saved batch settings (BERT's pad and cut to 128, say): transformers drops them too
        tok.no_truncation()
        folder = file.parent
        config = {**_json(folder / "special_tokens_map.json"), **_json(folder / "tokenizer_config.json")}
        _add_declared(tok, config.get("added_tokens_decoder") or {}, folder / "tokenizer_config.json")
        super().__init__(tok)
        self.name = f"tokenizer.json at {folder}"
        self.bos_token, self.eos_token = _content(config.get("bos_token")), _content(config.get("eos_token"))
        self.pad_id = self._id(_content(config.get("pad_token")))
        generation = _json(folder / "generation_config.json").get("eos_token_id")
        extra = generation if isinstance(generation, list) else [generation]
        self.eos_ids = frozenset(i for i in (self._id(self.eos_token), *extra) if isinstance(i, int))
        self.special_ids = self._special(self._id(self.bos_token), self.pad_id)
        self.chat_template, self.chat_template_source = _chat_template(folder, config)
        # transformers skips this clean-up for BPE, where it would eat real spaces before punctuation
        self._cleanup = bool(config.get("clean_up_tokenization_spaces")) and type(tok.model).__name__ != "BPE"


def apply_chat_template(tokenizer: Tokenizer, prompt: str | list[dict[str, str]]) -> str:
    """The prompt as one user turn (or a conversation, as ``[{role, content}]`` messages) in the tokenizer's
    chat template, ready for the assistant's answer.

    Renders as transformers' ``apply_chat_template(..., add_generation_prompt=True, tokenize=False)``.

    Raises:
        CheckpointError: the template is malformed or raises while rendering.
    """
    try:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return _compiled(tokenizer.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True,
            bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    except Exception as e:  # noqa: BLE001 -- the template is the checkpoint's code: any failure in it is bad input
        line = f" at line {e.lineno}" if isinstance(e, jinja2.TemplateSyntaxError) else ""
        raise CheckpointError(f"{tokenizer.chat_template_source}: the chat template fails{line} ({one_line(e)}); "
                              "fix the template, or set chat=false to send prompts as they are") from e


def tokenizer_for(checkpoint, path: Path | None, vocab_size: int | None, synthetic: bool) -> Tokenizer:
    """The run's tokenizer: ``tokenizer.path`` when set, else the checkpoint's own (the GGUF's, else the
    ``tokenizer.json`` in its ``metadata_dir``), else UTF-8 bytes, for a synthetic model only.

    Args:
        checkpoint: the opened checkpoint, or None before it is opened.
        path: the config's ``tokenizer.path``: a folder holding ``tokenizer.json``, or the file.
        vocab_size: the model's vocabulary size, when known: the tokenizer's ids must fit in it.
        synthetic: whether the weights are synthetic, the only case where bytes stand in for a tokenizer.

    Raises:
        CheckpointError: ``tokenizer.path`` is not a tokenizer, a real checkpoint has none, or the tokenizer's
            ids go past ``vocab_size``.
        BuildError: a synthetic model without a vocabulary bytes can use.
    """
    folder = checkpoint.metadata_dir if checkpoint is not None else None
    fields = checkpoint.tokenizer_fields() if checkpoint is not None and path is None else None
    if path is not None:
        tokenizer = _from_path(path)
    elif fields is not None:
        tokenizer = BPETokenizer(fields)
    elif folder is not None and (folder / "tokenizer.json").is_file():
        tokenizer = HFTokenizer(folder / "tokenizer.json")
    elif synthetic:
        if not isinstance(vocab_size, int):
            raise BuildError("model.arch.vocab_size: the model has no token vocabulary the byte tokenizer can use; "
                             "it can be planned (mode=plan) but not run")
        return ByteTokenizer(vocab_size)
    else:
        where = f"no tokenizer.json in {folder}" if folder is not None else "no tokenizer beside its weights"
        raise CheckpointError(f"tokenizer.path: the checkpoint carries no tokenizer ({where}); "
                              f"set tokenizer.path to {_WHAT_PATH_TAKES} of this model")
    if vocab_size is not None and tokenizer.id_span > vocab_size:
        raise CheckpointError(f"tokenizer.path: {tokenizer.name} has ids up to {tokenizer.id_span - 1}, past the "
                              f"model's vocab_size of {vocab_size}; set tokenizer.path to this model's own tokenizer")
    log.info("Tokenizer: %s", tokenizer.name)
    return tokenizer


def _from_path(path: Path) -> HFTokenizer:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists():
        problem = "does not exist"
    elif not file.is_file():
        problem = "is a folder without tokenizer.json"
    elif file.suffix != ".json":
        problem = "is not a .json file"
    else:
        try:
            return HFTokenizer(file)
        except CheckpointError as e:
            raise CheckpointError(f"tokenizer.path: {e.lines[0]}") from e
    raise CheckpointError(f"tokenizer.path: {path} {problem}; point it at {_WHAT_PATH_TAKES}")


def _json(file: Path) -> dict[str, Any]:
    """A JSON object saved beside the tokenizer; {} when the file is absent."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not readable JSON ({one_line(e)}); fix or remove it") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}; expected an object; fix or remove it")
    return value


def _content(token: Any) -> str:
    """A special token as saved: a string, or an ``AddedToken`` dict with its ``content``; "" when none."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def _add_declared(tok, declared: dict[str, Any], config: Path) -> None:
    """Add the tokens ``added_tokens_decoder`` declares that ``tokenizer.json`` lacks, at the ids declared."""
    known = {t.content for t in tok.get_added_tokens_decoder().values()}
    for index, spec in declared.items():
        content = _content(spec) if isinstance(spec, dict) else ""
        if not content or content in known:
            continue
        special = bool(spec.get("special", False))
        token = AddedToken(content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                           rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", not special),
                           special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
        if str(tok.token_to_id(content)) != str(index):
            raise CheckpointError(f"{config}: added_tokens_decoder puts {content!r} at id {index}, but the "
                                  f"tokenizer gives it id {tok.token_to_id(content)}; the files do not belong together")


def _chat_template(folder: Path, config: dict[str, Any]) -> tuple[str | None, str]:
    """The chat template saved with the tokenizer, and the file it came from."""
    jinja_file, json_file = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    if json_file.is_file():
        template, source = _json(json_file).get("chat_template"), str(json_file)
    else:
        template, source = config.get("chat_template"), str(folder / "tokenizer_config.json")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise CheckpointError(f"{source}: chat_template names {sorted(map(str, named))} but no 'default'; "
                                  "name the one to use 'default', or set chat=false")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{source}: chat_template is a {type(template).__name__}; expected the template's "
                              "text, or a list of {name, template}")
    return template, source


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for spaced, tight in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, tight)
    return text


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``, transformers' marker of the assistant's tokens: the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """A chat template compiled in a sandbox, with the helpers transformers gives templates."""

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)
