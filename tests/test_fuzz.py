"""Fuzzing: every bad input to a parser, the config, the planner or the validator ends in a valid result or a
``RunnerError``, never another exception.

Targets: the safetensors header and index readers, the GGUF reader, the size parser, the composed config under
random overrides, and the planner and map validator under random models, budgets and pins. Each escape that fuzzing
found is kept below as an ``@example`` next to the test that found it.

CI runs a few dozen examples per target (``FUZZ_EXAMPLES`` unset, derandomized: the same cases every run).
``python bench/fuzz.py --examples 5000`` runs the same tests with that many per target, randomly, and prints how
many cases each target ran (written to ``FUZZ_COUNTS`` by this module).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hydra.errors import HydraException
from hypothesis import HealthCheck, example, given, settings, strategies as st
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file
from torch import nn

from runner.plan.blocks import Block, describe_model
from runner.load.checkpoint import gguf as gguf_reader
from runner.load.checkpoint.base import Checkpoint
from runner.load.checkpoint.files import INDEX_NAME, open_safetensors, safetensors_header
from runner.config import compose
from runner.errors import CheckpointError, ConfigError, MapError, PlanError, RunnerError
from runner.plan.hardware import Device, Hardware
from runner.plan.planner import PlanRequest, plan_device_map
from runner.config.sizes import LARGEST, UNITS, parse_size
from runner.plan.validate import check_map, load_map_file, resolve_pins
from test_gguf import save
from test_planner_properties import check_sound

COUNTS: Counter[str] = Counter()  # cases run per target, for bench/fuzz.py
SCALED = "FUZZ_EXAMPLES" in os.environ
HYDRA = float(os.environ.get("FUZZ_CONFIG_SHARE", 0.05))  # the share Hydra-composing targets take (~85 ms a case)


def budget(ci: int, share: float = 1.0) -> settings:
    """``ci`` examples in CI, derandomized; under bench/fuzz.py, ``FUZZ_EXAMPLES`` times ``share`` (slow targets
    such as Hydra composition take a share), drawn at random."""
    n = max(ci, int(int(os.environ["FUZZ_EXAMPLES"]) * share)) if SCALED else ci
    return settings(max_examples=n, deadline=None, database=None, derandomize=not SCALED, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    if os.environ.get("FUZZ_COUNTS"):
        Path(os.environ["FUZZ_COUNTS"]).write_text(json.dumps(dict(COUNTS)))


def one_line_error(e: RunnerError, *names: str) -> None:
    """A runner error a user can act on: no blank or multi-line finding, and it names what it is about."""
    assert e.lines and all(line and "\n" not in line for line in e.lines), e.lines
    assert not names or any(n in line for n in names for line in e.lines), (names, e.lines)


# ---------------------------------------------------------------- safetensors: headers, files, indexes

BASE_TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}


def _base_safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file(BASE_TENSORS, f"{d}/x.safetensors")
        return Path(d, "x.safetensors").read_bytes()


BASE = _base_safetensors()
BASE_HEADER_LEN = int.from_bytes(BASE[:8], "little")
BASE_HEADER = json.loads(BASE[8: 8 + BASE_HEADER_LEN])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["F32", "F16", "BF16", "I4", "F8_E8M0", "F4", "U8"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
offsets = st.lists(st.integers(-2, 2**64 + 1) | st.sampled_from([0, 4, 8, 24, 32]), max_size=3)
shapes = st.lists(st.integers(-1, 2**40) | st.sampled_from([0, 1, 2, 3, 4, 6]), max_size=4)


def open_and_read(path: Path) -> None:
    """Open a safetensors checkpoint and read every tensor both ways: each read tensor has its declared shape."""
    try:
        checkpoint = open_safetensors(path)
        for key, entry in checkpoint.entries.items():
            assert tuple(checkpoint.read(key).shape) == entry.shape
            assert torch.equal(checkpoint.read_uncached(key), checkpoint.read(key))
    except CheckpointError as e:
        one_line_error(e, str(path))


@settings(parent=budget(100))
@given(st.binary(max_size=200), st.sampled_from(["raw", "length", "huge-length"]))
def test_safetensors_from_random_bytes(body, framing):
    COUNTS["safetensors: random bytes"] += 1
    prefix = {"raw": b"", "length": len(body).to_bytes(8, "little"), "huge-length": b"\xff" * 8}[framing]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "model.safetensors")
        path.write_bytes(prefix + body)
        open_and_read(path)


@st.composite
def mutated_safetensors(draw) -> bytes:
    """The two-tensor file with its header edited (a field replaced, an entry added or dropped, metadata changed),
    its header bytes cut or flipped, or its data cut."""
    header = json.loads(json.dumps(BASE_HEADER))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["a", "b", "c", "__metadata__"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole", "drop"]))
        if field == "drop":
            header.pop(key, None)
        elif field == "whole" or key not in header or not isinstance(header[key], dict):
            header[key] = draw(json_values)
        else:
            header[key][field] = draw({"shape": shapes, "data_offsets": offsets}.get(field, json_values))
    body = json.dumps(header).encode()
    if draw(st.booleans()):
        body = bytearray(body)
        for _ in range(draw(st.integers(1, 4))):
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        body = bytes(body)
    data = BASE[8 + BASE_HEADER_LEN:]
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    declared = len(body) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**20]))
    return max(declared, 0).to_bytes(8, "little") + body + data


@settings(parent=budget(200))
@given(mutated_safetensors())
@example(BASE)
def test_safetensors_from_mutated_headers(blob):
    COUNTS["safetensors: mutated headers"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "model.safetensors")
        path.write_bytes(blob)
        open_and_read(path)
        if blob == BASE:
            assert open_safetensors(path).read("a").tolist() == BASE_TENSORS["a"].tolist()


@settings(parent=budget(80))
@given(json_values)
# escape: a header of JSON that is not an object gave AttributeError ('list' has no 'items'), outside the
# documented OSError/ValueError; bad data_offsets would reach the offload cache's slicing as a TypeError
@example([])
@example(None)
@example({"a": {"data_offsets": "x"}})
@example({"a": {"data_offsets": [0]}})
def test_safetensors_header_reader_raises_only_what_it_documents(header):
    COUNTS["safetensors: header reader"] += 1
    body = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "x.safetensors")
        path.write_bytes(len(body).to_bytes(8, "little") + body)
        try:
            start, tensors = safetensors_header(path)
        except ValueError:
            return
    assert start == 8 + len(body) and "__metadata__" not in tensors
    assert all(0 <= n for meta in tensors.values() for n in meta["data_offsets"])


shard_names = (st.sampled_from(["s1.safetensors", "s2.safetensors", "s1.safetensors"])
               | st.sampled_from(["", ".", "..", "../s1.safetensors", "/etc/passwd", "sub", "sub/", "fifo",
                                  "./s1.safetensors", "s1.safetensors/x", "a\x00b", "x" * 300, "s3.safetensors",
                                  "link-out", "loop"])
               | st.text(max_size=20))
index_docs = (st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["a", "b", "c", ""]) | st.text(
    max_size=5), shard_names, max_size=4)}) | st.fixed_dictionaries({"weight_map": json_values}) | json_values)


@settings(parent=budget(150))
@given(index_docs, st.booleans())
# escape: a shard name longer than the filesystem allows gave OSError (File name too long) from Path.exists
@example({"weight_map": {"a": "x" * 300}}, True)
@example({"weight_map": {"a": "\n"}}, False)  # a newline in a missing shard's name split the finding in two
def test_safetensors_index(doc, through_folder):
    COUNTS["safetensors: index"] += 1
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d, "ckpt")
        (folder / "sub").mkdir(parents=True)
        save_file({"a": torch.ones(2)}, str(folder / "s1.safetensors"))
        save_file({"b": torch.ones(3)}, str(folder / "s2.safetensors"))
        save_file({"c": torch.ones(1)}, f"{d}/outside.safetensors")
        os.mkfifo(folder / "fifo")
        (folder / "link-out").symlink_to(f"{d}/outside.safetensors")
        (folder / "loop").symlink_to(folder / "loop")
        index = folder / INDEX_NAME
        index.write_text(json.dumps(doc))
        try:
            checkpoint = open_safetensors(folder if through_folder else index)
        except CheckpointError as e:
            one_line_error(e, str(index))
            return
        assert {f.name for f in checkpoint.files} <= {"s1.safetensors", "s2.safetensors"}
        assert {k: checkpoint.entries[k].file.name for k in doc["weight_map"]} == doc["weight_map"]


# ---------------------------------------------------------------- GGUF


def write_gguf(path: Path, meta: dict[str, object], tensors: dict[str, np.ndarray], arch: str = "llama") -> None:
    """A GGUF file through the gguf package's own writer: metadata fields as given (None leaves one out)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value) if 0 <= value < 2**32 else writer.add_int64(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in tensors.items():
        if array.dtype == np.uint8:  # Q8_0 blocks
            writer.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    save(writer)


