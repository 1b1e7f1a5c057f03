"""``model=auto``: the model class a checkpoint's own config names, checked before anything is built.

The config is ``config.json`` beside the weights (or in the Hub repo), or a GGUF's metadata read as one. A family
the zoo has runs on its fast path (``runner.zoo.families``); any other architecture transformers knows runs as
transformers' own class, built from the config on meta like any ``_target_``. A config is untrusted input: it is
checked for sizes that could not build (or would build forever) and for code it asks to run, all before a module
is made.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from runner.config import ModelSpec
from runner.errors import BuildError
from runner.load.checkpoint.base import CONFIG_NAME, Checkpoint, one_line
from runner.zoo.decoder import Decoder, check_shape
from runner.zoo.families import FAMILIES, NotInZoo, family_for

log = logging.getLogger(__name__)

# The largest value a config.json may give each size: beyond any released model, small enough that building the
# skeleton (one module per layer, per expert) stays in seconds and bytes.
LIMITS = {"num_hidden_layers": 2048, "n_layer": 2048, "num_layers": 2048, "hidden_size": 1 << 18, "n_embd": 1 << 18,
          "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20, "vocab_size": 1 << 23,
          "num_attention_heads": 1 << 12, "n_head": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
          "num_experts": 1 << 12, "num_local_experts": 1 << 12, "num_experts_per_tok": 1 << 12,
          "max_position_embeddings": 1 << 24, "n_positions": 1 << 24}
MODULES = 1 << 16  # layers x experts: DeepSeek-V3 has 61 x 256


def zoo_families() -> str:
    return ", ".join(t for f in FAMILIES for t in f.model_types)


def choose_model(spec: ModelSpec, checkpoint: Checkpoint, name: str) -> ModelSpec:
    """The concrete model ``model=auto`` stands for, called ``name``: a zoo family, else transformers' class.

    Raises:
        BuildError: one line naming the config file: no config, code it asks to run, quantized weights, a size
            that cannot build, or an architecture neither the zoo nor transformers knows.
    """
    config = checkpoint.config()
    where = config_file(checkpoint)
    if config is None:
        raise BuildError(f"model=auto: the checkpoint has no {CONFIG_NAME} beside its weights ({checkpoint.files[0]})"
                         f" to read the architecture from; pick a model config (model=llama, model=gpt2) or add its "
                         f"{CONFIG_NAME}")
    check_config(config, where)
    model_type = config.get("model_type")
    family = family_for(model_type) if spec.fast_path and isinstance(model_type, str) else None
    arch = Decoder.arch_from_config(config)
    if family is not None:
        try:
            check_shape(family.shape_of(arch))
        except NotInZoo as e:
            log.info("%s: the zoo's %s does not implement %s; running transformers' own class", where,
                     family.__name__, e)
            family = None
        except (ValueError, TypeError, KeyError, ArithmeticError) as e:  # reading the config: each is about it
            raise BuildError(f"{where}: {one_line(e)} (model_type {model_type!r}); fix the config or re-download "
                             "it") from e
    if family is not None:
        target = f"{family.__module__}.{family.__name__}"
        log.info("model=auto: %s from %s runs on the zoo's fast path (%s)", model_type, where, target)
        # The whole architecture now, so what runs before the build (the tokenizer's check of its ids against the
        # vocabulary) sees it as for any model config.
        return replace(spec, name=name, arch={"_target_": target, **arch}, arch_from_checkpoint=False,
                       chosen_from=where)
    return replace(spec, name=name, arch=transformers_arch(config, where), arch_from_checkpoint=False,
                   chosen_from=where)


def config_file(checkpoint: Checkpoint) -> str:
    """How messages name the config: the ``config.json`` file, or the GGUF whose metadata stands for it."""
    folder = checkpoint.metadata_dir
    return str(folder / CONFIG_NAME) if folder is not None else f"{checkpoint.files[0]} (GGUF metadata)"


def check_config(config: Any, where: str) -> None:
    """A config that can be built: a JSON object, no code to run, unquantized, every size a whole number in range,
    heads that divide the width.

    Raises:
        BuildError: the first thing wrong, naming the key, what was expected and what to do.
    """
    if not isinstance(config, dict):
        raise BuildError(f"{where}: expected a JSON object of the model's settings, found {type(config).__name__}")
    if config.get("auto_map"):
        names = ", ".join(sorted(str(v) for v in config["auto_map"].values())[:2]) \
            if isinstance(config["auto_map"], dict) else str(config["auto_map"])[:80]
        raise BuildError(f"{where}: auto_map points at code shipped with the checkpoint ({names}); the runner runs no "
                         "code from a checkpoint: use a model class the zoo or transformers has "
                         "(model.arch._target_=...)")
    target = _target_inside(config)
    if target is not None:
        raise BuildError(f"{where}: {target} holds a _target_, which would make the runner build whatever it names; "
                         "a checkpoint's config only describes the model: remove the key")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
        raise BuildError(f"{where}: the weights are quantized ({method}); the runner reads unquantized safetensors "
                         "or GGUF files: use the checkpoint's unquantized release or its GGUF")
    for key, limit in LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise BuildError(f"{where}: {key} is {str(value)[:40]}; expected a whole number from 1 to {limit}")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers") or 1
    experts = _first(config, "num_local_experts", "num_experts") or 1
    if layers * experts > MODULES:
        raise BuildError(f"{where}: {layers} layers of {experts} experts is past the {MODULES} expert blocks any "
                         "released model has; fix or re-download the config")
    hidden, heads = _first(config, "hidden_size", "n_embd"), _first(config, "num_attention_heads", "n_head")
    kv_heads = config.get("num_key_value_heads")
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        raise BuildError(f"{where}: hidden_size {hidden} does not divide into num_attention_heads {heads}; "
                         "the config and the weights disagree, fix or re-download it")
    if heads and kv_heads and heads % kv_heads:
        raise BuildError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{kv_heads}; fix or re-download the config")


def _target_inside(value: Any, at: str = "") -> str | None:
    """Where a ``_target_`` key sits in a config's nested objects, if anywhere."""
    if isinstance(value, dict):
        if "_target_" in value:
            return f"{at or 'the top level'}"
        return next((t for k, v in value.items() if (t := _target_inside(v, f"{at}.{k}".lstrip("."))) is not None),
                    None)
    if isinstance(value, list):
        return next((t for i, v in enumerate(value) if (t := _target_inside(v, f"{at}[{i}]")) is not None), None)
    return None


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def transformers_arch(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``_target_`` arguments that build transformers' class for the config's architecture, on meta like any other.

    Raises:
        BuildError: transformers is not installed, or knows neither the architecture nor the model type.
    """
    architectures = config.get("architectures") or []
    architectures = architectures if isinstance(architectures, list) else [architectures]
    model_type = config.get("model_type")
    unknown = (f"{where}: architectures {architectures} (model_type {model_type!r}) is neither a zoo family "
               f"({zoo_families()}) nor a class transformers has")
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError as e:
        raise BuildError(f"{unknown} here (transformers is not installed: pip install transformers)") from e
    config_class = CONFIG_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    names = [a for a in architectures if isinstance(a, str) and a.isidentifier()]
    model_class = next((a for a in names if hasattr(transformers, a)), None)
    if config_class is None or model_class is None:
        raise BuildError(f"{unknown} ({transformers.__version__}); pick a model config (model=...) that fits")
    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    log.info("model=auto: %s from %s runs as transformers' %s", model_type, where, model_class)
    return {"_target_": f"transformers.{model_class}", "config": {"_target_": f"transformers.{config_class}",
                                                                  **settings}}
