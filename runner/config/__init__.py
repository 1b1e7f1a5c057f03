"""The config edge: Hydra's DictConfig -> plain dict -> JSON Schema -> frozen dataclasses.

Nothing past this module touches omegaconf; the pipeline takes a ``RunConfig``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.errors import ConfigError
from runner.config.resources import CONF_DIR
from runner.infer.sampling import SamplingParams
from runner.config.schema import schema_errors
from runner.config.sizes import parse_size


Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: dict[str, Any]  # `_target_` plus its constructor arguments
    no_split_module_classes: tuple[str, ...]
    arch_from_checkpoint: bool = False  # the rest of the arguments come from the checkpoint's own config
    trusted_targets: tuple[str, ...] = ()  # modules the user allows ``_target_`` from, beyond the defaults
    auto: bool = False                 # model=auto: the class comes from the checkpoint's config (runner.load.architecture)
    fast_path: bool = True             # model=auto: a zoo family where there is one; False: transformers' class always
    chosen_from: str | None = None     # model=auto, once chosen: the config file the choice was read from

    @property
    def path(self) -> str:
        """Which implementation runs: the zoo's fast path, transformers' own class, or another the config names."""
        target = self.arch.get("_target_", "")
        return "zoo" if target.startswith("runner.zoo.") else "transformers" if target.startswith("transformers.") \
            else "custom"


@dataclass(frozen=True)
class CheckpointSpec:
    source: Literal["synthetic", "local", "hub", "gguf"]
    path: Path | None = None        # local, gguf
    allow_pickle: bool = False      # local, hub: full unpickling of .bin/.pt files, which can run code
    repo_id: str | None = None      # hub
    revision: str = "main"          # hub: a branch, a tag or a commit
    seed: int = 0                   # synthetic
    dtype: str = "float32"          # synthetic: the dtype the weights are stored in
    shard_size: int = 500 * 10**6   # synthetic
    cache_dir: Path | None = None   # synthetic; hub (None: the Hugging Face cache)
    check_finite: bool = False      # every weight read once at load and checked for NaN and Inf


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    simulated: bool
    gpus: dict[str, int] | None     # None: detect the real ones
    cpu: int | None                 # None: detect the available RAM, less cpu_reserve
    cuda_context_reserve: int = 0
    cpu_reserve: int = 0


@dataclass(frozen=True)
class PlacementSpec:
    strategy: Strategy
    max_memory: dict[str, int]      # device name -> byte cap; only the devices the user capped
    device_map: dict[str, str]      # module name -> device, pinned by the user
    offload_folder: Path | None
    allow_disk: bool = True
    prefetch: int = 1               # disk blocks read ahead of the one running
    direct_io: bool = True          # disk blocks bypass the page cache unless already in it
    experts_apart: bool = True      # a mixture's experts are placement units of their own (runner.plan.blocks)


@dataclass(frozen=True)
class GenerateTask:
    sampling: SamplingParams
    chat: bool = True                      # wrap each prompt in the tokenizer's chat template, when it has one
    truncate: Literal["left"] | None = None  # left: drop a too-long prompt's oldest tokens; None: an error
    name: Literal["generate"] = "generate"
    output_key: str = "completion"         # the field of an output line that holds the result
    decodes: ClassVar[bool] = True         # token by token over a KV cache kept between forwards


@dataclass(frozen=True)
class ScoreTask:
    per_token: bool = False                # also write each scored token's log-probability
    name: Literal["score"] = "score"
    output_key: str = "score"
    decodes: ClassVar[bool] = False        # one forward over each whole sequence


@dataclass(frozen=True)
class EmbedTask:
    pooling: Literal["mean", "last", "cls"] = "mean"
    normalize: bool = True
    name: Literal["embed"] = "embed"
    output_key: str = "embedding"
    decodes: ClassVar[bool] = False


Task = GenerateTask | ScoreTask | EmbedTask


@dataclass(frozen=True)
class DataSpec:
    """Where a job's rows come from, and what a bad one does."""

    format: Literal["inline", "text", "jsonl", "openai"] = "inline"
    prompts: tuple[str, ...] = ()          # inline
    path: Path | None = None               # text, jsonl, openai
    field: str | None = None               # the text field; None: prompt (generate) or text (score, embed)
    id_field: str | None = None            # None: the line number (inline: the position); openai: custom_id
    window: int = 1024                     # rows read ahead and sorted by length
    on_error: Literal["fail", "skip"] = "fail"

    def text_field(self, task: Task) -> str:
        return self.field or ("prompt" if task.decodes else "text")


@dataclass(frozen=True)
class RuntimeSpec:
    batch_size: int
    seq_len: int | None  # prompt plus new tokens; None until derived from the data, or the model's context
    log_every: float = 30.0  # seconds between progress lines off a terminal
    micro_batches: int = 1  # generation: batches decoded together, each streamed block loaded once for all of them
    deterministic: bool = True  # torch's deterministic algorithms where it has them: a replay gives the same bytes
    prefix_cache: int | None = None  # generation: positions of shared prompt prefixes kept across the job; None: auto

    @property
    def rows_in_flight(self) -> int:
        """Sequences that hold a KV cache at once."""
        return self.batch_size * self.micro_batches


