"""A decoder layer's decode step in one call to the runner's C kernels (``runner/native/decode.c``), where the layer
and the step allow it; ``DecoderLayer.forward`` runs its Python form otherwise.

At one row of a small model, a decode step's ~60 small PyTorch operations per layer cost more than its weights
take to read; in C they cost next to nothing, and at 64 rows they are a third of the step. The layer qualifies
when it is Llama's shape (``decode.c`` lists the switches it takes) and every projection is in panels the kernels
read: kept quantized (``QuantLinear``) or packed in float32 or bfloat16 (``PanelLinear``); a step qualifies when
it is one new token per row, on the CPU, over a cache already written in float32 or bfloat16. The C step computes
in float32 throughout; a bfloat16 model's activations are widened on the way in and rounded on the way out, its
cache read and written in bfloat16. Pointers into the layer's weights are gathered once and gathered again if the
weights move (a layer streamed from disk lands somewhere new each time).
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn
from torch.nn import functional as F

from runner.errors import GenerateError
from runner.infer.kv_cache import LayerCache
from runner.load.packed import PanelLinear
from runner.native import Kernels, QLayer, QLinear, QStep, kernels
from runner.quant.formats import Panels
from runner.quant.modules import QuantLinear
from runner.zoo.parts import GatedMLP

UNDECIDED = object()  # a layer's C step before its weights are real (DecoderLayer.native)
STEP_DTYPES = (torch.float32, torch.bfloat16)  # activations and caches the C step reads
_PROJECTIONS = (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                ("down", "mlp.down_proj"))


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeLayer:
    """The C form of one ``DecoderLayer``'s decode step."""

    def __init__(self, layer: nn.Module, native: Kernels, projections: list[QuantLinear | PanelLinear]):
        self.layer, self.native, self.projections = layer, native, projections
        self._held = 0  # the first projection's address when the struct was built
        self._struct = QLayer()
        self._floats: dict[int, torch.Tensor] = {}  # float32 copies of a bfloat16 model's norms, by module

    @staticmethod
    def of(layer: nn.Module) -> NativeLayer | None:
        """The layer's C step, or None when its shape or weights are not what ``decode.c`` computes."""
        native = kernels()
        attention, mlp = layer.self_attn, layer.mlp
        s = attention.shape
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if s.qk_norm == "head":
            norms += [attention.q_norm, attention.k_norm]
        plain = (native is not None and not layer.sandwich and isinstance(mlp, GatedMLP) and not mlp.fused
                 and mlp.act is F.silu and not s.fused_qkv and s.qk_norm in (None, "head") and s.softcap is None
                 and all(n.offset == 0.0 and n.eps == layer.input_layernorm.eps for n in norms))
        if not plain:
            return None
        projections = [layer.get_submodule(name) for _, name in _PROJECTIONS]
        if not all(isinstance(p, PanelLinear) or (isinstance(p, QuantLinear) and isinstance(p.format, Panels))
                   for p in projections):
            return None
        floats = [p.bias for p in projections if isinstance(p, QuantLinear) and p.bias is not None]
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in floats):
            return None
        if not all(n.weight.dtype in STEP_DTYPES and n.weight.device.type == "cpu" for n in norms):
            return None
        assert native is not None
        return NativeLayer(layer, native, projections)

    def takes(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: LayerCache | None) -> bool:
        """Whether this call is a step the C form computes: one new token per row, fp32 on the CPU, over a cache
        already written in fp32."""
        return _takes_input(x, rope) and _takes_cache(cache, x.shape[0])

    def step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
             cache: LayerCache) -> torch.Tensor:
        """The layer's output for ``x [B, 1, hidden]``; this token's keys and values are written to ``cache``."""
        held: list[torch.Tensor] = []
        step = _step(x.shape[0], _tables(rope, held), _allowed(mask, x.shape[0], cache.length, held), cache, held)
        out = x.reshape(x.shape[0], -1).to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        self.native.decode_layer(self._weights(), step, out)
        cache.length += 1
        return out.to(x.dtype).view_as(x)

    def _weights(self) -> QLayer:
        """The struct of the layer's sizes and weights, gathered again when its weights have moved (a layer is one
        block: its weights arrive together, so the first projection's address stands for all of them)."""
        layer, projections = self.layer, self.projections
        address = _weight_of(projections[0]).data_ptr()
        if address == self._held:
            return self._struct
        attention, s = layer.self_attn, layer.self_attn.shape
        struct = QLayer(hidden=s.hidden, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                        intermediate=layer.mlp.down_proj.in_features, eps=layer.input_layernorm.eps,
                        scale=s.scale if s.scale is not None else s.head_dim ** -0.5,
                        input_norm=self._float(layer.input_layernorm),
                        post_norm=self._float(layer.post_attention_layernorm))
        if s.qk_norm == "head":
            struct.q_norm, struct.k_norm = self._float(attention.q_norm), self._float(attention.k_norm)
        for (field, _), p in zip(_PROJECTIONS, projections):
            if isinstance(p, PanelLinear):
                linear = QLinear(qweight=p.panels.data_ptr(), bias=_address(p.panel_bias), rows=p.out_features,
                                 columns=p.in_features, group=p.in_features,
                                 bits=32 if p.panels.dtype == torch.float32 else 16)
            else:
                fmt = p.format
                linear = QLinear(qweight=p.qweight.data_ptr(), scales=p.scales.data_ptr(), bias=_address(p.bias),
                                 rows=p.out_features, columns=p.in_features, group=fmt.group or p.in_features,
                                 bits=fmt.bits, flags=fmt.flags)
            setattr(struct, field, linear)
        self._struct, self._held = struct, address
        return struct

    def _float(self, norm: nn.Module) -> int:
        """The address of a norm's weight in float32: its own, or a copy made once (a bfloat16 model's, whose
        layers hold panels and so never move)."""
        weight = norm.weight
        if weight.dtype == torch.float32 and weight.is_contiguous():
            return weight.data_ptr()
        if id(norm) not in self._floats:
            self._floats[id(norm)] = weight.detach().float().contiguous()
        return self._floats[id(norm)].data_ptr()


