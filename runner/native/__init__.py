"""The runner's C kernels: ``qmm.c``, matmuls over weights kept quantized, ``dense.c``, matmuls over float32 and
bfloat16 weights in the runner's own panels, and ``decode.c``, a decoder layer's decode step in one call. Built with the machine's C compiler on first use, kept in the cache.

Recipe (``kernels()``):
1. the build is named by a hash of the source, the compiler's version and the flags, so an edited source, another
   compiler or another CPU class builds anew, and a cache shared between machines never loads a foreign build;
2. it is compiled under a temporary name and renamed into place, so two processes building at once each end with
   a whole library;
3. it is loaded with ctypes. OpenMP comes from the ``libgomp.so.1`` torch has already loaded, so the kernels run
   on torch's threads (``torch.set_num_threads`` applies) instead of a second pool contending for the cores.

Without a C compiler (``CC``, else ``gcc``, ``cc``) the runner still works: ``kernels()`` is None, a warning says
once what that costs and what to install, and callers take their torch path. ``RUNNER_NATIVE=0`` turns the kernels
off on purpose (the torch path, to compare or debug).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from runner.config.resources import runner_cache
from runner.plan.arithmetic import cpu_flags
from runner.data.writes import reclaim, temp_path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "qmm.c", HERE / "dense.c", HERE / "decode.c")
HEADER = HERE / "native.h"
HALF, LOWS = 1, 2  # qmm's flags: the scales are fp16; lows are stored
_I64, _I32, _F32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


class QLinear(ctypes.Structure):
    """``decode.c``'s ``QLinear``: a projection held in panels."""

    _fields_ = [("qweight", _PTR), ("scales", _PTR), ("bias", _PTR), ("rows", _I64), ("columns", _I64),
                ("group", _I64), ("bits", _I32), ("flags", _I32)]