GOOD_META = {"llama.block_count": 1, "llama.embedding_length": 8, "llama.feed_forward_length": 16,
             "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1, "llama.context_length": 64,
             "tokenizer.ggml.tokens": ["a", "b"]}
GOOD_TENSORS = {
    "token_embd.weight": np.ones((2, 8), np.float32),
    "blk.0.attn_q.weight": np.arange(64, dtype=np.float16).reshape(8, 8),
    "blk.0.attn_k.weight": gguf.quants.quantize(np.ones((4, 32), np.float32), gguf.GGMLQuantizationType.Q8_0),
}


def _base_gguf() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        write_gguf(Path(d, "x.gguf"), GOOD_META, GOOD_TENSORS)
        return Path(d, "x.gguf").read_bytes()


BASE_GGUF = _base_gguf()


def open_gguf_fully(path: Path) -> None:
    """What a run asks of a GGUF file: open it, its config, tokenizer and dtype, and every tensor at its shape."""
    gguf_reader._reader.cache_clear()  # one reader per path and process: each case writes a new file there
    try:
        checkpoint = gguf_reader.open_gguf(path)
        config = checkpoint.config()
        assert all(isinstance(config[k], int) and config[k] > 0 for k in
                   ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
        checkpoint.tokenizer_fields()
        assert checkpoint.dtype in (torch.float32, torch.float16, torch.bfloat16)
        for name, entry in checkpoint.entries.items():
            assert tuple(checkpoint.read(name).shape) == entry.shape
    except CheckpointError as e:
        one_line_error(e, str(path))
    finally:
        gguf_reader._reader.cache_clear()  # let the memory map go before the folder does


@st.composite
def mutated_gguf(draw) -> bytes:
    """The small Llama GGUF with bytes flipped, 8-byte counts or lengths overwritten, bytes cut or inserted."""
    blob = bytearray(BASE_GGUF)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, max(len(blob) - 1, 0)))
        op = draw(st.sampled_from(["flip", "word", "cut", "insert"]))
        if op == "flip" and blob:
            blob[pos] = draw(st.integers(0, 255))
        elif op == "word":
            value = draw(st.sampled_from([0, 1, 7, 2**31, 2**40, 2**63, 2**64 - 1]))
            blob[pos: pos + 8] = value.to_bytes(8, "little")
        elif op == "cut":
            del blob[pos:]
        else:
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(blob)


