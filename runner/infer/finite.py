"""NaN and Inf in a model's outputs: caught where they show, and traced back to the module that first made them.

NaN or Inf weights (a corrupt checkpoint), or a dtype that overflows (float16 on some models), give outputs that
are not numbers; sampled or decoded, they look like tidy garbage. Every task checks its outputs per row
(``check_rows``) and raises ``NonFiniteOutput``, which carries how to run the first bad row again. The engine then
runs it once with a hook on every module (``first_non_finite``): the first to finish with a non-finite output is
where the trouble starts, and the error names it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from runner.errors import GenerateError


class NonFiniteOutput(GenerateError):
    """A forward's output holds NaN or Inf; ``rerun`` runs the first such row again, alone."""

    def __init__(self, what: str, rerun: Callable[[], Any]):
        super().__init__(f"{what} are not finite (NaN or Inf)")
        self.what, self.rerun = what, rerun


def check_rows(values: torch.Tensor, rerun_row: Callable[[int], Callable[[], Any]], what: str) -> None:
    """Raise ``NonFiniteOutput`` for the first row of ``values`` (rows first) that holds NaN or Inf.

    Raises:
        NonFiniteOutput: with ``rerun_row(row)`` as how to run that row again.
    """
    rows = values.reshape(values.shape[0], -1)
    # One pass first: a row's sum is finite when all its values are (a NaN or Inf carries through). Only a sum that
    # is not, which finite values can give by overflowing, pays for the exact check (isfinite is ~4 passes and a
    # mask: 5 ms a step over 64 rows of a 49k-word vocabulary).
    if bool(torch.isfinite(rows.sum(dim=1, dtype=torch.float32)).all()):
        return
    finite = torch.isfinite(rows).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise NonFiniteOutput(what, rerun_row(row))


def first_non_finite(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """The first module, in the order modules finish, whose output holds NaN or Inf while ``run`` runs; None if
    none does (the trouble is after the model: sampling, pooling)."""
    found: list[str] = []

    def watch(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not found and any(not bool(torch.isfinite(t).all()) for t in _tensors(output) if t.is_floating_point()):
                found.append(name)
        return hook

    handles = [m.register_forward_hook(watch(name)) for name, m in model.named_modules() if name]
    try:
        with torch.inference_mode():
            run()
    except Exception:  # noqa: BLE001 -- a diagnosis: whatever the rerun raises, what it found so far is the answer
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def explained(e: NonFiniteOutput, model: nn.Module, dtype: torch.dtype) -> GenerateError:
    """The one-line error for ``e``: the module where NaN or Inf first appear, and what to try."""
    where = first_non_finite(model, e.rerun)
    place = f"module {where} is the first whose output is" if where else "the model's outputs are"
    return GenerateError(f"{e.what}: {place} not finite (NaN or Inf); the checkpoint's weights may hold NaN or "
                         f"Inf there, or {str(dtype).removeprefix('torch.')} overflows (try dtype=float32 or "
                         "dtype=bfloat16)")


def _tensors(value: Any) -> Sequence[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []
