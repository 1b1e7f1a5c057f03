"""Stage 2: find the checkpoint, read its headers, and check its keys against the model.

Every source implements ``base.Checkpoint``; tensors are read later, one at a time, by the dispatcher.
"""
from __future__ import annotations

from torch import nn

from runner.load.checkpoint.base import Checkpoint, TensorEntry
from runner.load.checkpoint.files import open_local, open_safetensors
from runner.load.checkpoint.keys import KeyReport, check_keys
from runner.load.checkpoint.names import RenamedCheckpoint
from runner.load.checkpoint.synthetic import synthetic_checkpoint
from runner.load.checkpoint.transformers_names import transformers_names
from runner.config import CheckpointSpec, ModelSpec

__all__ = ["Checkpoint", "KeyReport", "TensorEntry", "check_keys", "open_checkpoint", "open_stored", "seen_as"]


def open_checkpoint(spec: CheckpointSpec, model_spec: ModelSpec, model_class: type,
                    model: nn.Module | None = None) -> Checkpoint:
    """The checkpoint ``spec`` names, headers read, no tensor loaded, seen under the model class's own names.

    Synthetic weights are drawn from the built skeleton, so that source needs ``model``.
    """
    if spec.source == "synthetic":
        assert model is not None, "synthetic weights are drawn from the built model"
        return seen_as(open_safetensors(synthetic_checkpoint(spec, model_spec, model), source="synthetic"),
                       model_class)
    return seen_as(open_stored(spec), model_class)


def open_stored(spec: CheckpointSpec) -> Checkpoint:
    """A local, Hub or GGUF checkpoint's headers under its own names, no tensor loaded."""
    if spec.source == "hub":
        from runner.load.checkpoint.hub import open_hub
        return open_hub(spec)
    if spec.source == "gguf":
        from runner.load.checkpoint.gguf import open_gguf
        return open_gguf(spec.path)
    assert spec.source == "local" and spec.path is not None  # the schema requires a path for this source
    return open_local(spec.path, spec.allow_pickle)


def seen_as(checkpoint: Checkpoint, model_class: type) -> Checkpoint:
    """The checkpoint under the model class's own tensor names, where it declares a mapping (``checkpoint_names``)."""
    names = getattr(model_class, "checkpoint_names", None)
    if callable(names):
        return RenamedCheckpoint(checkpoint, names(checkpoint.entries))
    if model_class.__module__.startswith("transformers."):
        renames = transformers_names(model_class, checkpoint.entries)
        return RenamedCheckpoint(checkpoint, renames) if renames is not None else checkpoint
    return checkpoint
