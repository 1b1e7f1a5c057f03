"""A mixture's experts in a plan: how many of each layer's sit on each tier, and what the disk ones cost per step.

A token runs through ``top-k`` of a layer's ``n`` experts. With routing spread evenly (what a router is trained
for), an expert is used by a step of ``rows`` tokens with probability ``1 - (1 - k/n) ** rows``, and only experts
used are read from disk. Pure: the layout and the map in, figures out.
"""
from __future__ import annotations

from dataclasses import dataclass

from runner.config.sizes import format_bytes
from runner.plan.blocks import ModelLayout


# Disk experts read ahead per unit of ``offload.prefetch``: an expert is a small read, and several at once keep the
# device's queue full (a whole block's single read is split into many requests in flight anyway).
EXPERTS_AHEAD = 4


def experts_ahead(prefetch: int) -> int:
    return EXPERTS_AHEAD * prefetch


@dataclass(frozen=True)
class LayerExperts:
    layer: str                 # the block of the layer routing to them
    experts: int
    nbytes: int                # of one expert
    share: float               # of tokens routed to each (top-k / n)
    tiers: dict[str, int]      # device -> experts there

    def read(self, rows: int) -> float:
        """Expected bytes read from disk by a step of ``rows`` tokens."""
        used = 1 - (1 - self.share) ** rows
        return self.tiers.get("disk", 0) * used * self.nbytes


def expert_layers(layout: ModelLayout, block_devices: dict[str, str]) -> list[LayerExperts]:
    """Each layer's experts and where they sit, in forward order."""
    layers: dict[str, list] = {}
    for b in layout.blocks:
        if b.expert:
            layers.setdefault(b.within, []).append(b)
    out = []
    for layer, blocks in layers.items():
        tiers: dict[str, int] = {}
        for b in blocks:
            tiers[block_devices[b.name]] = tiers.get(block_devices[b.name], 0) + 1
        out.append(LayerExperts(layer, len(blocks), max(b.nbytes for b in blocks), blocks[0].share, tiers))
    return out


def disk_read_per_step(layers: list[LayerExperts], rows: int) -> int:
    return round(sum(layer.read(rows) for layer in layers))


def expert_lines(layers: list[LayerExperts], rows: int) -> list[str]:
    """Runs of layers with the same split, then what the disk ones cost for one token and for a step."""
    if not layers:
        return []
    out: list[tuple[list[str], LayerExperts]] = []
    for layer in layers:
        if out and out[-1][1].tiers == layer.tiers and out[-1][1].experts == layer.experts:
            out[-1][0].append(layer.layer)
        else:
            out.append(([layer.layer], layer))
    lines = []
    for names, layer in out:
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} layers)"
        split = ", ".join(f"{d} {n}" for d, n in layer.tiers.items())
        lines.append(f"{label}: {layer.experts} experts of {format_bytes(layer.nbytes)}: {split}")
    k = layers[0].share * layers[0].experts
    on_disk = sum(layer.tiers.get("disk", 0) for layer in layers)
    if on_disk:
        lines.append(f"each token runs {k:g} of {layers[0].experts} experts per layer: "
                     f"{format_bytes(disk_read_per_step(layers, 1))} read from disk per token on average; a step of "
                     f"{rows} row{'s' if rows > 1 else ''} reads the disk experts any row routes to, "
                     f"~{format_bytes(disk_read_per_step(layers, rows))} of the {on_disk} on disk "
                     f"({format_bytes(sum(layer.tiers.get('disk', 0) * layer.nbytes for layer in layers))})")
    else:
        lines.append(f"each token runs {k:g} of {layers[0].experts} experts per layer; none is read from disk")
    return lines


def experts_document(layers: list[LayerExperts], rows: int) -> dict:
    return {"layers": [{"layer": layer.layer, "experts": layer.experts, "bytes_each": layer.nbytes,
                        "per_token": round(layer.share * layer.experts), "tiers": layer.tiers} for layer in layers],
            "disk_bytes_per_token": disk_read_per_step(layers, 1),
            "disk_bytes_per_step": disk_read_per_step(layers, rows), "rows": rows}