class NativeStack:
    """The decode steps of a run of layers in one C call (``runner_decode_layers``).

    Per layer and step, Python spends ~40 us around the C call (the module call, its hook, the step's struct): 1.2
    ms of a 30-layer model's ~8 ms step at one row. Run together, only the structs are made per layer. The layers
    must run bare: a hook on any of them (dispatch's, kept on every block where anything streams; a diagnosis
    watching outputs) would be skipped, so ``bare`` sends those steps through the modules one by one.
    """

    def __init__(self, layers: list[NativeLayer]):
        self.layers = layers
        self._structs: list[QLayer] = []
        self._pointers = (ctypes.POINTER(QLayer) * len(layers))()
        self._steps = (QStep * len(layers))()

    @staticmethod
    def bare(modules: list[nn.Module]) -> list[NativeLayer] | None:
        """The modules' C steps when every one has one and none has a hook; else None."""
        if _global_hooks():
            return None
        natives = [m.native for m in modules if not _hooked(m)]
        return natives if len(natives) == len(modules) and all(isinstance(n, NativeLayer) for n in natives) else None

    def takes(self, x: torch.Tensor, ropes: list[tuple[torch.Tensor, torch.Tensor]],
              caches: list[LayerCache | None]) -> bool:
        return all(_takes_input(x, r) for r in {id(r): r for r in ropes}.values()) and all(
            _takes_cache(c, x.shape[0]) for c in caches)

    def step(self, x: torch.Tensor, ropes: list[tuple[torch.Tensor, torch.Tensor]],
             masks: list[torch.Tensor | None], caches: list[LayerCache]) -> torch.Tensor:
        """The run's output for ``x [B, 1, hidden]``; each layer's keys and values are written to its cache."""
        rows, held = x.shape[0], []
        # a rotary table or mask that layers share is made once
        tables = {key: _tables(r, held) for key, r in {id(r): r for r in ropes}.items()}
        allowed = {key: _allowed(m, rows, caches[0].length, held) for key, m in {id(m): m for m in masks}.items()}
        for i, (rope, mask, cache) in enumerate(zip(ropes, masks, caches)):
            self._steps[i] = _step(rows, tables[id(rope)], allowed[id(mask)], cache, held)
        structs = [layer._weights() for layer in self.layers]
        if any(a is not b for a, b in zip(structs, self._structs)) or not self._structs:
            for i, struct in enumerate(structs):
                self._pointers[i] = ctypes.pointer(struct)
            self._structs = structs
        out = x.reshape(rows, -1).to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        self.layers[0].native.decode_layers(self._pointers, self._steps, out)
        for cache in caches:
            cache.length += 1
        return out.to(x.dtype).view_as(x)


