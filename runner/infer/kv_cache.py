"""Keys and values kept between decode steps, and the masks and positions a step needs.

Each attention layer's cache is allocated at its first write, on the device the layer
computes on (a disk-streamed block computes on the main device, so its cache lives there),
for a fixed ``capacity`` of positions: a decode step writes one column in place and never
copies what is already cached. Rows are aligned on the right (prompts are left-padded), so
every row of a batch shares one write position; padding is masked out of attention.

A batch's rows may continue one prefix kept once (``SharedPrefix``: a system prompt the job's prefix cache holds)
instead of each holding a copy: their own columns start after it, their positions count it, and a decode step
reads its keys and values once for all rows (cascade attention, in ``runner.infer.attention``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from runner.errors import GenerateError
from runner.infer.column import Steps, run_steps


class LayerCache:
    """One attention layer's keys and values, ``[batch, kv_heads, capacity, head_dim]``."""

    def __init__(self, capacity: int, index: int = 0, shared: SharedPrefix | None = None):
        self.capacity = capacity
        self.index = index                          # the layer's, in the model
        self.shared = shared                        # the batch's shared prefix, if any
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def prefix(self) -> PrefixView | None:
        """The shared prefix's keys and values for this layer, when a row of the batch continues it."""
        if self.shared is None or not self.shared.active:
            return None
        source = self.shared.source.layer(self.index)
        assert source.keys is not None and source.values is not None
        end = source.length
        return PrefixView(source.keys[:1, :, :end], source.values[:1, :, :end], self.shared.rows)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values after the cached ones; all of them, for attention."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise GenerateError(f"the KV cache holds {self.capacity} positions and this step needs {end}; "
                            "lower the prompt length or max_new_tokens, or raise runtime.seq_len")
        if self.keys is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.values = torch.empty(shape, dtype=v.dtype, device=v.device)
        assert self.values is not None
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the rows not listed (finished sequences), so they cost no more compute. The kept rows move to the
        front of the same buffers, their written columns only: nothing is allocated at full capacity again."""
        if self.keys is not None and self.values is not None:
            rows = rows.to(self.keys.device)
            n = len(rows)
            if n and bool((rows == torch.arange(n, device=rows.device)).all()):
                self.keys, self.values = self.keys[:n], self.values[:n]  # already in front: a view
                return
            for t in (self.keys, self.values):
                t[:n, :, :self.length] = t[rows, :, :self.length]  # gathered first, then written
            self.keys, self.values = self.keys[:n], self.values[:n]

    def repeat_rows(self, n: int) -> None:
        """One cached row (a prefix every sequence shares) becomes ``n`` rows."""
        if self.keys is not None and self.values is not None:
            self.keys, self.values = self.keys.repeat(n, 1, 1, 1), self.values.repeat(n, 1, 1, 1)

    def place(self, source: LayerCache, slots: torch.Tensor, columns: torch.Tensor, rows: int) -> None:
        """Source row i's columns ``columns[i]`` become this cache's last ``w`` columns of row ``slots[i]``
        (``columns`` is ``[n, w]``). A cache not yet written is made here with ``rows`` rows, its length ``w``."""
        assert source.keys is not None and source.values is not None
        n, w = columns.shape
        if self.keys is None:
            shape = (rows, source.keys.shape[1], self.capacity, source.keys.shape[3])
            # zeros, not empty: a free slot's columns are never read for a real row, but stay finite
            self.keys = source.keys.new_zeros(shape)
            self.values = source.values.new_zeros(shape)
            self.length = w
        assert self.values is not None and w <= self.length
        index = columns.to(source.keys.device)[:, None, :, None].expand(n, source.keys.shape[1], w, source.keys.shape[3])
        slots = slots.to(self.keys.device)
        self.keys[slots, :, self.length - w:self.length] = source.keys.gather(2, index)
        self.values[slots, :, self.length - w:self.length] = source.values.gather(2, index)

    def rebase(self, width: int) -> None:
        """Every row's last ``min(length, width)`` columns moved to end at column ``width``, the new length:
        fewer columns drop leading ones no row uses, more add room on the left for a longer prompt."""
        if width > self.capacity:
            raise GenerateError(f"the KV cache holds {self.capacity} positions and a row needs {width}; "
                                "lower the prompt length or max_new_tokens, or raise runtime.seq_len")
        kept = min(self.length, width)
        if self.keys is not None and self.values is not None and kept and width != self.length:
            for t in (self.keys, self.values):
                t[:, :, width - kept:width] = t[:, :, self.length - kept:self.length].clone()
        self.length = width

    def seeded(self, rows: int, capacity: int) -> LayerCache:
        """A new cache of ``rows`` rows whose first columns hold this one-row cache's (a shared prefix)."""
        out = LayerCache(capacity, self.index)
        if self.keys is not None and self.values is not None:
            shape = (rows, self.keys.shape[1], capacity, self.keys.shape[3])
            out.keys, out.values = self.keys.new_empty(shape), self.values.new_empty(shape)
            out.keys[:, :, :self.length] = self.keys[:, :, :self.length]
            out.values[:, :, :self.length] = self.values[:, :, :self.length]
        out.length = self.length
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