@settings(parent=budget(200))
@given(mutated_gguf() | st.binary(max_size=120).map(lambda b: b"GGUF" + b))
@example(BASE_GGUF)
def test_gguf_from_mutated_files(blob):
    COUNTS["gguf: mutated files"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "model.gguf")
        path.write_bytes(blob)
        open_gguf_fully(path)


meta_values = (st.none() | st.integers(-5, 2**33) | st.sampled_from([0, 1, 2, 3, 4, 8, 16, 2**31])
               | st.floats(allow_nan=True, width=32) | st.text(max_size=6) | st.booleans()
               | st.lists(st.integers(0, 9), min_size=1, max_size=3))


@settings(parent=budget(100))
@given(st.fixed_dictionaries({k: meta_values | st.just(v) for k, v in GOOD_META.items()}),
       st.sampled_from(list(GOOD_TENSORS)), st.booleans())
# escapes: a missing metadata key gave KeyError from config(); a head count that does not divide the Q/K rows gave
# RuntimeError (or ZeroDivisionError) from the un-permute; a file without token_embd gave KeyError from dtype
@example({**GOOD_META, "llama.embedding_length": None}, "token_embd.weight", False)
@example({**GOOD_META, "llama.attention.head_count": 3}, "token_embd.weight", False)
@example({**GOOD_META, "llama.attention.head_count_kv": 0}, "token_embd.weight", False)
@example(GOOD_META, "token_embd.weight", True)
def test_gguf_with_random_metadata(meta, drop, dropped):
    COUNTS["gguf: random metadata"] += 1
    tensors = {k: v for k, v in GOOD_TENSORS.items() if not (dropped and k == drop)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "model.gguf")
        write_gguf(path, meta, tensors)
        open_gguf_fully(path)


