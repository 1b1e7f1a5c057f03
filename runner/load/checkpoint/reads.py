"""Block reads: the tensors of one block read with a few large calls into a reused, page-aligned buffer.

Disk blocks are read again on every forward. Through a memory map their pages would pile up in
resident memory; through the page cache the reading thread pays system CPU to fill the cache and
copy out of it, CPU taken from the compute on a small machine. So:

- a block's tensors are grouped into spans, one per run of nearby bytes in a file, widened to
  ``ALIGN`` at both ends, and each span is filled by one ``preadv`` at a fixed place in the buffer;
- a span that is all in the page cache (asked with ``cachestat``, which reads nothing) is mapped
  and used in place when the block computes on the CPU: no copy, and the mapping goes with the
  block's tensors, so its pages never pile up in resident memory; for a GPU it is copied into
  the (pinned) buffer;
- any other span is read with ``O_DIRECT``: the device writes straight into the buffer and no
  cache is filled. ``direct=False``, or a filesystem that refuses ``O_DIRECT``, reads through
  the page cache instead, so later forwards find it there.

Where ``cachestat`` is missing (Linux before 6.5), a ``preadv(RWF_NOWAIT)`` into the buffer
stands in for it: it copies what is cached and fails at once on what is not.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ALIGN = 4096         # O_DIRECT's alignment of buffer address, file offset and length on common devices
MERGE_GAP = 1 << 20  # tensors closer than this in a file are read by one call, the bytes between them too


@dataclass(frozen=True)
class Located:
    """Where one tensor's bytes sit in a file, and what they are."""

    file: Path
    start: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]    # as stored
    transposed: bool = False  # used as a transposed view of the stored 2-D tensor (``runner.load.checkpoint.names``)

    def view(self, stored: torch.Tensor) -> torch.Tensor:
        """The tensor as the model uses it, from its bytes as stored: a view, never a copy."""
        return stored.t() if self.transposed else stored


