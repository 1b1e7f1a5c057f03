"""The zoo's families: how each reads its ``config.json`` into a ``DecoderShape``.

A family is a few switches over ``runner.zoo.decoder.Decoder``. ``FAMILIES`` is what ``model=auto`` picks from,
by the config's ``model_type``. A config whose variant a family does not implement (a rope scaling it lacks,
clipped q/k/v...) raises ``NotInZoo``, and ``model=auto`` takes transformers' own class for it instead.
Both ``config.json`` layouts are read: transformers 5's (``rope_parameters``, ``layer_types``) and the older one
(``rope_theta`` and ``rope_scaling`` at the top, windows from per-family rules).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runner.zoo.decoder import Decoder, DecoderShape
from runner.zoo.parts import ACTIVATIONS, AttentionShape, ExpertsShape, Rope


class NotInZoo(Exception):
    """A config the family's fast path does not implement; the message says which setting."""


Config = dict[str, Any]


def _get(config: Config, *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` the config sets (not null), else ``default``."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _required(config: Config, key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"{key} is missing; the family needs it")
    return config[key]


def rope_of(config: Config, layer_type: str | None = None, theta: float = 10000.0) -> Rope:
    """The rotary embedding a config describes, for layers of ``layer_type`` where it gives one per type."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]  # Gemma 3 in transformers 5: one set per layer type
    if not isinstance(params, dict):
        params = dict(config.get("rope_scaling") or {})
    theta = _get(params, "rope_theta", default=_get(config, "rope_theta", default=theta))
    kind = _get(params, "rope_type", "type", default="default")
    if kind not in ("default", "linear", "llama3"):
        raise NotInZoo(f"rope_type {kind!r}")
    share = _get(params, "partial_rotary_factor", default=_get(config, "partial_rotary_factor", default=1.0))
    if kind == "default":
        return Rope(theta=float(theta), rotary_share=float(share))
    return Rope(theta=float(theta), rotary_share=float(share), kind=kind, factor=float(_required(params, "factor")),
                low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                original_context=int(params.get("original_max_position_embeddings", 8192)))


def windows_of(config: Config, layers: int, sliding: Callable[[int], bool]) -> tuple[int | None, ...]:
    """Each layer's sliding window: from ``layer_types`` where the config lists them, else the family's rule."""
    window = config.get("sliding_window") or None
    types = config.get("layer_types")
    if isinstance(types, list):
        return tuple(window if t == "sliding_attention" else None for t in types)
    return tuple(window if sliding(i) else None for i in range(layers))


def _attention(config: Config, **switches: Any) -> AttentionShape:
    heads = _required(config, "num_attention_heads")
    hidden = _required(config, "hidden_size")
    head_dim = _get(config, "head_dim", default=hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                    and heads else 0)
    bias = bool(config.get("attention_bias", False))
    return AttentionShape(hidden=hidden, heads=heads, kv_heads=_get(config, "num_key_value_heads", default=heads),
                          head_dim=head_dim, norm_eps=float(_get(config, "rms_norm_eps", default=1e-6)),
                          **{"qkv_bias": bias, "out_bias": bias, **switches})


def _activation(config: Config) -> str:
    name = _get(config, "hidden_activation", "hidden_act", default="silu")
    if name not in ACTIVATIONS:
        raise NotInZoo(f"activation {name!r}")
    return name


def _shape(config: Config, attention: AttentionShape, tie_default: bool, **switches: Any) -> DecoderShape:
    layers = _required(config, "num_hidden_layers")
    return DecoderShape(
        vocab_size=_required(config, "vocab_size"), hidden=_required(config, "hidden_size"),
        intermediate=_required(config, "intermediate_size"), layers=layers, attention=attention,
        context=_get(config, "max_position_embeddings", default=4096),
        norm_eps=float(_get(config, "rms_norm_eps", default=1e-6)),
        tie_embeddings=bool(_get(config, "tie_word_embeddings", default=tie_default)),
        activation=_activation(config), **{"ropes": (rope_of(config),) * layers, **switches})


def _every_layer(i: int) -> bool:
    return True


def _qwen_sliding(config: Config) -> Callable[[int], bool]:
    """Qwen2/3 before ``layer_types``: a window from layer ``max_window_layers`` on, when ``use_sliding_window``."""
    start = config.get("max_window_layers") or 0
    return lambda i: bool(config.get("use_sliding_window")) and i >= start


def _sparse_layers(config: Config, layers: int) -> tuple[bool, ...]:
    """Qwen-MoE: experts in every ``decoder_sparse_step``-th layer, except those ``mlp_only_layers`` lists."""
    every = config.get("decoder_sparse_step") or 1
    dense = set(config.get("mlp_only_layers") or ())
    return tuple(i not in dense and (i + 1) % every == 0 for i in range(layers))


def _experts(config: Config, intermediate_key: str, normalize: bool, shared: int = 0) -> ExpertsShape:
    return ExpertsShape(experts=_required(config, "num_local_experts" if config.get("num_local_experts") is not None
                                          else "num_experts"),
                        per_token=_required(config, "num_experts_per_tok"),
                        intermediate=_required(config, intermediate_key), normalize=normalize,
                        shared_intermediate=shared, activation=_activation(config))


def _no_mlp_bias(config: Config) -> None:
    if config.get("mlp_bias"):
        raise NotInZoo("mlp_bias")


class Llama(Decoder):
    """Llama 1-3, SmolLM, TinyLlama: the plain recipe (RMSNorm, rotary, grouped-query attention, SwiGLU)."""

    model_types = ("llama",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        _no_mlp_bias(config)
        layers = _required(config, "num_hidden_layers")
        return _shape(config, _attention(config), tie_default=False, windows=(None,) * layers)


class Mistral(Decoder):
    """Mistral: Llama with a sliding window on every layer (when ``sliding_window`` is set)."""

    model_types = ("mistral",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        return _shape(config, _attention(config), tie_default=False, windows=windows_of(config, layers, _every_layer))


class Qwen2(Decoder):
    """Qwen2 and Qwen2.5: Llama with biases on q, k and v."""

    model_types = ("qwen2",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        attention = _attention(config, qkv_bias=True, out_bias=False)
        return _shape(config, attention, tie_default=False, windows=windows_of(config, layers, _qwen_sliding(config)))


class Qwen3(Decoder):
    """Qwen3: Llama with an RMSNorm on each query and key head."""

    model_types = ("qwen3",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        return _shape(config, _attention(config, qk_norm="head"), tie_default=False,
                      windows=windows_of(config, layers, _qwen_sliding(config)))


def _gemma_attention(config: Config, **switches: Any) -> AttentionShape:
    scalar = _get(config, "query_pre_attn_scalar", default=_get(config, "head_dim", default=256))
    return _attention(config, norm_offset=1.0, scale=float(scalar) ** -0.5,
                      softcap=config.get("attn_logit_softcapping"), **switches)


class Gemma2(Decoder):
    """Gemma 2: norms as ``1 + weight``, sandwich norms, scaled embeddings, GeGLU, soft-capped attention and
    logits, sliding-window layers interleaved with global ones."""

    model_types = ("gemma2",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        return _shape(config, _gemma_attention(config), tie_default=True, norm_offset=1.0, sandwich_norms=True,
                      scale_embeddings=True, final_softcap=config.get("final_logit_softcapping"),
                      windows=windows_of(config, layers, lambda i: i % 2 == 0))


class Gemma3(Decoder):
    """Gemma 3 (text): Gemma 2 with Gemma norms on q and k, five sliding layers to each global one, and a
    rotary base of their own for the sliding layers."""

    model_types = ("gemma3_text",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        pattern = _get(config, "sliding_window_pattern", "_sliding_window_pattern", default=6)
        windows = windows_of(config, layers, lambda i: (i + 1) % pattern != 0)
        full = rope_of(config, "full_attention", theta=1_000_000.0)
        local = rope_of(config, "sliding_attention", theta=float(config.get("rope_local_base_freq") or 10000.0))
        if config.get("rope_local_base_freq") is not None and not isinstance(config.get("rope_parameters"), dict):
            local = Rope(theta=float(config["rope_local_base_freq"]))  # the older layout: no scaling on local layers
        return _shape(config, _gemma_attention(config, qk_norm="head"), tie_default=True, norm_offset=1.0,
                      sandwich_norms=True, scale_embeddings=True, final_softcap=config.get("final_logit_softcapping"),
                      windows=windows, ropes=tuple(local if w is not None else full for w in windows))


class Phi3(Decoder):
    """Phi-3 and Phi-4: Llama with q/k/v in one ``qkv_proj`` and gate/up in one ``gate_up_proj``."""

    model_types = ("phi3",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        return _shape(config, _attention(config, fused_qkv=True), tie_default=False, fused_gate_up=True,
                      windows=windows_of(config, layers, _every_layer))


class Mixtral(Decoder):
    """Mixtral: Mistral with a router and SwiGLU experts in place of the MLP (top-k weights renormalised)."""

    model_types = ("mixtral",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        return _shape(config, _attention(config), tie_default=False, experts=_experts(config, "intermediate_size", True),
                      sparse=(True,) * layers, windows=windows_of(config, layers, _every_layer))


class Qwen3Moe(Decoder):
    """Qwen3-MoE: Qwen3's attention, experts in the layers ``decoder_sparse_step`` picks."""

    model_types = ("qwen3_moe",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        experts = _experts(config, "moe_intermediate_size", bool(config.get("norm_topk_prob", True)))
        return _shape(config, _attention(config, qk_norm="head"), tie_default=False, experts=experts,
                      sparse=_sparse_layers(config, layers), windows=windows_of(config, layers, _qwen_sliding(config)))


class Qwen2Moe(Decoder):
    """Qwen1.5/Qwen2-MoE: Qwen2's attention, experts plus a shared expert behind a sigmoid gate."""

    model_types = ("qwen2_moe",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        layers = _required(config, "num_hidden_layers")
        experts = _experts(config, "moe_intermediate_size", bool(config.get("norm_topk_prob", False)),
                           shared=config.get("shared_expert_intermediate_size") or 0)
        attention = _attention(config, qkv_bias=bool(config.get("qkv_bias", True)), out_bias=False)
        return _shape(config, attention, tie_default=False, experts=experts, sparse=_sparse_layers(config, layers),
                      windows=windows_of(config, layers, _qwen_sliding(config)))


class Olmoe(Decoder):
    """OLMoE: RMSNorm over the whole q and k projections, experts in every layer (top-k weights as routed)."""

    model_types = ("olmoe",)

    @classmethod
    def shape_of(cls, config: Config) -> DecoderShape:
        if config.get("clip_qkv") is not None:
            raise NotInZoo("clip_qkv")
        layers = _required(config, "num_hidden_layers")
        experts = _experts(config, "intermediate_size", bool(config.get("norm_topk_prob", False)))
        return _shape(config, _attention(config, qk_norm="full"), tie_default=False, experts=experts, sparse=(True,) * layers, windows=(None,) * layers)


FAMILIES: tuple[type[Decoder], ...] = (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi3, Mixtral, Qwen3Moe,
                                       Qwen2Moe, Olmoe)


def family_for(model_type: str) -> type[Decoder] | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)
