"""``mode=plan parallel.mode=pipeline``, without torchrun: size a pipeline over a cluster you may not have.

``parallel.nodes`` nodes of the hardware profile, ``parallel.ranks_per_node`` ranks on each (default: one per
GPU of the profile). Every rank's stage is planned in this process exactly as that rank would plan it under
torchrun (its GPUs, its share of the node's RAM, disk), then the traffic between stages is counted: each
token's hidden states cross every stage boundary once, and its logits go from the last stage back to every
other rank. A pipeline over several nodes whose model would fit on one node is warned about: inside a node,
stages talk over NVLink or shared memory; across nodes, over the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.run.launch import Launch
from runner.config import RunConfig
from runner.plan.explain import plan_document
from runner.infer.kv_cache import StagePart
from runner.infer.engine import Engine
from runner.plan.planned import Planned
from runner.run.report import write_documents
from runner.plan.room import reserved
from runner.config.sizes import format_bytes


@dataclass
class RankPlan:
    rank: int
    node: int
    part: StagePart
    planned: Planned

    @property
    def weights(self) -> int:
        return sum(self.planned.check.loads.values())

    @property
    def off_gpu(self) -> int:
        """Bytes of this stage planned on the CPU or disk: they stream in every forward."""
        return sum(n for d, n in self.planned.check.loads.items() if not d.startswith("cuda:"))


def ranks_per_node(config: RunConfig) -> int:
    if config.parallel.ranks_per_node is not None:
        return config.parallel.ranks_per_node
    return max(len(config.hardware.gpus or {}), 1)


def run(config: RunConfig, run_dir: Path) -> tuple[str, dict[str, Path]]:
    nodes, per_node = config.parallel.nodes, ranks_per_node(config)
    world = nodes * per_node
    ranks = []
    for rank in range(world):
        planned, _ = Engine.plan(config, run_dir, Launch(rank, world, rank % per_node, per_node), tokenizer=False)
        assert planned.model.stage is not None
        ranks.append(RankPlan(rank, rank // per_node, planned.model.stage, planned))
    traffic = _traffic(ranks)
    warnings = _warnings(ranks, config, traffic)
    document = {**plan_document(ranks[0].planned), "pipeline": {
        "nodes": nodes, "ranks_per_node": per_node,
        "stages": [{"rank": r.rank, "node": r.node, "layers": [r.part.layers.start, r.part.layers.stop],
                    "weights": r.weights, "off_gpu": r.off_gpu, "loads": dict(r.planned.check.loads),
                    "reserves": {d: reserved(r.planned.plan.reserves, d) for d in r.planned.check.loads}}
                   for r in ranks],
        "traffic": traffic, "warnings": warnings}}
    return _text(ranks, traffic, warnings), write_documents(run_dir, {"plan.json": (document, "plan")})


def _traffic(ranks: list[RankPlan]) -> dict[str, Any]:
    """Bytes that cross between ranks, and between nodes, per token generated."""
    model, itemsize = ranks[0].planned.model, ranks[0].planned.dtype.itemsize
    hidden, logits = model.width * itemsize, model.vocab_size * itemsize
    last = ranks[-1]
    boundaries = list(zip(ranks, ranks[1:]))
    return {
        "hidden_bytes_per_hop": hidden, "hops": len(boundaries),
        "cross_node_hops": sum(a.node != b.node for a, b in boundaries),
        "logits_bytes_per_rank": logits, "cross_node_logits": sum(r.node != last.node for r in ranks[:-1]),
        "bytes_per_token": hidden * len(boundaries) + logits * (len(ranks) - 1),
        "cross_node_bytes_per_token": hidden * sum(a.node != b.node for a, b in boundaries)
        + logits * sum(r.node != last.node for r in ranks[:-1]),
    }


def _warnings(ranks: list[RankPlan], config: RunConfig, traffic: dict[str, Any]) -> list[str]:
    lines = []
    nodes = config.parallel.nodes
    weights = sum(r.weights for r in ranks)
    node_gpus = sum(b for d, b in (config.hardware.gpus or {}).items())
    if nodes > 1 and traffic["cross_node_bytes_per_token"] and weights <= node_gpus:
        lines.append(f"parallel.nodes={nodes}: the model's {format_bytes(weights)} fit on one node's GPUs "
                     f"({format_bytes(node_gpus)}), yet every token sends {format_bytes(traffic['cross_node_bytes_per_token'])} "
                     f"between nodes ({traffic['cross_node_hops']} stage boundary and {traffic['cross_node_logits']} "
                     "logits across); keep each pipeline inside a node and share the rows between nodes "
                     "(parallel.mode=data on each node's pipeline copy)")
    for r in ranks:
        if r.off_gpu and r.planned.hardware.gpus:
            lines.append(f"rank {r.rank} (node {r.node}): {format_bytes(r.off_gpu)} of its stage is off its GPUs "
                         "and streams in every forward; more ranks, or more GPU memory per rank, keep it resident")
    return lines


def _text(ranks: list[RankPlan], traffic: dict[str, Any], warnings: list[str]) -> str:
    lines = [f"pipeline: {len(ranks)} stages over {ranks[-1].node + 1} node(s)", "",
             f"{'rank':>4} {'node':>4} {'layers':>9} {'weights':>12} {'off GPU':>12}  where"]
    for r in ranks:
        where = ", ".join(f"{d} {format_bytes(n)}" for d, n in r.planned.check.loads.items() if n)
        lines.append(f"{r.rank:>4} {r.node:>4} {f'{r.part.layers.start}-{r.part.layers.stop - 1}':>9} "
                     f"{format_bytes(r.weights):>12} {format_bytes(r.off_gpu):>12}  {where}")
    lines += ["", f"per token: hidden states {format_bytes(traffic['hidden_bytes_per_hop'])} over each of "
                  f"{traffic['hops']} hop(s) ({traffic['cross_node_hops']} between nodes); logits "
                  f"{format_bytes(traffic['logits_bytes_per_rank'])} back to each of {len(ranks) - 1} rank(s) "
                  f"({traffic['cross_node_logits']} on other nodes); "
                  f"{format_bytes(traffic['cross_node_bytes_per_token'])} between nodes in all"]
    lines += [f"warning: {w}" for w in warnings]
    return "\n".join(lines)