@dataclass(frozen=True)
class Span:
    """One read: ``need`` bytes of ``file`` from the aligned offset ``begin``, into the buffer at ``at``."""

    file: Path
    begin: int
    need: int
    at: int

    @property
    def length(self) -> int:
        return -(-self.need // ALIGN) * ALIGN


@dataclass(frozen=True)
class BlockReads:
    spans: tuple[Span, ...]
    tensors: dict[str, tuple[int, int, Located]]  # key -> (its span, its offset in the span, what it is)
    nbytes: int                                   # the buffer it needs


def plan_reads(located: dict[str, Located]) -> BlockReads | None:
    """Group tensors into aligned spans, in file order. None if a tensor could not be viewed in place
    (its offset in the file is not a multiple of its item size)."""
    if any(loc.start % loc.dtype.itemsize for loc in located.values()):
        return None
    spans: list[Span] = []
    tensors: dict[str, tuple[int, int, Located]] = {}
    at = 0
    for key, loc in sorted(located.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
        last = spans[-1] if spans else None
        if last is None or last.file != loc.file or loc.start - (last.begin + last.need) > MERGE_GAP:
            if last is not None:
                at += last.length
            last = Span(loc.file, loc.start // ALIGN * ALIGN, 0, at)
            spans.append(last)
        spans[-1] = replace(last, need=max(last.need, loc.start + loc.nbytes - last.begin))
        tensors[key] = (len(spans) - 1, loc.start - last.begin, loc)
    if spans:
        at += spans[-1].length
    return BlockReads(tuple(spans), tensors, at)


def aligned_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` whose first byte is ``ALIGN``-aligned, as ``O_DIRECT`` needs."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = -raw.data_ptr() % ALIGN
    return raw[shift: shift + nbytes]


class SpanReader:
    """Reads ``BlockReads``, through descriptors kept open for the run. Thread-safe."""

    def __init__(self, direct: bool = True, use_cache: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        # False: every span read straight from the device, cached or not. Using a cached span (mapped, or copied
        # out) can set off the kernel's readahead past it, into bytes nobody asked for.
        self.use_cache = use_cache or not self.direct
        self.nowait = hasattr(os, "RWF_NOWAIT")
        self._fds: dict[tuple[Path, bool], int] = {}
        self._sizes: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.counts = {"mapped": 0, "cached": 0, "direct": 0, "buffered": 0}  # spans, by how they were read
        weakref.finalize(self, close_all, self._fds)  # descriptors go with the reader

    def read(self, reads: BlockReads, buffer: torch.Tensor, map_cached: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of ``reads``: viewed in ``buffer`` (``aligned_buffer`` of at least ``reads.nbytes``) or,
        with ``map_cached``, in a read-only mapping of a span that is all in the page cache.

        Raises:
            OSError: a file is shorter than its header says, or cannot be read (``filename`` names it).
        """
        if buffer.numel() < reads.nbytes or buffer.data_ptr() % ALIGN:
            raise ValueError(f"a buffer of {reads.nbytes} bytes, {ALIGN}-aligned, is needed")
        view = memoryview(buffer.numpy())
        places: list[torch.Tensor] = []  # where each span's bytes are now
        cold = False  # once a probe misses, the rest of the block is read directly: a miss starts readahead
        for span in reads.spans:
            if not span.need:  # only empty tensors
                places.append(buffer[span.at: span.at])
                continue
            try:
                place, missed = self._read_span(span, view, buffer, map_cached, cold)
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), str(span.file)) from e
            places.append(place)
            cold = cold or missed
        return {key: loc.view(places[i][offset: offset + loc.nbytes].view(loc.dtype).view(loc.shape))
                for key, (i, offset, loc) in reads.tensors.items()}

    def _read_span(self, span: Span, view: memoryview, buffer: torch.Tensor, map_cached: bool,
                   cold: bool) -> tuple[torch.Tensor, bool]:
        """One span's bytes, and whether a page-cache probe missed."""
        into = view[span.at: span.at + span.need]
        cached = _cached(self._fd(span.file, False), span) if self.use_cache else False
        if cached and map_cached:
            try:
                mapped = self._map(span)
                self.counts["mapped"] += 1
                return mapped, False
            except (OSError, ValueError):  # no mapping to be had (e.g. the map count limit): read it instead
                pass
        got, how, missed = -1, "cached", False
        if cached:
            got = pread_full(self._fd(span.file, False), into, span.begin, span.need)
        elif cached is None and self.nowait and not cold:
            got = self._probe(span, into)
            missed = got < span.need
        if got < span.need:
            got, how = self._read(span, view[span.at: span.at + span.length])
        if got < span.need:
            raise OSError(f"short read: {span.need} bytes expected at {span.begin}, got {max(got, 0)}")
        self.counts[how] += 1
        return buffer[span.at: span.at + span.need], missed

    def close(self) -> None:
        with self._lock:
            close_all(self._fds)

    def _map(self, span: Span) -> torch.Tensor:
        """The span's bytes, mapped read-only and populated from the page cache in one call. The mapping is
        undone when the last tensor viewing it goes."""
        fd = self._fd(span.file, False)
        size = self._sizes.get(span.file)
        if size is None:
            size = self._sizes[span.file] = os.fstat(fd).st_size
        if span.begin + span.need > size:
            raise OSError(f"short read: {span.need} bytes expected at {span.begin}, the file has {size}")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(fd, span.need + span.begin % mmap.ALLOCATIONGRANULARITY, flags=flags,
                           prot=mmap.PROT_READ, offset=span.begin - span.begin % mmap.ALLOCATIONGRANULARITY)
        with warnings.catch_warnings():  # read-only on purpose: nothing writes to weights
            warnings.simplefilter("ignore", UserWarning)
            whole = torch.frombuffer(mapped, dtype=torch.uint8)
        return whole[span.begin % mmap.ALLOCATIONGRANULARITY:]

    def _probe(self, span: Span, into: memoryview) -> int:
        try:
            return os.preadv(self._fd(span.file, False), [into], span.begin, os.RWF_NOWAIT)
        except BlockingIOError:  # not (all) in the page cache
            return -1
        except OSError:  # RWF_NOWAIT unsupported here: never probe again
            self.nowait = False
            return -1

    def _read(self, span: Span, into: memoryview) -> tuple[int, str]:
        if self.direct:
            fd = self._fd(span.file, True)
            if fd >= 0:
                try:
                    return pread_full(fd, into, span.begin, span.need), "direct"
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False  # an alignment this device does not take: buffered from now on
        return pread_full(self._fd(span.file, False), into[: span.need], span.begin, span.need), "buffered"

    def _fd(self, file: Path, direct: bool) -> int:
        fd = self._fds.get((file, direct))
        if fd is None:
            with self._lock:
                fd = self._fds.get((file, direct))
                if fd is None:
                    try:
                        fd = os.open(file, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                    except OSError:
                        if not direct:
                            raise
                        fd = -1  # a filesystem without O_DIRECT (e.g. some tmpfs): buffered reads
                    self._fds[(file, direct)] = fd
        return fd


CHUNK = 1 << 30  # one call moves at most ~2 GiB on Linux; whole GiBs keep O_DIRECT offsets aligned


def pread_full(fd: int, into: memoryview, offset: int, need: int) -> int:
    """Read into ``into`` from ``offset`` until ``need`` bytes are in, or the file ends; the bytes read.
    One ``preadv`` moves at most ~2 GiB on Linux, so bigger reads take several."""
    got = 0
    while got < need:
        n = os.preadv(fd, [into[got: got + CHUNK]], offset + got)
        if n <= 0:
            break
        got += n
    return got


def close_all(fds: dict) -> None:
    for fd in fds.values():
        if fd >= 0:
            os.close(fd)
    fds.clear()


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # the same number on every Linux architecture (since 6.5)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_syscall = None
if sys.platform.startswith("linux"):  # the number means something else elsewhere
    try:
        _syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        pass


def _cached(fd: int, span: Span) -> bool | None:
    """Whether every page of the span is in the page cache; None if the kernel cannot say."""
    global _syscall
    if _syscall is None:
        return None
    stat = _CacheStat()
    first = span.begin // _PAGE * _PAGE
    pages = -(-(span.begin + span.need - first) // _PAGE)
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(first, pages * _PAGE)), ctypes.byref(stat), 0):
        _syscall = None  # ENOSYS (an older kernel), or a filesystem that cannot say: never ask again
        return None
    return stat.nr_cache >= pages
