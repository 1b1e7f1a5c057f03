"""Pipeline parallel (``parallel.mode=pipeline``): the model's layers cut into one contiguous stage per rank.

Stage boundaries are chosen to even out each stage's cost: the bytes of its layers, which set both its memory
and its compute per token, plus the head's on the last stage (its matrix multiply is as big as its bytes) and
the embeddings' memory on the first. Each rank then keeps only its stage's modules: the others become
``Skipped`` (no parameters), so the planner places, and the loader reads, that stage alone, over the rank's
own devices, CPU and disk offload included.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from runner.errors import RunnerError
from runner.infer.kv_cache import StagePart, ZooCausalLM

log = logging.getLogger(__name__)


class PipelineError(RunnerError):
    stage = "parallel"


class Skipped(nn.Module):
    """Where another stage's module was: no parameters, never called."""

    def forward(self, *args, **kwargs):  # pragma: no cover - a stage never calls what it skipped
        raise RuntimeError("a pipeline stage called a module of another stage (a bug)")


@dataclass(frozen=True)
class Stages:
    """Every rank's part: ``parts[r]`` is rank r's."""

    parts: tuple[StagePart, ...]

    def describe(self) -> str:
        return ", ".join(f"rank {r}: layers {p.layers.start}-{p.layers.stop - 1}" for r, p in enumerate(self.parts))


def split(layer_costs: list[int], *, first_extra: int, last_extra: int, ranks: int) -> Stages:
    """Contiguous stages, one per rank, that make the most costly stage as cheap as it can be (exact, by
    trying every cut: a pipeline runs at the pace of its slowest stage)."""
    n = len(layer_costs)
    if ranks > n:
        raise PipelineError(f"parallel.mode=pipeline: {ranks} ranks but the model has {n} layers; each stage needs "
                            f"at least one: launch at most {n} processes")
    prefix = [0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, r: int) -> int:  # layers [a, b) on rank r
        return prefix[b] - prefix[a] + (first_extra if r == 0 else 0) + (last_extra if r == ranks - 1 else 0)

    # best[r][b]: the least worst-stage cost of putting layers [0, b) on ranks 0..r; cut[r][b]: where r starts.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(ranks)]
    cut = [[0] * (n + 1) for _ in range(ranks)]
    for b in range(1, n + 1):
        best[0][b] = cost(0, b, 0)
    for r in range(1, ranks):
        for b in range(r + 1, n + 1):
            for a in range(r, b):
                worst = max(best[r - 1][a], cost(a, b, r))
                if worst < best[r][b]:
                    best[r][b], cut[r][b] = worst, a
    bounds, b = [], n
    for r in range(ranks - 1, 0, -1):
        a = cut[r][b]
        bounds.append((a, b))
        b = a
    bounds.append((0, b))
    bounds.reverse()
    return Stages(tuple(StagePart(range(a, b), r == 0, r == ranks - 1) for r, (a, b) in enumerate(bounds)))


def layers_of(model: nn.Module) -> tuple[nn.ModuleList, list[nn.Module], list[nn.Module], nn.Module]:
    """A zoo model's layer list, its embedding modules, its final norm, and its head.

    Raises:
        PipelineError: the model is not one of the zoo's causal LMs (only they can run a stage).
    """
    if not isinstance(model, ZooCausalLM):
        raise PipelineError(f"parallel.mode=pipeline: {type(model).__name__} cannot run as stages; pipeline "
                            "parallel takes the zoo's GPT-2 and Llama models (use parallel.mode=data for others)")
    if hasattr(model, "transformer"):  # GPT-2
        t = model.transformer
        return t.h, [t.wte, t.wpe], [t.ln_f], model.lm_head
    return model.model.layers, [model.model.embed_tokens], [model.model.norm], model.lm_head


def keep_stage(model: nn.Module, part: StagePart) -> nn.Module:
    """The model with only ``part``'s modules: every other layer, and the embeddings or head it does not use,
    become ``Skipped``. A module tied to one the stage uses (GPT-2's embedding and head) stays."""
    layers, embeddings, norms, head = layers_of(model)
    used = {id(p) for i in part.layers for p in layers[i].parameters()}
    if part.first:
        used |= {id(p) for m in embeddings for p in m.parameters()}
    if part.last:
        used |= {id(p) for m in [*norms, head] for p in m.parameters()}
    for i in range(len(layers)):
        if i not in part.layers:
            layers[i] = Skipped()
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child in (*embeddings, *norms, head) and not any(id(p) in used for p in child.parameters()):
                setattr(parent, name, Skipped())
    model.stage = part
    return model


def layer_costs(model: nn.Module, itemsize: int) -> tuple[list[int], int, int]:
    """Bytes per layer, the embeddings' bytes (first stage) and the head's (last stage)."""
    layers, embeddings, _, head = layers_of(model)
    size = lambda m: sum(p.numel() for p in m.parameters()) * itemsize  # noqa: E731
    return [size(layer) for layer in layers], sum(size(m) for m in embeddings), size(head)