@dataclass(frozen=True)
class ParallelSpec:
    mode: Literal["none", "data", "pipeline"] = "none"  # data: each rank a share of the rows; pipeline: of the layers
    nodes: int = 1                       # mode=plan of a pipeline without torchrun: the nodes to size for
    ranks_per_node: int | None = None    # ... and the ranks on each (None: one per GPU of the profile)


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    checkpoint: CheckpointSpec
    hardware: HardwareSpec
    placement: PlacementSpec
    task: Task
    dtype: DType
    seed: int
    runtime: RuntimeSpec = RuntimeSpec(1, 256)
    data: DataSpec = DataSpec(prompts=("Hello",))
    resume: bool = False            # continue the job in the run folder
    force: bool = False             # a resumed sweep reruns jobs recorded with another config
    full_hash: bool = False         # manifest.json hashes every byte of the checkpoint, not a sample
    tokenizer_path: Path | None = None  # a folder holding tokenizer.json, or the file; None: the checkpoint's own
    mode: Literal["run", "plan", "check"] = "run"
    map_file: Path | None = None    # mode=check: the map to validate
    resolved: dict[str, Any] = field(default_factory=dict, compare=False)  # for the report
    overrides: tuple[str, ...] = field(default=(), compare=False)  # the command line's, for the manifest
    parallel: ParallelSpec = ParallelSpec()
    quantize: Literal["int8", "int4"] | None = None  # weight-only quantization while the weights stream in


def compose(overrides: Sequence[str] = ()) -> RunConfig:
    """The config ``python -m runner <overrides>`` would run with, composed by Hydra and typed (for the Python API).

    Raises:
        ConfigError: an unknown group option, a malformed override, or a value the schema refuses.
    """
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    from runner.config.hydra_errors import GROUP_HINT, one_line

    if isinstance(overrides, str):
        raise ConfigError("overrides: expected a list such as ['model=gpt2', 'placement=balanced'], got one string")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="runner"):
        try:
            composed = hydra_compose(config_name="config", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"overrides: {one_line(str(e))}") from e
        except (ValueError, TypeError) as e:  # Hydra's own, for a group given a number or a list: task=1
            raise ConfigError(f"overrides: {e}; {GROUP_HINT}") from e
        return load_config(composed)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolve every interpolation; a missing mandatory value (``???``) is a config error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {_first_line(e)}; set it on the command line, e.g. {key}=...") from e