class QLayer(ctypes.Structure):
    """``decode.c``'s ``QLayer``: a decoder layer's sizes and weights."""

    _fields_ = [("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("intermediate", _I64),
                ("eps", _F32), ("scale", _F32), ("input_norm", _PTR), ("post_norm", _PTR), ("q_norm", _PTR),
                ("k_norm", _PTR), *((name, QLinear) for name in ("q", "k", "v", "o", "gate", "up", "down"))]


class QStep(ctypes.Structure):
    """``decode.c``'s ``QStep``: one decode step's rows, rotary tables, cache and masks."""

    _fields_ = [("rows", _I64), ("cos", _PTR), ("sin", _PTR), ("rope_stride", _I64), ("rotated", _I64),
                ("keys", _PTR), ("values", _PTR), ("capacity", _I64), ("column", _I64), ("mask", _PTR),
                ("prefix_keys", _PTR), ("prefix_values", _PTR), ("prefix_length", _I64), ("prefix_stride", _I64),
                ("prefix_rows", _PTR), ("cache_bits", _I64)]


@dataclass(frozen=True)
class Build:
    compiler: str
    flags: tuple[str, ...]

    @property
    def vectorized(self) -> bool:
        return "-mavx2" in self.flags


def build_for_this_cpu(portable: bool = False) -> Build | None:
    """The compiler and flags for this machine (None: no C compiler). ``portable``: no instruction-set flags."""
    compiler = next((c for c in (os.environ.get("CC"), "gcc", "cc") if c and shutil.which(c)), None)
    if compiler is None:
        return None
    flags = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fopenmp"]
    if not portable and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
        cpu = cpu_flags()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu:  # dense.c's 32-wide panels
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
            if "avx512_bf16" in cpu:  # and its bfloat16 dot products
                flags.append("-mavx512bf16")
    return Build(compiler, tuple(flags))


class Kernels:
    """The loaded library's entry points, with their argument types."""

    def __init__(self, path: Path, build: Build):
        self.path, self.build = path, build
        self._lib = ctypes.CDLL(str(path))
        self._qmm = self._lib.runner_qmm
        self._qmm.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I32, _I64, _I32, _PTR, _I64]
        self._qmm.restype = ctypes.c_int
        self._decode = self._lib.runner_decode_layer
        self._decode.argtypes = [ctypes.POINTER(QLayer), ctypes.POINTER(QStep), _PTR]
        self._decode.restype = ctypes.c_int
        self._decode_all = self._lib.runner_decode_layers
        self._decode_all.argtypes = [ctypes.POINTER(ctypes.POINTER(QLayer)), ctypes.POINTER(QStep), _I64, _PTR]
        self._decode_all.restype = ctypes.c_int
        self._dense = self._lib.runner_dense
        self._dense.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _I32, _PTR, _I64]
        self._dense.restype = ctypes.c_int
        self._dense_halves = self._lib.runner_dense_halves
        self._dense_halves.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64]
        self._dense_halves.restype = ctypes.c_int
        self._dense_pack = self._lib.runner_dense_pack
        self._dense_pack.argtypes = [_PTR, _I64, _I64, _I32, _PTR]
        self._dense_bytes = self._lib.runner_dense_bytes
        self._dense_bytes.argtypes = [_I64, _I64, _I32]
        self._dense_bytes.restype = _I64
        self.avx2 = bool(self._lib.runner_native_avx2())
        self.dense_bf16 = bool(self._lib.runner_dense_bf16())  # bfloat16 panels computed (AVX-512 BF16 built in)

    def qmm(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, rows: int, bits: int,
            group: int, flags: int) -> torch.Tensor:
        """``x [M, K]`` (fp32, rows contiguous) times a panel-held weight of ``rows`` output rows -> ``[M, rows]``.
        ``flags``: ``HALF`` (fp16 scales) | ``LOWS`` (lows stored), as ``native.h`` defines them.

        Raises:
            MemoryError: a per-thread buffer for one panel could not be allocated.
        """
        m, k = x.shape
        out = torch.empty(m, rows, dtype=torch.float32)
        if self._qmm(x.data_ptr(), m, k, x.stride(0), qweight.data_ptr(), scales.data_ptr(), rows, bits, group,
                     flags, out.data_ptr(), rows):
            raise MemoryError(f"could not allocate {k * 64} bytes for a quantized matmul's panel buffer")
        return out


    def dense_bits(self, dtype: torch.dtype, columns: int) -> int | None:
        """The panel width in bits for a weight of ``dtype`` and ``columns`` inputs, or None where ``dense`` does not
        compute it (bfloat16 needs AVX-512 BF16 and an even number of columns)."""
        if dtype == torch.float32:
            return 32
        if dtype == torch.bfloat16 and self.dense_bf16 and columns % 2 == 0:
            return 16
        return None

    def dense_nbytes(self, weight: torch.Tensor) -> int:
        """The bytes ``pack_dense`` makes of ``weight`` (its last panel is padded)."""
        n, k = weight.shape
        bits = self.dense_bits(weight.dtype, k)
        assert bits is not None, f"no dense panels for {weight.dtype} with {k} columns"
        return self._dense_bytes(n, k, bits)

    def pack_dense(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight [N, K]`` (float32, or bfloat16 where ``dense_bits`` allows) in ``dense.c``'s panels: a flat
        tensor of the weight's dtype."""
        n, k = weight.shape
        bits = self.dense_bits(weight.dtype, k)
        assert bits is not None, f"no dense panels for {weight.dtype} with {k} columns"
        weight = weight.contiguous()
        out = torch.empty(self.dense_nbytes(weight) * 8 // bits, dtype=weight.dtype)
        self._dense_pack(weight.data_ptr(), n, k, bits, out.data_ptr())
        return out

    def dense(self, x: torch.Tensor, panels: torch.Tensor, rows: int) -> torch.Tensor:
        """``x [M, K]`` (fp32, rows contiguous) times a weight of ``rows`` output rows held in ``panels``
        (``pack_dense``) -> ``[M, rows]`` fp32.

        Raises:
            MemoryError: the activations' bfloat16 copy could not be allocated.
        """
        m, k = x.shape
        out = torch.empty(m, rows, dtype=torch.float32)
        bits = 32 if panels.dtype == torch.float32 else 16
        if self._dense(x.data_ptr(), m, k, x.stride(0), panels.data_ptr(), rows, bits, out.data_ptr(), rows):
            raise MemoryError(f"could not allocate {m * k * 2} bytes for a dense matmul's bfloat16 activations")
        return out

    def dense_halves(self, x: torch.Tensor, panels: torch.Tensor, rows: int) -> torch.Tensor:
        """``dense`` for bfloat16 ``x [M, K]`` (rows contiguous) and bfloat16 panels -> ``[M, rows]`` bfloat16,
        summed in float32 and rounded once, as torch's bf16 linear; neither side is widened in memory."""
        m, k = x.shape
        out = torch.empty(m, rows, dtype=torch.bfloat16)
        assert panels.dtype == torch.bfloat16 and self.dense_bf16
        self._dense_halves(x.data_ptr(), m, k, x.stride(0), panels.data_ptr(), rows, out.data_ptr(), rows)
        return out

    def decode_layer(self, layer: QLayer, step: QStep, x: torch.Tensor) -> None:
        """One decode step of a layer over ``x [M, hidden]`` (fp32, contiguous), updated in place.

        Raises:
            MemoryError: the step's work space could not be allocated.
        """
        if self._decode(ctypes.byref(layer), ctypes.byref(step), x.data_ptr()):
            raise MemoryError(f"could not allocate a decode step's work space for {step.rows} row(s)")

    def decode_layers(self, layers: ctypes.Array, steps: ctypes.Array, x: torch.Tensor) -> None:
        """``decode_layer`` for each of ``layers`` (pointers to ``QLayer``) in turn, with ``steps[i]``, in one call.

        Raises:
            MemoryError: a step's work space could not be allocated.
        """
        if self._decode_all(layers, steps, len(layers), x.data_ptr()):
            raise MemoryError(f"could not allocate a decode step's work space for {steps[0].rows} row(s)")


def build(spec: Build, folder: Path) -> Path:
    """Compile the kernels with ``spec`` into ``folder`` (named by a hash of what went into it), unless there.

    Raises:
        OSError: the compiler failed (its message is in the error) or the folder cannot be written.
    """
    version = subprocess.run([spec.compiler, "--version"], capture_output=True, text=True).stdout
    texts = [p.read_text() for p in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*texts, version, *spec.flags]).encode()).hexdigest()[:16]
    path = folder / f"kernels-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    reclaim(folder)  # a build cut short by a killed process
    tmp = temp_path(path)
    done = subprocess.run([spec.compiler, *spec.flags, *map(str, SOURCES), "-o", str(tmp), "-lm"],
                          capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{spec.compiler} failed on {', '.join(p.name for p in SOURCES)}: "
                      f"{done.stderr.strip().splitlines()[-1:]}")
    tmp.replace(path)
    return path


@functools.cache
def kernels() -> Kernels | None:
    """This machine's kernels, built once per cache (None, with a warning, when they cannot be built; None,
    quietly, under ``RUNNER_NATIVE=0``)."""
    if os.environ.get("RUNNER_NATIVE", "1") == "0":
        return None
    spec = build_for_this_cpu()
    if spec is None:
        log.warning("no C compiler (set CC, or install gcc): quantized weights are dequantized for every matmul "
                    "instead of computed by the runner's kernels, several times slower")
        return None
    try:
        return Kernels(build(spec, runner_cache() / "native"), spec)
    except OSError as e:
        log.warning("the runner's C kernels could not be built (%s): quantized weights are dequantized for every "
                    "matmul instead, several times slower", e)
        return None