def _weight_of(p: QuantLinear | PanelLinear) -> torch.Tensor:
    return p.panels if isinstance(p, PanelLinear) else p.qweight


def _takes_input(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return (x.dim() == 3 and x.shape[1] == 1 and x.dtype in STEP_DTYPES and x.device.type == "cpu"
            and rope[0].dtype in STEP_DTYPES)


def _takes_cache(cache: LayerCache | None, rows: int) -> bool:
    return (cache is not None and cache.keys is not None and cache.keys.dtype in STEP_DTYPES
            and cache.keys.shape[0] == rows and cache.keys.is_contiguous() and cache.values is not None
            and cache.values.dtype == cache.keys.dtype and cache.values.is_contiguous()
            and (cache.prefix() is None or cache.prefix().keys.dtype == cache.keys.dtype))


def _tables(rope: tuple[torch.Tensor, torch.Tensor], held: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as float32 ``[rows or 1, rotated]`` rows in memory (kept alive in ``held``)."""
    cos, sin = (t.reshape(-1, t.shape[-1]).float().contiguous() for t in rope)
    held += (cos, sin)
    return cos, sin


def _allowed(mask: torch.Tensor | None, rows: int, column: int, held: list[torch.Tensor]) -> torch.Tensor | None:
    """``[rows, column + 1]`` bytes, 1 where a row may attend (kept alive in ``held``); None: everywhere."""
    if mask is None:
        return None
    allowed = mask.expand(rows, 1, 1, column + 1).reshape(rows, column + 1).to(torch.uint8).contiguous()
    held.append(allowed)
    return allowed


def _step(rows: int, tables: tuple[torch.Tensor, torch.Tensor], allowed: torch.Tensor | None, cache: LayerCache,
          held: list[torch.Tensor]) -> QStep:
    """The struct of one layer's step: its rows, rotary tables, mask, cache and shared prefix."""
    assert cache.keys is not None and cache.values is not None
    column = cache.length
    if column + 1 > cache.capacity:
        raise GenerateError(f"the KV cache holds {cache.capacity} positions and this step needs {column + 1}; "
                            "lower the prompt length or max_new_tokens, or raise runtime.seq_len")
    cos, sin = tables
    step = QStep(rows=rows, cos=cos.data_ptr(), sin=sin.data_ptr(), rotated=cos.shape[-1],
                 rope_stride=cos.shape[-1] if len(cos) > 1 else 0,  # one table row: every row's position
                 keys=cache.keys.data_ptr(), values=cache.values.data_ptr(), capacity=cache.capacity,
                 column=column, mask=allowed.data_ptr() if allowed is not None else None,
                 cache_bits=8 * cache.keys.element_size())
    prefix = cache.prefix()
    if prefix is not None:
        continues = prefix.rows.to(torch.uint8).contiguous()
        held.append(continues)
        step.prefix_keys, step.prefix_values = prefix.keys.data_ptr(), prefix.values.data_ptr()
        step.prefix_length, step.prefix_stride = prefix.keys.shape[2], prefix.keys.stride(1)
        step.prefix_rows = continues.data_ptr()
    return step


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module would run a hook (torch keeps them in these dicts; there is no public query)."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_pre_hooks or module._global_forward_hooks)
