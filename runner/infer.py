"""Stage 6: greedy generation on the dispatched model.

Inputs start on the CPU; the block hooks move activations from device to device, and
each step's last logits come back to the CPU to pick the next token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    index: int
    prompt: str
    completion: str
    prompt_tokens: list[int]
    output_tokens: list[int]


@torch.inference_mode()
def greedy_generate(model: nn.Module, tokenizer, prompts: tuple[str, ...], max_new_tokens: int,
                    context: int, shown: tuple[str, ...] | None = None) -> list[Prediction]:
    """Extend each prompt by up to ``max_new_tokens`` argmax tokens, stopping at the tokenizer's end of
    sequence, keeping the last ``context`` tokens as input. ``shown`` are the prompts as the user wrote
    them (before a chat template), for the predictions."""
    predictions = []
    for index, prompt in enumerate(prompts):
        prompt_ids = tokenizer.encode(prompt)
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        new: list[int] = []
        for _ in range(max_new_tokens):
            out = model(ids[:, -context:])
            logits = getattr(out, "logits", out)  # transformers models return an output object
            token = int(logits[0, -1].float().argmax().cpu())
            new.append(token)
            if token in tokenizer.eos_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        predictions.append(Prediction(index, (shown or prompts)[index], tokenizer.decode(new), prompt_ids, new))
        log.info("prompt %d: %d new tokens", index, len(new))
    return predictions