def test_gguf_metadata_escapes_are_one_line_naming_the_key(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, {**GOOD_META, "llama.embedding_length": None}, GOOD_TENSORS)
    gguf_reader._reader.cache_clear()
    with pytest.raises(CheckpointError, match=r"GGUF metadata llama.embedding_length is missing; expected a positive"):
        gguf_reader.open_gguf(path).config()
    write_gguf(path, {**GOOD_META, "llama.attention.head_count": 3}, GOOD_TENSORS)
    gguf_reader._reader.cache_clear()
    with pytest.raises(CheckpointError, match=r"tensor blk.0.attn_q.weight of shape \[8, 8\] does not split into 3 "
                                              r"heads \(llama.attention.head_count\)"):
        gguf_reader.open_gguf(path).read("model.layers.0.self_attn.q_proj.weight")
    gguf_reader._reader.cache_clear()


# ---------------------------------------------------------------- sizes

size_texts = st.builds(
    lambda digits, fraction, space, unit: f"{digits}{'.' + fraction if fraction else ''}{space}{unit}",
    st.text("0123456789", min_size=1, max_size=40) | st.integers(0, 10**30).map(str)
    | st.integers(300, 500).map(lambda n: "9" * n),
    st.none() | st.text("0123456789", min_size=1, max_size=40),
    st.sampled_from(["", " ", "  "]), st.sampled_from(list(UNITS)))


@settings(parent=budget(500))
@given(size_texts | st.text(max_size=30))
@example("9" * 400 + "GB")  # escape (before this work): OverflowError; now one line
@example("0." + "0" * 400 + "1GiB")
def test_parse_size_gives_bytes_or_a_value_error(text):
    COUNTS["sizes: parse_size"] += 1
    try:
        n = parse_size(text)
    except ValueError as e:
        assert "\n" not in str(e) and "expected a" in str(e)
        return
    assert isinstance(n, int) and 0 <= n <= LARGEST


@settings(parent=budget(30, share=HYDRA))
@given(size_texts, st.sampled_from(["max_memory.cpu", "max_memory.disk", "+max_memory.0", "hardware.cpu_reserve"]))
@example("9" * 400 + "GB", "max_memory.cpu")
@example("1000000TiB", "max_memory.cpu")  # absurd but valid: taken (the hardware stage warns), no crash
def test_sizes_through_the_config(text, key):
    COUNTS["sizes: through config"] += 1
    try:
        cfg = compose(["mode=plan", "hardware=cpu", f"{key}={text}"])
    except ConfigError as e:
        one_line_error(e, key.lstrip("+"))
        return
    device = {"0": "cuda:0"}.get(key.split(".")[-1], key.split(".")[-1])
    figure = cfg.hardware.cpu_reserve if key == "hardware.cpu_reserve" else cfg.placement.max_memory[device]
    assert figure == parse_size(text)


# ---------------------------------------------------------------- config: random overrides

