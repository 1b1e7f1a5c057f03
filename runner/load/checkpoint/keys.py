"""Compare a checkpoint's names and shapes with the model on meta, before any memory is allocated."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from runner.plan.blocks import ModelLayout, tensor_slots
from runner.load.checkpoint.base import Checkpoint
from runner.errors import CheckpointError

MAX_LINES = 20


@dataclass(frozen=True)
class KeyReport:
    ignored: tuple[str, ...]   # checkpoint keys knowingly skipped: non-persistent buffers, second copies of tied weights


def check_keys(checkpoint: Checkpoint, model: nn.Module, layout: ModelLayout) -> KeyReport:
    """Every tensor the model needs is in the checkpoint with the right shape, and nothing unknown is.

    Raises:
        CheckpointError: one line per missing, unexpected or mis-shaped tensor.
    """
    shapes = {name: tuple(t.shape) for name, _, _, t in tensor_slots(model)}
    floating = {name: t.is_floating_point() for name, _, _, t in tensor_slots(model)}
    needed = [s for s in shapes if s not in layout.ties and s not in layout.non_persistent]
    stored = checkpoint.entries
    errors = []
    for name in needed:
        if name not in stored:
            close = difflib.get_close_matches(name, list(stored), n=1, cutoff=0.7)
            hint = f"; the closest stored name is {close[0]}" if close else ""
            errors.append(f"missing tensor {name} (module {name.rpartition('.')[0] or '(root)'}){hint}")
        elif stored[name].shape != shapes[name]:
            errors.append(_shape_error(name, stored[name].shape, shapes[name]))
        elif floating[name] and not stored[name].dtype.is_floating_point:
            errors.append(f"dtype mismatch for {name}: the checkpoint stores {str(stored[name].dtype)[6:]}, "
                          "the model needs floating point; the checkpoint is quantized or corrupt")
    ignorable = set(layout.ties) | set(layout.non_persistent)
    ignored = sorted(k for k in stored if k in ignorable)
    ignored += sorted(f"{key} ({why})" for key, why in checkpoint.ignored.items())
    errors += [_shape_error(k, stored[k].shape, shapes[k])
               for k in ignored if k in layout.ties and k in stored and stored[k].shape != shapes[k]]
    others = _other_stages(model)  # a pipeline stage loads its own part of the checkpoint
    for key in sorted(k for k in stored if k not in shapes and not k.startswith(others)):
        close = difflib.get_close_matches(key, list(shapes), n=1, cutoff=0.7)
        hint = f"; the closest model name is {close[0]}" if close else ""
        errors.append(f"unexpected tensor {key} in {stored[key].file.name}: the model has no such parameter{hint}")
    if errors:
        more = [f"... and {len(errors) - MAX_LINES} more"] if len(errors) > MAX_LINES else []
        raise CheckpointError(*errors[:MAX_LINES], *more)
    return KeyReport(tuple(ignored))


def _other_stages(model: nn.Module) -> tuple[str, ...]:
    """The name prefixes of the modules another pipeline stage runs (``runner.plan.split.Skipped``)."""
    from runner.plan.split import Skipped

    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Skipped))


def _shape_error(name: str, stored: tuple[int, ...], expected: tuple[int, ...]) -> str:
    return (f"shape mismatch for {name}: the checkpoint has {list(stored)}, the model expects {list(expected)}; "
            "check the model config against the checkpoint")
