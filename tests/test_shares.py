"""Data-parallel rank files and their merge: row numbers, torn lines, a full disk."""
from __future__ import annotations

import errno
import os

import pytest

from runner.data import shares
from runner.errors import DiskFull


def test_a_full_disk_while_appending_a_rank_file_is_one_line_and_leaves_whole_lines(tmp_path, monkeypatch):
    out = shares.RankFile(tmp_path, 1)
    out.put(0, {"id": "a", "completion": "x"})
    assert out.flush() == 1
    real_write = os.write
    def full(fd, data):
        real_write(fd, data[:5])  # a few bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shares.os, "write", full)
    out.put(3, {"id": "b", "completion": "y"})
    with pytest.raises(DiskFull) as e:
        out.flush()
    assert e.value.lines[0].startswith(f"hydra.run.dir: {tmp_path} is full: appending 1 line(s) to "
                                       "predictions.rank-1.jsonl (1 written this run; resume=true goes on after them)")
    monkeypatch.undo()
    assert (tmp_path / "predictions.rank-1.jsonl").read_text() == '0\t{"id": "a", "completion": "x"}\n'
    assert shares.done_rows(tmp_path) == {0}


def test_the_merge_puts_every_rank_line_in_input_order_and_names_the_rows_missing(tmp_path):
    (tmp_path / "predictions.rank-0.jsonl").write_text('2\t{"id": "a", "n": 2}\n0\t{"id": "a", "n": 0}\n')
    (tmp_path / "predictions.rank-1.jsonl").write_text('1\t{"id": [1], "n": 1}\n4\t{"id": "e", "n": 4}\n5\t{"id"')
    merged = shares.merge(tmp_path, ["a", [1], "a", "d", "e", "f"])  # ids repeat and need not be hashable
    assert merged.lines == 4 and merged.missing == ["d", "f"]  # row 5's line was cut short: not there
    assert (tmp_path / "predictions.jsonl").read_text() == (
        '{"id": "a", "n": 0}\n{"id": [1], "n": 1}\n{"id": "a", "n": 2}\n{"id": "e", "n": 4}\n')
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(shares.DataError, match="line 1: not a line this job wrote"):
        (tmp_path / "predictions.rank-2.jsonl").write_text('{"id": "x"}\n')
        shares.merge(tmp_path, ["a"])