def load_config(cfg: DictConfig | dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Validate a composed config against ``schemas/config.schema.json`` and type it.

    Raises:
        ConfigError: with one line per problem, all found at once.
    """
    plain = to_plain(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("hydra", None)
    errors = schema_errors(plain, "config")
    if not errors and plain["data"]["format"] == "openai" and plain["task"]["name"] != "generate":
        errors.append(f"data: the OpenAI batch format asks for completions; it runs with task=generate, "
                      f"not task={plain['task']['name']}")
    if not errors and plain["runtime"]["micro_batches"] > 1 and plain["task"]["name"] != "generate":
        errors.append(f"runtime.micro_batches: micro-batches share streamed blocks across decode steps of "
                      f"task=generate; task={plain['task']['name']} runs one forward per batch, so raise "
                      "runtime.batch_size instead")
    if not errors and not math.isfinite(plain["runtime"]["log_every"]):  # NaN passes every bound of the schema
        errors.append(f"runtime.log_every: {plain['runtime']['log_every']} is not valid; expected seconds between "
                      "progress lines, above 0 and up to 1e9")
    if not errors and plain["mode"] == "check" and not plain["map_file"]:
        errors.append("map_file: mode=check needs the map to check, e.g. map_file=outputs/.../device_map.json")
    if errors:
        raise ConfigError(*errors)
    return replace(_typed(plain), overrides=tuple(overrides))


def _typed(c: dict[str, Any]) -> RunConfig:
    ck, hw = c["checkpoint"], c["hardware"]
    checkpoint = CheckpointSpec(
        source=ck["source"],
        path=_path(ck.get("path"), "checkpoint.path"),
        allow_pickle=ck.get("allow_pickle", False),
        repo_id=ck.get("repo_id"),
        revision=ck.get("revision", "main"),
        seed=ck.get("seed", 0),
        dtype=ck.get("dtype", "float32"),
        shard_size=_size(ck["shard_size"], "checkpoint.shard_size") if "shard_size" in ck else CheckpointSpec.shard_size,
        cache_dir=_path(ck.get("cache_dir")),
        check_finite=ck.get("check_finite", False),
    )
    hardware = HardwareSpec(
        name=hw["name"],
        simulated=hw["simulated"],
        gpus=None if hw["gpus"] == "auto" else {k: _size(v, f"hardware.gpus.{k}") for k, v in hw["gpus"].items()},
        cpu=None if hw["cpu"] == "auto" else _size(hw["cpu"], "hardware.cpu"),
        cuda_context_reserve=_size(hw.get("cuda_context_reserve", "0B"), "hardware.cuda_context_reserve"),
        cpu_reserve=_size(hw.get("cpu_reserve", "0B"), "hardware.cpu_reserve"),
    )
    placement = PlacementSpec(
        strategy=c["placement"]["strategy"],
        max_memory={_device_name(k): _size(v, f"max_memory.{k}") for k, v in c["max_memory"].items() if v is not None},
        device_map=_flatten_map(c["device_map"]),
        offload_folder=_path(c["offload"]["folder"]),
        allow_disk=c["offload"]["allow_disk"],
        prefetch=c["offload"]["prefetch"],
        direct_io=c["offload"]["direct_io"],
        experts_apart=c["offload"]["experts_apart"],
    )
    model = c["model"]
    return RunConfig(
        model=ModelSpec(model["name"], dict(model["arch"]), tuple(model["no_split_module_classes"]),
                        model.get("arch_from_checkpoint", False), tuple(c["trust"]["allow_targets"]),
                        auto=model.get("auto", False), fast_path=model.get("fast_path", True)),
        checkpoint=checkpoint,
        hardware=hardware,
        placement=placement,
        task=_task(c["task"], c["seed"]),
        dtype=c["dtype"],
        quantize=c.get("quantize"),
        seed=c["seed"],
        runtime=RuntimeSpec(int(c["runtime"]["batch_size"]), _whole(c["runtime"]["seq_len"]),
                            float(c["runtime"]["log_every"]), int(c["runtime"]["micro_batches"]),
                            bool(c["runtime"].get("deterministic", True)),
                            _whole(c["runtime"].get("prefix_cache"))),
        data=_data(c["data"]),
        resume=c["resume"],
        force=bool(c.get("force", False)),
        full_hash=bool(c.get("manifest", {}).get("full_hash", False)),
        mode=c["mode"],
        map_file=_path(c["map_file"]),
        tokenizer_path=_path(c["tokenizer"]["path"], "tokenizer.path"),
        resolved=c,
        parallel=ParallelSpec(**c.get("parallel", {})),
    )


def _task(t: dict[str, Any], seed: int) -> Task:
    if t["name"] == "score":
        return ScoreTask(t["per_token"])
    if t["name"] == "embed":
        return EmbedTask(t["pooling"], t["normalize"])
    sampling = SamplingParams(max_new_tokens=int(t["max_new_tokens"]), temperature=float(t["temperature"]),
                              top_k=t["top_k"], top_p=float(t["top_p"]), min_p=float(t["min_p"]), stop=tuple(t["stop"]),
                              stop_token_ids=tuple(t["stop_token_ids"]), seed=seed)
    return GenerateTask(sampling, t["chat"], t["truncate"])


def _data(d: dict[str, Any]) -> DataSpec:
    return DataSpec(format=d["format"], prompts=tuple(d.get("prompts", ())), path=_path(d.get("path"), "data.path"),
                    field=d["field"], id_field=d["id_field"], window=d["window"], on_error=d["on_error"])


def _whole(value: float | None) -> int | None:
    """A count the schema took as an integer: ``1e14`` on the command line arrives as the float 1e14."""
    return None if value is None else int(value)


def _size(value: str, key: str) -> int:
    """A size the schema let through (its pattern), checked for magnitude: one line naming the key."""
    try:
        return parse_size(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _device_name(key: str) -> str:
    """``max_memory`` keys: ``0`` is short for ``cuda:0`` (the command line cannot spell a colon in a key)."""
    return f"cuda:{key}" if str(key).isdigit() else str(key)


def _flatten_map(node: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``+device_map.transformer.h.0=cuda:1`` arrives nested; module names are dotted paths."""
    flat: dict[str, str] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_map(value, name + "."))
        elif isinstance(value, str):
            flat[name] = value
        else:
            raise ConfigError(f"device_map.{name}: {value!r} is not a device; expected cpu, disk or cuda:N")
    return flat


def _path(value: str | None, key: str = "path") -> Path | None:
    """``~`` and ``$VARS`` expanded; ``pkg://<package>/<file>`` is a file shipped inside an installed package."""
    if value is None:
        return None
    if value.startswith("pkg://"):
        package, _, name = value.removeprefix("pkg://").partition("/")
        top, *sub = package.split(".")
        # find_spec of a top-level name imports nothing; of "a.b" it would import (run) a, so the rest of the
        # dotted name is walked as folders
        try:
            spec = importlib.util.find_spec(top) if top.isidentifier() else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{key}: package {top} is not installed; install it (e.g. "
                              f"pip install --no-deps {top.replace('_', '-')}) or point {key} at a file")
        root = Path(list(spec.submodule_search_locations)[0])
        path = root.joinpath(*sub, name)
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise ConfigError(f"{key}: {value} leaves package {package}; name a file inside it")
        return path
    return Path(os.path.expandvars(value)).expanduser()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