# Each key with values the schema takes and values it refuses, so that every generated case knows its verdict.
WHOLE = ["1", "2", "7", str(2**63), str(10**400)]  # the schema's integers have no maximum unless it says one
NOT_NUMBERS = ["true", "x", "''", "'1'", "[]", "[1,2]", "{}", "{a:1}", "${nope}", "${oc.env:FUZZ_UNSET_VAR}", "'${'",
               "cpu", "1.5GiB", "9" * 400 + "GB"]
NOT_WHOLE = ["1.5", "0.5", "1e400", "1e-320", "nan", "inf", *NOT_NUMBERS]
NOT_FRACTIONS = ["1e400", "nan", "inf", "null", *NOT_NUMBERS]
NOT_WORDS = ["1", "0", "-1", "1.5", "null", "true", "x", "''", "[]", "{}", "${nope}", "'${'", "1.5GiB"]
VERDICTS: dict[str, tuple[list[str], list[str]]] = {  # key: (taken, refused)
    "runtime.batch_size": (WHOLE, ["0", "-1", "null", *NOT_WHOLE]),
    "runtime.seq_len": (["null", *WHOLE], ["0", "-1", *NOT_WHOLE]),
    "runtime.micro_batches": (["1", "2", "7"], ["0", "-1", str(10**400), "null", *NOT_WHOLE]),
    "runtime.log_every": (["1", "0.5", "1.5", "7", "1e-320"], ["0", "-1", str(10**400), *NOT_FRACTIONS]),
    "task.max_new_tokens": (WHOLE, ["0", "-1", "null", *NOT_WHOLE]),
    "task.top_k": (["0", *WHOLE], ["-1", "null", *NOT_WHOLE]),
    "task.temperature": (["0", "1e-320", "0.5", "1", "1.5", "7"], ["-1", str(10**400), "9" * 400, *NOT_FRACTIONS]),
    "task.top_p": (["1e-320", "0.5", "1"], ["0", "-1", "1.5", "2", *NOT_FRACTIONS]),
    "task.min_p": (["0", "1e-320", "0.5", "1"], ["-1", "1.5", "2", *NOT_FRACTIONS]),
    "seed": (["-1", "0", *WHOLE], ["null", *NOT_WHOLE]),
    "data.window": (WHOLE, ["0", "-1", "null", *NOT_WHOLE]),
    "offload.prefetch": (["0", "1", "2", "7"], ["-1", str(2**63), "null", *NOT_WHOLE]),
    "max_memory.cpu": (["null", "0B", "1.5GiB", "1000000TiB"],
                       ["1", "0", "-1", "1.5", "9" * 400 + "GB", "true", "x", "''", "[]", "{}", "cpu", "${nope}"]),
    "max_memory.disk": (["null", "0B", "1.5GiB", "1000000TiB"], ["100", "-1GiB", "10GX", "x", "[]", "${nope}"]),
    "dtype": (["float16", "bfloat16", "float32"], ["float64", "fp16", *NOT_WORDS]),
    "data.on_error": (["skip", "fail"], ["ignore", *NOT_WORDS]),
    "placement.strategy": (["balanced", "balanced_low_0", "sequential"], ["fast", "Balanced", *NOT_WORDS]),
    "offload.allow_disk": (["true", "false"], ["1", "0", "null", "x", "''", "[]", "yes"]),
    "resume": (["true", "false"], ["1", "0", "null", "x", "''", "[]", "yes"]),
}


@st.composite
def judged_override(draw) -> tuple[str, str, bool]:
    """(key, value, whether the config takes it)."""
    key = draw(st.sampled_from(sorted(VERDICTS)))
    taken, refused = VERDICTS[key]
    ok = draw(st.booleans())
    return key, draw(st.sampled_from(taken if ok else refused)), ok


