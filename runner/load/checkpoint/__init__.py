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
from runner.config import CheckpointSpec, ModelSpec

__all__ = ["Checkpoint", "KeyReport", "TensorEntry", "check_keys", "open_checkpoint"]


def open_checkpoint(spec: CheckpointSpec, model_spec: ModelSpec, model_class: type,
                    model: nn.Module | None = None) -> Checkpoint:
    """The checkpoint ``spec`` names, headers read, no tensor loaded, seen under the model class's own names.

    Synthetic weights are drawn from the built skeleton, so that source needs ``model``.
    """
    if spec.source == "synthetic":
        assert model is not None, "synthetic weights are drawn from the built model"
        checkpoint = open_safetensors(synthetic_checkpoint(spec, model_spec, model), source="synthetic")
    elif spec.source == "hub":
        from runner.load.checkpoint.hub import open_hub
        checkpoint = open_hub(spec)
    elif spec.source == "gguf":
        from runner.load.checkpoint.gguf import open_gguf
        checkpoint = open_gguf(spec.path)
    else:
        assert spec.path is not None  # the schema requires it for this source
        checkpoint = open_local(spec.path, spec.allow_pickle)
    names = getattr(model_class, "checkpoint_names", None)
    return RenamedCheckpoint(checkpoint, names(checkpoint.entries)) if callable(names) else checkpoint
