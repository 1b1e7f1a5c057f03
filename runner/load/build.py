"""Stage 1: build the model skeleton with every parameter on the meta device.

Parameters cost no memory here. Buffers are built for real on the CPU: they are small,
and non-persistent ones (causal masks, rotary frequencies) are in no checkpoint, so this
is the one moment their values can be computed. The dispatcher moves them to their device.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from runner.config import ModelSpec
from runner.load.architecture import check_config
from runner.load.checkpoint.base import one_line
from runner.errors import BuildError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside this context lands on meta.

    ``nn.Linear(10000, 10000)`` first gets an uninitialised CPU tensor (untouched pages,
    no real memory), which is swapped for meta before ``reset_parameters`` runs, so even a
    100B-parameter model builds in seconds.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    # Under torch's deterministic mode every fresh allocation is filled (NaN), which would touch each
    # transient CPU tensor's pages: gigabytes of RSS and a minute for a 100B skeleton. Nothing read here is
    # uninitialised (parameters go to meta, buffers are computed), so the fill is off while building.
    filled = torch.utils.deterministic.fill_uninitialized_memory
    # Initialising a meta parameter means nothing, and torch routes init on meta through its reference kernels,
    # whose first call imports the compiler stack (1.5 s and 80 MB of RSS per process): the initialisers are
    # no-ops while building, as transformers' own no_init_weights makes them.
    initialisers = {name: getattr(nn.init, name) for name in _INITIALISERS}
    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    torch.utils.deterministic.fill_uninitialized_memory = False
    for name in _INITIALISERS:
        setattr(nn.init, name, _left_as_is)
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        torch.utils.deterministic.fill_uninitialized_memory = filled
        for name, function in initialisers.items():
            setattr(nn.init, name, function)


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


def _left_as_is(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


# Modules a config may name as ``_target_`` (nested ones included) without the user's say: what a constructor
# there can do is build a model. Anything else (subprocess.Popen, logging.FileHandler...) would let a config
# run code, so it is refused before it is imported; ``trust.allow_targets`` adds prefixes the user vouches for.
DEFAULT_TARGETS = ("runner.zoo", "torch.nn", "transformers")


def allowed(target: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``target`` lies in one of the modules ``prefixes`` names (whole dotted components)."""
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def import_target(target: str, key: str = "model.arch._target_", trusted: tuple[str, ...] = ()) -> Any:
    """``runner.zoo.gpt.GPT`` -> the class, imported only when its module is allowed.

    Raises:
        BuildError: naming ``key``: a target outside the allowed modules (before any import), or one that
            cannot be imported (whatever its module raises while importing).
    """
    prefixes = DEFAULT_TARGETS + trusted
    if not allowed(target, prefixes):
        raise BuildError(f"{key}: {target} is outside the modules a config may build from ({', '.join(prefixes)}); "
                         f"if you trust it, add its module to trust.allow_targets (e.g. "
                         f"'trust.allow_targets=[{target.rpartition('.')[0] or target}]')")
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # noqa: BLE001 -- an allowed module that fails to import: any error is the config's
        raise BuildError(f"{key}: cannot import {target!r} ({type(e).__name__}: {one_line(e)}); "
                         "expected an importable nn.Module class such as runner.zoo.gpt.GPT") from e


def _parameters(cls: Any) -> str:
    try:
        names = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return "arguments its documentation lists"
    return ", ".join(names) if names else "no arguments"


def model_class(spec: ModelSpec) -> type[nn.Module]:
    """The class ``model.arch._target_`` names, checked to be an nn.Module before anything is called."""
    target = spec.arch["_target_"]
    cls = import_target(target, "model.arch._target_", spec.trusted_targets)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise BuildError(f"model.arch._target_: {target} is not an nn.Module class; "
                         "expected a model class such as runner.zoo.gpt.GPT")
    return cls


def resolve_arch(spec: ModelSpec, config: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """With ``arch_from_checkpoint``, the constructor arguments the checkpoint's config gives, under the
    ones the model config sets explicitly."""
    if not spec.arch_from_checkpoint:
        return dict(spec.arch)
    if config is None:
        raise BuildError(f"model.arch_from_checkpoint: checkpoint source {source} gives no architecture "
                         "(no config.json beside the weights, no GGUF metadata); set model.arch's arguments")
    check_config(config, f"the {source} checkpoint's config")
    cls = model_class(spec)
    from_config = getattr(cls, "arch_from_config", None)
    if callable(from_config):
        derived = from_config(config)
    else:  # any class: the config keys its constructor accepts
        accepted = set(inspect.signature(cls).parameters)
        derived = {k: v for k, v in config.items() if k in accepted}
    return {**derived, **spec.arch}


def _instantiate_nested(value: Any, key: str, trusted: tuple[str, ...]) -> Any:
    """An argument that is itself ``{_target_: SomeConfigClass, ...}`` (transformers' ``config=``) is built first,
    its own nested arguments before it; every target must be in the allowed modules."""
    if isinstance(value, dict) and "_target_" in value:
        cls = import_target(value["_target_"], f"{key}._target_", trusted)
        if not isinstance(cls, type):
            raise BuildError(f"{key}._target_: {value['_target_']} is not a class")
        args = {k: _instantiate_nested(v, f"{key}.{k}", trusted) for k, v in value.items() if k != "_target_"}
        try:
            return cls(**args)
        except Exception as e:  # noqa: BLE001 -- the user's class: whatever it raises is about its arguments
            raise BuildError(f"{key}: cannot build {value['_target_']}: {type(e).__name__}: {e}") from e
    return value


def no_split_classes(spec: ModelSpec, model: nn.Module) -> tuple[str, ...]:
    """The config's ``no_split_module_classes``, else the model's own ``_no_split_modules`` (transformers)."""
    return spec.no_split_module_classes or tuple(getattr(model, "_no_split_modules", None) or ())


def build_skeleton(spec: ModelSpec) -> nn.Module:
    """Instantiate ``spec.arch`` with parameters on meta, in eval mode."""
    target = spec.arch["_target_"]
    cls = model_class(spec)
    kwargs = {k: _instantiate_nested(v, f"model.arch.{k}", spec.trusted_targets)
              for k, v in spec.arch.items() if k != "_target_"}
    log.info("Building model <%s> on meta", target)
    with meta_parameters():
        try:
            model = cls(**kwargs)
        except Exception as e:  # noqa: BLE001 -- the constructor is the user's: whatever it raises is about its arguments
            raise BuildError(f"model.arch: cannot build {target}: {type(e).__name__}: {e}; "
                             f"it takes {_parameters(cls)}") from e
    return model.eval().requires_grad_(False)