@settings(parent=budget(80, share=HYDRA))
@given(st.lists(judged_override(), min_size=1, max_size=3, unique_by=lambda case: case[0]))
# escapes: a 400-digit temperature or log_every passed the schema, then float() raised OverflowError; a NaN
# temperature was accepted
@example([("task.temperature", "9" * 400, False)])
@example([("runtime.log_every", "9" * 400, False)])
@example([("task.temperature", "nan", False)])
def test_config_under_random_overrides(cases):
    """Taken when every value is one the schema takes; else refused in one line naming a refused key."""
    COUNTS["config: random overrides"] += 1
    refused = [key.rsplit(".", 1)[-1] for key, _, ok in cases if not ok]  # a finding names at least the leaf
    try:
        cfg = compose(["mode=plan", *(f"{key}={value}" for key, value, _ in cases)])
    except RunnerError as e:
        assert refused, f"refused {cases}: {e.lines}"
        one_line_error(e, *refused)
        return
    assert not refused, f"took {cases}"
    assert cfg.mode == "plan" and cfg.runtime.batch_size >= 1
    if cfg.task.name == "generate":
        assert 0 <= cfg.task.sampling.temperature <= 1000


def test_config_groups_given_no_option_name_are_one_line():
    """Found by fuzzing: a group given a number or a list raised Hydra's own ValueError/TypeError."""
    for override in ("task=1", "hardware=[1,2]"):
        with pytest.raises(ConfigError, match=r"^overrides: .*; a config group .* takes an option name"):
            compose(["mode=plan", override])


def test_config_errors_found_by_fuzzing_are_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^task.temperature: 9{57}\.\.\. is not valid; expected 0 \(greedy\)"):
        compose(["task.temperature=" + "9" * 400])
    with pytest.raises(ConfigError, match=r"^overrides: .*; a config group .* takes an option name, e.g. task=score"):
        compose(["task=1"])
    with pytest.raises(RunnerError, match=r"^temperature: nan is not a finite number of at least 0"):
        compose(["task.temperature=nan"])


