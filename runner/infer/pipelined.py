"""A pipeline stage behind the generation contract (``CausalLM``), for ``parallel.mode=pipeline``.

Every rank runs the same generation loop over the same rows; only the forward is split. Rank r runs its
stage's layers on what rank r - 1 sent and sends its hidden states on to rank r + 1; the last rank makes the
logits and sends them back to every rank, so each samples the same tokens from the same seeds and the loops
stay in step. Over a column of K micro-batches, rank r sends micro-batch j on and goes straight to j + 1
while rank r + 1 works on j: the stages work at once, as in GPipe. Each stage's KV cache stays on its rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from runner.run.launch import Launch
from runner.infer.column import Call
from runner.infer.kv_cache import KVCache, ZooCausalLM

HIDDEN, LOGITS = 1, 2  # message tags


@dataclass
class PipelinedLM:
    model: ZooCausalLM
    launch: Launch
    dtype: torch.dtype    # of the hidden states and the logits
    device: torch.device  # where received tensors land (this rank's main device)

    @property
    def block_size(self) -> int:
        return self.model.block_size

    def new_cache(self, capacity: int) -> KVCache:
        return self.model.new_cache(capacity)

    def __call__(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, cache: KVCache | None = None,
                 logits_to_keep: int = 0) -> torch.Tensor:
        assert positions is None, "a pipeline stage derives positions from the mask"
        return self.forward_column([Call(idx, attention_mask, cache, logits_to_keep)])[0]

    def forward_column(self, calls: list[Call]) -> list[torch.Tensor]:
        """Every call's logits, in order; this rank's part of each call runs as soon as its input is here."""
        part, rank, last = self.model.stage, self.launch.rank, self.launch.world_size - 1
        assert part is not None
        outs, sending, receiving = [], [], []
        for c in calls:
            batch, tokens = c.idx.shape
            hidden = None
            if not part.first:
                hidden = torch.empty(batch, tokens, self.model.width, dtype=self.dtype, device=self.device)
                dist.recv(hidden, src=rank - 1, tag=HIDDEN)
            out = self.model(c.idx, c.attention_mask, None, c.cache, c.logits_to_keep, hidden=hidden)
            if part.last:
                logits = out.contiguous()
                sending += [dist.isend(logits, dst=r, tag=LOGITS) for r in range(last)]
                outs.append(logits)
                continue
            sending.append(dist.isend(out.contiguous(), dst=rank + 1, tag=HIDDEN))
            logits = torch.empty(batch, c.logits_to_keep or tokens, self.model.vocab_size, dtype=self.dtype,
                                 device=self.device)
            receiving.append(dist.irecv(logits, src=last, tag=LOGITS))
            outs.append(logits)
        for work in (*sending, *receiving):
            work.wait()
        return outs