@dataclass(frozen=True)
class PrefixView:
    """One layer's view of a shared prefix: its keys and values ``[1, kv_heads, P, head_dim]``, and which rows of
    the batch continue it (``[batch]`` booleans)."""

    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor

    def joined(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and a ``[B, 1, T, P + S]`` mask with the prefix written out in front of every row's own
        columns: what attention without a cascade reads (several tokens, a GPU, soft-capped scores)."""
        B, S, P = k.shape[0], k.shape[2], self.keys.shape[2]
        own = mask if mask is not None else (  # None: causal over a fresh sequence, or one token that sees all
            torch.ones(tokens, S, dtype=torch.bool, device=k.device).tril(S - tokens)[None, None])
        before = self.rows.to(k.device).view(B, 1, 1, 1).expand(B, 1, tokens, P)
        mask = torch.cat([before, own.to(k.device).expand(B, 1, tokens, S)], dim=-1)
        expand = (B, -1, -1, -1)
        return (torch.cat([self.keys.expand(*expand), k], dim=2), torch.cat([self.values.expand(*expand), v], dim=2),
                mask)


class SharedPrefix:
    """A prefix some rows of a batch continue: its keys and values stay in ``source`` (a one-row cache, the job's
    prefix cache's entry), not copied into each row. Those rows' own columns start after it."""

    def __init__(self, tokens: tuple[int, ...], source: KVCache):
        self.tokens, self.source = tokens, source
        self.rows = torch.zeros(0, dtype=torch.bool)
        self.active = False  # a row continues it

    @property
    def length(self) -> int:
        return len(self.tokens)

    def mark(self, slots: torch.Tensor, continues: bool, rows: int) -> None:
        if len(self.rows) < rows:
            self.rows = torch.cat([self.rows, self.rows.new_zeros(rows - len(self.rows))])
        self.rows[slots] = continues
        self.active = bool(self.rows.any())

    def keep(self, rows: torch.Tensor) -> None:
        self.rows = self.rows[rows.cpu()] if len(self.rows) else self.rows
        self.active = bool(self.rows.any())


class KVCache:
    """The per-layer caches of one batch; a layer's is made when the layer first asks for it.
    ``shares_prefixes``: rows may continue a ``SharedPrefix`` (the model's attention allows it: no sliding window,
    whose positions count the cache's own columns)."""

    def __init__(self, capacity: int, shares_prefixes: bool = False):
        self.capacity = capacity
        self.shares_prefixes = shares_prefixes
        self.shared: SharedPrefix | None = None
        self._layers: dict[int, LayerCache] = {}

    def layer(self, index: int) -> LayerCache:
        if index not in self._layers:
            self._layers[index] = LayerCache(self.capacity, index, self.shared)
        return self._layers[index]

    @property
    def length(self) -> int:
        """Positions cached so far (every layer holds the same number after a forward)."""
        return next(iter(self._layers.values())).length if self._layers else 0

    def keep(self, rows: torch.Tensor) -> None:
        for layer in self._layers.values():
            layer.keep(rows)
        if self.shared is not None:
            self.shared.keep(rows)

    def repeat_rows(self, n: int) -> None:
        for layer in self._layers.values():
            layer.repeat_rows(n)

    def share(self, tokens: tuple[int, ...], source: KVCache) -> bool:
        """Whether rows placed here may continue ``tokens`` (kept in ``source``, one row) without a copy: the
        batch's shared prefix is that one, or it has none yet and now takes it."""
        if not self.shares_prefixes or not tokens:
            return False
        if self.shared is None:
            self.shared = SharedPrefix(tokens, source)
            for layer in self._layers.values():
                layer.shared = self.shared
        return self.shared.tokens == tokens

    def place(self, source: KVCache, slots: torch.Tensor, columns: torch.Tensor, rows: int,
              continues: bool = False) -> None:
        """Continuous batching: new requests' keys and values (``source``, prefilled apart) written into free rows
        (``slots``), right-aligned on this cache's length (``LayerCache.place``). ``continues``: the rows continue
        the shared prefix (``share``), and ``columns`` lists only what comes after it."""
        for index, layer in source._layers.items():
            self.layer(index).place(layer, slots, columns, rows)
        if self.shared is not None:
            self.shared.mark(slots, continues, rows)
        else:
            assert not continues, "share() the prefix first"

    def position_offsets(self) -> torch.Tensor | None:
        """``[batch, 1]``: what each row's positions start from (the shared prefix's length for the rows that
        continue it), or None."""
        if self.shared is None or not self.shared.active:
            return None
        return (self.shared.rows.long() * self.shared.length)[:, None]

    def rebase(self, width: int) -> None:
        """Right-align every row on ``width`` columns (``LayerCache.rebase``)."""
        for layer in self._layers.values():
            layer.rebase(width)

    def seeded(self, rows: int, capacity: int) -> KVCache:
        """A cache of ``rows`` rows, each starting with this one-row cache's positions (a prefix they share)."""
        out = KVCache(capacity, self.shares_prefixes)
        out._layers = {i: layer.seeded(rows, capacity) for i, layer in self._layers.items()}
        return out

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self._layers.values())


@dataclass(frozen=True)
class StagePart:
    """The part of a zoo model one pipeline stage runs (``parallel.mode=pipeline``): its layers, and whether it
    embeds the tokens (the first stage) and makes the logits (the last). A later stage takes the hidden states
    the stage before it made; an earlier one returns its hidden states instead of logits."""

    layers: range
    first: bool
    last: bool


class ZooCausalLM:
    """What the zoo's causal LMs share: they keep a cache (the planner reserves it) and make a fresh one per batch."""

    keeps_kv_cache = True  # generation keeps every layer's keys and values: the planner reserves them
    stage: StagePart | None = None  # a pipeline stage's part; None: the whole model
    width: int  # of the hidden states
    vocab_size: int

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for up to ``capacity`` positions; each layer's fills on the device it computes on."""
        return KVCache(capacity, shares_prefixes=self.shares_prefixes())

    def shares_prefixes(self) -> bool:
        """Whether a batch's rows may continue a prefix kept once (``SharedPrefix``): not with a sliding window,
        which counts positions on the cache's own columns."""
        return True

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_to_keep: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions (0: all); see ``forward_steps``."""
        return run_steps(self.forward_steps(idx, attention_mask, positions, cache, logits_to_keep, hidden))

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, cache: KVCache | None = None,
                      keep: int = 0) -> torch.Tensor:
        """The final hidden states ``[B, T, width]`` (after the final norm, before the head), of the last ``keep``
        positions only (0: all). Arguments as ``forward``'s; a right-padded batch takes its mask alone, and the
        real tokens' states are those each sequence would get by itself (``runner.infer.embed``)."""
        return run_steps(self.hidden_steps(idx, attention_mask, positions, cache, keep))

    def forward_steps(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, cache: KVCache | None = None,
                      logits_to_keep: int = 0, hidden: torch.Tensor | None = None) -> Steps:
        """``forward``, yielding between blocks (``runner.infer.column``): hidden states, then the head.
        ``hidden``: a later pipeline stage's input, the hidden states the stage before it returned."""
        x = yield from self.hidden_steps(idx, attention_mask, positions, cache, logits_to_keep, hidden)
        if self.stage is not None and not self.stage.last:
            return x
        yield
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head over final hidden states (a family may cap them, as Gemma 2 does)."""
        return self.lm_head(x)

    def hidden_steps(self, idx: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor | None,
                     cache: KVCache | None, keep: int, hidden: torch.Tensor | None = None) -> Steps:
        raise NotImplementedError

    def own_layers(self, count: int) -> range:
        """The layers this model runs: all, or its pipeline stage's."""
        return self.stage.layers if self.stage is not None else range(count)

    def embeds(self) -> bool:
        return self.stage is None or self.stage.first

    def stage_output(self, x: torch.Tensor, keep: int, norm: nn.Module) -> torch.Tensor:
        """The last step of ``hidden_steps``: the final norm (of the last ``keep`` positions); a stage before the
        last hands on every position's hidden states as they are, for the next stage's layers and caches."""
        if self.stage is not None and not self.stage.last:
            return x
        return norm(x[:, -keep:] if keep else x)

    def stage_input(self, idx: torch.Tensor, hidden: torch.Tensor | None, layer: nn.Module) -> torch.Tensor:
        """A later stage's input: the hidden states received, or (tracing the stage on meta) zeros like them."""
        if hidden is not None:
            return hidden
        like = next(layer.parameters())
        return torch.zeros(*idx.shape, self.width, dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class Step:
    """What every layer of one forward needs besides the hidden states."""

    start: int                    # positions already cached
    positions: torch.Tensor       # [batch or 1, tokens]
    mask: torch.Tensor | None     # from ``step_mask``; None: plain causal
    tokens: int = 0               # new this step
    reach: int = 0                # positions the furthest row spans after it (a shared prefix counted)
    windowed: dict[int, torch.Tensor | None] = field(default_factory=dict)  # masks by window, made once per forward

    def layer_cache(self, cache: KVCache | None, index: int) -> LayerCache | None:
        return cache.layer(index) if cache is not None else None

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The mask of a layer that attends to its last ``window`` positions only (None: all of them), as Hugging
        Face counts them: a query sees a key when ``query - key < window``, on the cache's own positions."""
        total = self.start + self.tokens
        if window is None or total <= window:
            return self.mask
        if window not in self.windowed:
            device = self.mask.device if self.mask is not None else self.positions.device
            query = torch.arange(self.start, total, device=device)[:, None]
            key = torch.arange(total, device=device)[None, :]
            within = ((key <= query) & (key > query - window))[None, None]
            self.windowed[window] = within if self.mask is None else self.mask & within
        return self.windowed[window]


def step(idx: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor | None,
         cache: KVCache | None) -> Step:
    """The positions and mask of a forward over ``idx [B, T]`` after what ``cache`` holds."""
    start = cache.length if cache is not None else 0
    tokens = idx.shape[1]
    reach = start + tokens
    if positions is None:
        positions = step_positions(attention_mask, start, tokens, idx.device)
        offsets = cache.position_offsets() if cache is not None else None
        if offsets is not None:  # the rows that continue a shared prefix count its positions first
            positions = positions + offsets.to(positions.device)
            reach = int(positions[:, -1].max()) + 1
    return Step(start, positions, step_mask(attention_mask, start, tokens), tokens, reach)


def step_positions(attention_mask: torch.Tensor | None, start: int, tokens: int, device: torch.device) -> torch.Tensor:
    """``[batch or 1, tokens]`` positions of this step's tokens: counted from each row's first real token,
    so a left-padded prompt sees the same positions as the same prompt alone."""
    if attention_mask is None:
        return torch.arange(start, start + tokens, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + tokens].to(device)


def step_mask(attention_mask: torch.Tensor | None, start: int, tokens: int) -> torch.Tensor | None:
    """``[batch, 1, tokens, start + tokens]`` booleans (True: may attend), or None when a plain causal mask
    does (no padding, and either a fresh sequence or a single new token)."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (start == 0 or tokens == 1):
        return None
    total = start + tokens
    device = attention_mask.device if attention_mask is not None else torch.device("cpu")
    query = torch.arange(start, total, device=device)[:, None]
    allowed = (torch.arange(total, device=device)[None, :] <= query)[None, None]
    if padded:
        assert attention_mask is not None
        allowed = allowed & attention_mask[:, None, None, :total].bool()
        # A padding query would see nothing at all (NaN); let it see itself. Its output is never used.
        allowed = allowed | (torch.arange(total, device=device)[None, :] == query)[None, None]
    return allowed