def test_hydra_composition_itself_fails_only_with_config_errors():
    """The path the CLI takes: Hydra's compose, then ``load_config``; Hydra's own errors are allowed there."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from runner.config import CONF_DIR, load_config

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="runner"):
        for ovs in (["runtime.log_every=" + "9" * 400], ["task.top_k=" + "9" * 400, "mode=plan"]):
            try:
                load_config(hydra_compose(config_name="config", overrides=ovs))
            except (RunnerError, HydraException, OmegaConfBaseException):
                pass


# ---------------------------------------------------------------- planner: absurd sizes, pins


@st.composite
def big_requests(draw) -> PlanRequest:
    """Blocks and budgets from 0 to past any device (2**62), maybe a tie, pins to any device, reserves, KV."""
    sizes = st.sampled_from([0, 1, 2**30, 2**40, 2**60, 2**62]) | st.integers(0, 2**62)
    n = draw(st.integers(1, 8))
    blocks = [Block(f"b{i}", "Block", draw(sizes), (f"b{i}.weight",)) for i in range(n)]
    if n > 1 and draw(st.booleans()):
        owner, follower = sorted(draw(st.sets(st.integers(0, n - 1), min_size=2, max_size=2)))
        blocks[follower] = Block(f"b{follower}", "Block", 0, (f"b{follower}.weight",), f"b{owner}")
    gpus = [Device(f"cuda:{i}", "gpu", draw(sizes)) for i in sorted(draw(st.sets(st.integers(0, 7), max_size=3)))]
    devices = gpus + [Device("cpu", "cpu", draw(sizes)), Device("disk", "disk", draw(sizes))]
    names = [d.name for d in devices]
    pins = {b.name: draw(st.sampled_from(names)) for b in blocks if draw(st.integers(0, 3)) == 0}
    for b in blocks:  # a tied pair is pinned as one, as resolve_pins leaves it
        if b.tied_to and (b.name in pins or b.tied_to in pins):
            pins[b.name] = pins[b.tied_to] = pins.get(b.tied_to, pins.get(b.name))
    reserves = {d: {"activations": draw(sizes)} for d in draw(st.sets(st.sampled_from(names), max_size=2))}
    kv = {b.name: draw(sizes) for b in blocks if draw(st.integers(0, 2)) == 0}
    return PlanRequest(tuple(blocks), tuple(devices), draw(st.sampled_from(["auto", "balanced", "balanced_low_0",
                                                                             "sequential"])),
                       gpus[0].name if gpus else "cpu", pins, reserves, kv, draw(st.booleans()),
                       draw(st.integers(0, 2)))


@settings(parent=budget(300))
@given(big_requests())
def test_planner_with_absurd_sizes_plans_soundly_or_refuses(request_):
    COUNTS["planner: absurd sizes and pins"] += 1
    try:
        plan = plan_device_map(request_)
    except PlanError as e:
        one_line_error(e)
        return
    check_sound(request_, plan)


# ---------------------------------------------------------------- validator: random models, maps and pins


@st.composite
def models(draw) -> nn.Module:
    """A random tree of Linear, Embedding and LayerNorm layers on the meta device, maybe with tied weights."""
    def tree(depth: int) -> nn.Module:
        kind = draw(st.sampled_from(["linear", "embedding", "norm", "seq", "seq"] if depth < 3 else ["linear"]))
        dim = draw(st.integers(1, 6))
        if kind == "linear":
            return nn.Linear(dim, draw(st.integers(1, 6)), bias=draw(st.booleans()))
        if kind == "embedding":
            return nn.Embedding(draw(st.integers(1, 6)), dim)
        if kind == "norm":
            return nn.LayerNorm(dim)
        return nn.Sequential(*(tree(depth + 1) for _ in range(draw(st.integers(1, 3)))))

    with torch.device("meta"):
        model = nn.Sequential(*(tree(1) for _ in range(draw(st.integers(1, 4)))))
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    if len(linears) > 1 and draw(st.booleans()):
        a, b = draw(st.permutations(linears))[:2]
        if a.weight.shape == b.weight.shape:
            b.weight = a.weight
    return model


devices_named = st.sampled_from(["cpu", "disk", "cuda:0", "cuda:1"]) | st.sampled_from(
    ["cuda:", "cuda:x", "cuda:-1", "cuda:99999999999999999999", "gpu", "", "CPU"]) | st.text(max_size=6)


@settings(parent=budget(200))
@given(models(), st.data())
def test_validator_with_random_models_maps_and_pins(model, data):
    COUNTS["validator: random models, maps, pins"] += 1
    layout = describe_model(model, data.draw(st.sampled_from([(), ("Sequential",)])), torch.float32)
    hardware = Hardware("fuzz", tuple(Device(n, k, data.draw(st.integers(0, 2**62))) for n, k in
                                      [("cuda:0", "gpu"), ("cuda:1", "gpu"), ("cpu", "cpu"), ("disk", "disk")]))
    known = sorted(layout.modules | set(layout.tensor_bytes))
    name = st.sampled_from(known) | st.text(max_size=8) | st.sampled_from(["", ".", "0.", "..", "0..weight"])
    pins = data.draw(st.dictionaries(name, devices_named, max_size=4))
    try:
        blocks = resolve_pins(pins, layout, hardware)
        assert set(blocks) <= {b.name for b in layout.blocks} and set(blocks.values()) <= set(hardware.names)
    except MapError as e:
        one_line_error(e, "device_map")
    full = data.draw(st.dictionaries(name, devices_named | st.sampled_from(hardware.names), max_size=6))
    kv = {b.name: data.draw(st.integers(0, 2**40)) for b in layout.blocks} if data.draw(st.booleans()) else None
    try:
        check = check_map(full, layout, hardware, {}, {}, kv, data.draw(st.integers(0, 2)))
    except MapError as e:
        one_line_error(e, "device_map")
        return
    assert list(check.block_devices) == [b.name for b in layout.blocks]
    assert set(check.block_devices.values()) <= set(hardware.names)


def test_a_pin_whose_name_holds_a_newline_is_named_on_one_line():
    """Found by the fuzzer above: ``device_map.<key>`` printed the key raw, so a newline in it split the finding."""
    with torch.device("meta"):
        layout = describe_model(nn.Sequential(nn.Linear(2, 2)), (), torch.float32)
    hardware = Hardware("fuzz", (Device("cpu", "cpu", 100), Device("disk", "disk", 100)))
    with pytest.raises(MapError) as raised:
        resolve_pins({"0\n": "cpu"}, layout, hardware)
    assert raised.value.lines == ("device_map.'0\\n': the model has no module or tensor named '0\\n'; "
                                  "did you mean 0?",)
    with pytest.raises(MapError) as raised:  # a block split across a device named "\n" and cpu, and "" beside "0"
        check_map({"0.weight": "\n", "0.bias": "cpu", "": "cpu"}, layout, hardware)
    one_line_error(raised.value)
    assert "device_map: '' and 0.bias overlap; map each module once" in raised.value.lines


@settings(parent=budget(60))
@given(json_values | st.fixed_dictionaries({"device_map": json_values}) | st.binary(max_size=40))
def test_map_file_reader(content):
    COUNTS["validator: map files"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "map.json")
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        try:
            device_map = load_map_file(path)
        except MapError as e:
            one_line_error(e, "map_file")
            return
    assert isinstance(device_map, dict) and all(isinstance(v, str) for v in device_map.values())


# ---------------------------------------------------------------- config.json under model=auto

class ConfigOnly(Checkpoint):
    """A checkpoint that is only its config.json, as ``model=auto`` reads it before anything is built."""

    def __init__(self, config):
        self._config, self.files, self.entries, self.ignored = config, [Path("/fuzz/model.safetensors")], {}, {}
        self.source, self.revision = "local", None

    def read(self, key):
        raise KeyError(key)

    def config(self):
        return self._config


BASE_CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=16,
                      intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "gemma3_text": dict(model_type="gemma3_text", vocab_size=64, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=4, max_position_embeddings=64),
}
config_values = (meta_values | st.integers(-2**40, 2**40) | st.dictionaries(st.sampled_from(["_target_", "rope_type",
                 "rope_theta", "factor", "full_attention"]), st.text(max_size=4) | st.integers(-2, 9), max_size=2)
                 | st.lists(st.sampled_from(["sliding_attention", "full_attention", 3]), max_size=4))
CONFIG_KEYS = sorted({k for c in BASE_CONFIGS.values() for k in c} | {"auto_map", "quantization_config", "mlp_only_layers",
                      "decoder_sparse_step", "rms_norm_eps", "attn_logit_softcapping", "partial_rotary_factor",
                      "tie_word_embeddings", "clip_qkv", "norm_topk_prob"})


@settings(parent=budget(60))
@given(st.sampled_from(sorted(BASE_CONFIGS)), st.dictionaries(st.sampled_from(CONFIG_KEYS), config_values, max_size=4))
# escapes: a string sliding_window reached the mask as a TypeError mid-run; a float()-able list gave TypeError
@example("gemma3_text", {"sliding_window": "wide"})
@example("qwen3_moe", {"rms_norm_eps": [1]})
@example("gemma3_text", {"query_pre_attn_scalar": 0})
@example("gemma3_text", {"architectures": 1, "model_type": None})
@example("qwen3_moe", {"num_hidden_layers": 2048, "num_experts": 4096})
def test_config_json_from_random_values_builds_or_is_one_line(family, changes):
    """Whatever a config.json holds, model=auto gives a model built on meta or one ``RunnerError`` line."""
    COUNTS["config.json: random values"] += 1
    from runner.config import ModelSpec
    from runner.load.architecture import choose_model
    from runner.load.build import build_skeleton, resolve_arch

    config = {**BASE_CONFIGS[family], **changes}
    spec = ModelSpec("auto", {}, (), auto=True)
    try:
        chosen = choose_model(spec, ConfigOnly(config), "fuzz")
        chosen = replace(chosen, arch=resolve_arch(chosen, config, "local"))
        if chosen.path == "zoo":  # transformers' classes are its own to validate
            build_skeleton(chosen)
    except RunnerError as e:
        one_line_error(e)
        assert len(e.lines) == 1
