"""Block reads: spans planned from tensor offsets, filled from the page cache or with O_DIRECT, same bytes either way."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import evict_page_cache
from runner.load.checkpoint.files import open_safetensors
from runner.load.checkpoint.reads import ALIGN, MERGE_GAP, Located, Span, SpanReader, aligned_buffer, plan_reads

F32 = torch.float32


def test_nearby_tensors_share_one_aligned_span_and_far_ones_do_not():
    a, b = Path("a.safetensors"), Path("b.safetensors")
    located = {
        "x": Located(a, 5000, 400, F32, (100,)),
        "y": Located(a, 5400, 800, F32, (200,)),                   # right after x: same span
        "far": Located(a, 5400 + 800 + MERGE_GAP + 4, 40, F32, (10,)),  # past the gap: a span of its own
        "z": Located(b, 100, 8, F32, (2,)),                        # another file
    }
    reads = plan_reads(located)
    assert reads.spans == (
        Span(a, 4096, 6200 - 4096, 0),            # from the page holding x to the end of y
        Span(a, (6200 + MERGE_GAP + 4) // ALIGN * ALIGN, (6200 + MERGE_GAP + 4) % ALIGN + 40, ALIGN),
        Span(b, 0, 108, 2 * ALIGN),
    )
    assert {k: (span, offset) for k, (span, offset, _) in reads.tensors.items()} == {
        "x": (0, 5000 - 4096), "y": (0, 5400 - 4096), "far": (1, (6200 + MERGE_GAP + 4) % ALIGN), "z": (2, 100)}
    assert reads.nbytes == 3 * ALIGN


def test_a_tensor_not_aligned_to_its_item_size_is_not_planned():
    assert plan_reads({"x": Located(Path("a"), 4098, 8, F32, (2,))}) is None


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    tensors = {f"h.{i}.{n}": torch.randn(s) for i in range(3) for n, s in (("w", (64, 33)), ("b", (33,)))}
    tensors["ids"] = torch.arange(7)
    for i, part in enumerate((["h.0.w", "h.0.b", "h.1.w"], ["h.1.b", "h.2.w", "h.2.b", "ids"])):
        save_file({k: tensors[k] for k in part}, str(tmp_path / f"part{i}.safetensors"))
    return open_safetensors(tmp_path), tensors


@pytest.mark.parametrize("direct", [True, False])
def test_spans_read_cold_and_warm_give_the_stored_tensors(checkpoint, direct):
    ckpt, expected = checkpoint
    keys = ["h.1.w", "h.1.b", "h.2.w", "ids"]  # across both files
    reads = plan_reads(ckpt.locate(keys))
    reader = SpanReader(direct=direct)
    buffer = aligned_buffer(reads.nbytes)
    evict_page_cache(ckpt.files)
    cold = reader.read(reads, buffer)
    assert reader.counts == ({"mapped": 0, "cached": 0, "direct": 2, "buffered": 0} if direct
                             else {"mapped": 0, "cached": 0, "direct": 0, "buffered": 2})
    for key in keys:
        assert torch.equal(cold[key], expected[key]) and cold[key].data_ptr() >= buffer.data_ptr()
    buffer.fill_(0)
    for f in ckpt.files:  # now in the page cache: copied from it, no device read
        f.read_bytes()
    warm = reader.read(reads, buffer)
    assert reader.counts["cached"] == 2
    assert all(torch.equal(warm[k], expected[k]) for k in keys)
    reader.close()


def _mappings(file: Path) -> int:
    return sum(str(file) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_cached_spans_are_used_in_place_and_unmapped_with_their_tensors(checkpoint):
    """On the CPU, bytes already in the page cache are not copied: mapped, and the mapping goes with the tensors."""
    import gc

    ckpt, expected = checkpoint
    keys = ["h.0.w", "h.0.b", "h.1.w"]  # all in part0
    reads = plan_reads(ckpt.locate(keys))
    file = ckpt.files[0]
    file.read_bytes()
    before = _mappings(file)
    reader = SpanReader()
    buffer = aligned_buffer(reads.nbytes)
    tensors = reader.read(reads, buffer, map_cached=True)
    assert reader.counts == {"mapped": 1, "cached": 0, "direct": 0, "buffered": 0}
    assert all(torch.equal(tensors[k], expected[k]) for k in keys)
    assert all(not buffer.data_ptr() <= t.data_ptr() < buffer.data_ptr() + buffer.numel() for t in tensors.values())
    assert _mappings(file) == before + 1
    del tensors
    gc.collect()
    assert _mappings(file) == before  # nothing piles up in resident memory
    evict_page_cache([file])
    cold = reader.read(reads, buffer, map_cached=True)  # not cached: read into the buffer, not mapped
    assert reader.counts["direct"] == 1 and torch.equal(cold["h.1.w"], expected["h.1.w"])


def test_a_truncated_file_is_a_short_read_and_a_bad_buffer_is_refused(checkpoint):
    ckpt, _ = checkpoint
    reads = plan_reads(ckpt.locate(["h.2.w", "h.2.b"]))
    reader = SpanReader()
    with pytest.raises(ValueError, match="aligned"):
        reader.read(reads, aligned_buffer(reads.nbytes + 1)[1:])
    file = ckpt.files[1]
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(OSError, match="short read"):
        reader.read(reads, aligned_buffer(reads.nbytes))


def test_renamed_and_transposed_tensors_are_read_in_place(tmp_path):
    """Under a name map, renames and transposed (Conv1D) weights are located in the inner checkpoint: a transposed
    weight is read into the buffer as stored and handed out as a view of it, never copied."""
    from runner.load.checkpoint.names import NameMap, RenamedCheckpoint, Source

    w, b = torch.randn(4, 6), torch.randn(6)
    save_file({"t.w": w, "t.b": b}, str(tmp_path / "m.safetensors"))
    inner = open_safetensors(tmp_path / "m.safetensors")
    renamed = RenamedCheckpoint(inner, NameMap({"w": Source("t.w", transposed=True), "b": Source("t.b")}))
    assert renamed.entries["w"].shape == (6, 4)
    located = renamed.locate(["w", "b"])
    assert located["b"] == inner.locate(["t.b"])["t.b"]
    assert located["w"].transposed and located["w"].shape == (4, 6)
    reads = plan_reads(located)
    buffer = aligned_buffer(reads.nbytes)
    got = SpanReader(direct=False).read(reads, buffer)
    assert torch.equal(got["w"], w.t()) and torch.equal(got["b"], b)
    assert got["w"].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # a view of the buffer
    assert torch.equal(renamed.read("w"), w.t()) and not renamed.read("w").is_contiguous()  # a view: no copy


def test_a_span_is_read_in_chunks_and_an_error_names_the_file_cut_short(checkpoint, monkeypatch):
    """One call moves at most ~2 GiB on Linux: spans are read in chunks (tiny ones here) until complete."""
    import runner.load.checkpoint.reads as reads_module

    ckpt, expected = checkpoint
    monkeypatch.setattr(reads_module, "CHUNK", ALIGN)
    keys = ["h.0.w", "h.0.b", "h.1.w", "h.1.b", "h.2.w"]  # spans of several pages, in both files
    reads = plan_reads(ckpt.locate(keys))
    assert max(span.need for span in reads.spans) > 2 * ALIGN
    for direct in (True, False):
        evict_page_cache(ckpt.files)
        got = SpanReader(direct=direct).read(reads, aligned_buffer(reads.nbytes))
        assert all(torch.equal(got[k], expected[k]) for k in keys)
    assert torch.equal(ckpt.read_uncached("h.1.w"), expected["h.1.w"])  # one tensor at a time, chunked too
    second = ckpt.files[1]
    second.write_bytes(second.read_bytes()[:300])
    with pytest.raises(OSError) as e:
        SpanReader().read(reads, aligned_buffer(reads.nbytes))
    assert e.value.filename == str(second) and "short read" in e.value.strerror


def test_descriptors_go_with_the_reader(checkpoint):
    import gc

    ckpt, _ = checkpoint
    gc.collect()  # earlier tests' readers go first
    before = len(os.listdir("/proc/self/fd"))
    reader = SpanReader()
    reads = plan_reads(ckpt.locate(["h.0.w", "h.2.b"]))
    reader.read(reads, aligned_buffer(reads.nbytes))
    assert len(os.listdir("/proc/self/fd")) > before
    del reader
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
