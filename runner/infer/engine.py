"""The engine: a model planned, validated and loaded once, then asked to generate, score or embed as often as you like.

    from runner import Engine
    engine = Engine.from_overrides(["model=gpt2xl", "placement=balanced_low_0"])
    for c in engine.generate(["The capital of France is"], temperature=0.7, max_new_tokens=32):
        print(c.text)

The engine is the one way to plan and load a model. Its first half, ``Engine.plan``, is what ``mode=plan`` and
``mode=check`` run: checkpoint headers, the tokenizer, the cache length the config's inline rows need
(``runtime.seq_len``, unless set), the plan and its validation (``runner.plan.planned``), no weight read. The
engine itself then loads the weights (``runner.load.loaded``). Whatever can be checked before a weight is read is
checked then (``before_load``).
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from runner.run.launch import Launch
from runner.plan.compute import pipeline_stagger
from runner.config import EmbedTask, GenerateTask, RunConfig, compose
from runner.errors import GenerateError
from runner.infer.batches import length_batches
from runner.infer.finite import NonFiniteOutput, explained
from runner.infer.embed import Encoder, Pooling, embed, encoder
from runner.infer.generate import Completion, GenerationStats, Request, generate
from runner.infer.model import CausalLM, causal_lm, context_length
from runner.infer.pipelined import PipelinedLM
from runner.infer.prefixes import PrefixCache
from runner.infer.prompts import encode_prompts, fit, fit_tokens, plan_inputs
from runner.infer.sampling import SamplingParams
from runner.load.memory import plan_held
from runner.infer.score import Score, ScoreRequest, pair_request, score, text_request
from runner.load.offload import Prefetcher
from runner.load.loaded import Loaded, load
from runner.plan.planned import Planned, open_source, plan
from runner.infer.tokenizer import Tokenizer, tokenizer_for


class Engine:
    """A loaded model with its tokenizer, plan and memory ledger.

    Args:
        config: the typed run config (``runner.config.load_config``, or ``Engine.from_overrides``).
        run_dir: where converted disk weights go unless ``offload.folder`` is set (default: a new temporary folder).
        before_load: called once planning is done and before any weight is read, with the engine as it is then
            (``tokenizer``, ``config``, ``context`` set): a batch job checks its first rows here.

    Raises:
        RunnerError: bad input at any stage, one line per problem, before any weight is read where possible;
            a model that cannot run the config's task (an encoder asked to generate) among them.
    """

    model: torch.nn.Module  # the dispatched model
    loaded: Loaded     # the plan, its check, the ledger and the timings of every stage
    config: RunConfig     # as planned: runtime.seq_len derived
    context: int          # the longest sequence the model takes

    def __init__(self, config: RunConfig, run_dir: Path | None = None, *, launch: Launch | None = None,
                 before_load: Callable[[Engine], None] | None = None):
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="runner-"))
        self.launch = launch
        self.stats = GenerationStats()
        planned, self._tokenizer = Engine.plan(config, self.run_dir, launch, tokenizer=False)
        self._headers = planned.checkpoint
        # prompt prefixes' keys and values, kept across calls in the room the plan leaves for them
        self.prefixes = PrefixCache(planned.prefixes.positions if planned.prefixes else 0)
        self.config = planned.config
        self.model = planned.model
        (self._encoder if isinstance(config.task, EmbedTask) else self._lm)()  # the wrong model fails before loading
        self.context = context_length(self.model) or 1 << 30
        if before_load is not None:
            before_load(self)
        self.loaded = load(planned, self.run_dir)

    @staticmethod
    def plan(config: RunConfig, run_dir: Path, launch: Launch | None = None, *, tokenizer: bool = True
             ) -> tuple[Planned, Tokenizer | None]:
        """The first half: the model on meta, planned and validated, with its tokenizer; no weight is read.

        Args:
            launch: this rank's place under torchrun (its stage, GPUs and share of RAM), or the rank a cluster is
                sized for by ``mode=plan``.
            tokenizer: whether to load the tokenizer (it sizes ``runtime.seq_len`` from inline rows when unset);
                a plan for a set length needs none, and a checkpoint without one can still be planned.
        """
        start = time.perf_counter()
        config, checkpoint = open_source(config)
        opened = time.perf_counter() - start
        words = None
        if tokenizer or config.runtime.seq_len is None:
            config, words = plan_inputs(config, checkpoint)
        planned = plan(config, run_dir, checkpoint, launch)
        planned.timings["checkpoint"] = round(planned.timings.get("checkpoint", 0.0) + opened, 4)
        return planned, words

    @property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's own (or bytes, for synthetic weights), read when first needed: when it sizes
        ``runtime.seq_len`` from inline prompts, when a batch job checks its first rows (both before any weight
        is read), or on the first text given. A job given token ids needs none."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self._headers, self.config.tokenizer_path,
                                            self.config.model.arch.get("vocab_size"),
                                            synthetic=self.config.checkpoint.source == "synthetic")
        return self._tokenizer

    @classmethod
    def from_overrides(cls, overrides: Sequence[str] = (), run_dir: Path | None = None) -> Engine:
        """Compose the shipped configs with command-line style overrides, as ``python -m runner`` does."""
        return cls(compose(overrides), run_dir)

    @property
    def seq_len(self) -> int:
        """The longest sequence the plan reserved room for."""
        assert self.config.runtime.seq_len is not None  # derived before planning
        return self.config.runtime.seq_len

    @contextlib.contextmanager
    def explain_non_finite(self) -> Iterator[None]:
        """NaN or Inf in an output becomes one line naming the module where they first appear."""
        try:
            yield
        except NonFiniteOutput as e:
            raise explained(e, self.model, self.loaded.dtype) from None

    def memory_checked(self) -> contextlib.AbstractContextManager[None]:
        """A real allocation failing despite the plan becomes one line naming the device and the bytes."""
        loaded = self.loaded
        return plan_held(loaded.hardware, loaded.check.loads, loaded.plan.reserves, f"running {self.config.task.name}")

    @property
    def streams(self) -> Prefetcher | None:
        """What brings streamed blocks in; micro-batches share its loads."""
        return self.loaded.streams

    @property
    def stagger(self) -> int:
        """Blocks between micro-batches in a pipeline over the GPUs; 0: none (``runner.plan.compute.pipeline_stagger``)."""
        return pipeline_stagger(self.loaded.layout.blocks, self.loaded.compute)

    @property
    def lm(self) -> CausalLM:
        """The model behind the generation contract (generate, score)."""
        return self._lm()

    @property
    def encoder(self) -> Encoder:
        """The model behind the hidden-states contract (embed)."""
        return self._encoder()

    def generate(self, prompts: Sequence[str], params: SamplingParams | None = None, *, chat: bool | None = None,
                 truncate: Literal["left"] | None = None, **fields: Any) -> list[Completion]:
        """A completion per prompt, in input order.

        Args:
            prompts: the texts to complete.
            params: how to sample and stop; default: the config's task settings. ``fields`` (``temperature=``,
                ``max_new_tokens=``, ``stop=``...) override single ``SamplingParams`` fields.
            chat: wrap each prompt in the chat template (default: the config's ``task.chat``).
            truncate: ``"left"`` cuts a prompt that does not fit the context (default: the config's).
        """
        task = self.config.task if isinstance(self.config.task, GenerateTask) else GenerateTask(SamplingParams())
        params = sampling_params(params or task.sampling, fields)
        requests = encode_prompts(self.tokenizer, prompts, task.chat if chat is None else chat)
        requests = fit(requests, params.max_new_tokens, context=self.context, seq_len=self.seq_len,
                       truncate=task.truncate if truncate is None else truncate)
        with self.explain_non_finite(), self.memory_checked():
            return self.complete(requests, params)

    def score(self, texts: Sequence[str | tuple[str, str]]) -> list[Score]:
        """The log-likelihood of each text, or of each ``(prompt, continuation)`` pair's continuation given its
        prompt, in input order; batches of ``runtime.batch_size``, sorted by length."""
        requests = [pair_request(self.tokenizer, i, *t) if isinstance(t, tuple) else
                    text_request(self.tokenizer, i, t) for i, t in enumerate(_listed(texts, "texts"))]
        for r in requests:
            self._check_fits(r.index, r.tokens)
        out = {}
        with self.explain_non_finite(), self.memory_checked():
            for batch in length_batches(requests, self.config.runtime.batch_size, length=lambda r: len(r.tokens)):
                out.update(zip((r.index for r in batch), self.score_batch(batch)))
        return [out[r.index] for r in requests]

    def embed(self, texts: Sequence[str], *, pooling: Pooling | None = None,
              normalize: bool | None = None) -> torch.Tensor:
        """One vector per text, ``[len(texts), hidden]`` float32, in input order (default pooling and
        normalisation: the config's ``task.pooling`` and ``task.normalize`` with task=embed, else mean and true)."""
        task = self.config.task if isinstance(self.config.task, EmbedTask) else EmbedTask()
        tokens = [self.tokenizer.encode(t, add_special_tokens=True) for t in _listed(texts, "texts")]
        for i, t in enumerate(tokens):
            self._check_fits(i, tuple(t))
        vectors: dict[int, torch.Tensor] = {}
        with self.explain_non_finite(), self.memory_checked():
            for batch in length_batches(list(range(len(tokens))), self.config.runtime.batch_size,
                                        length=lambda i: len(tokens[i])):
                pooled = self.embed_batch([tokens[i] for i in batch], pooling=pooling or task.pooling,
                                          normalize=task.normalize if normalize is None else normalize)
                vectors.update(zip(batch, pooled))
        return torch.stack([vectors[i] for i in range(len(tokens))])

    # The batch-level primitives: token ids in, results out, one per request in order. ``generate``, ``score`` and
    # ``embed`` above turn texts into requests first; a batch job's rows (``runner.run``) are turned into requests
    # by its row task. Both run the model through these alone.

    def complete(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        """Generation: each request's completion (micro-batched, streamed blocks shared across the column)."""
        runtime = self.config.runtime
        return generate(self.lm, self.tokenizer, requests, params, batch_size=runtime.batch_size,
                        micro_batches=runtime.micro_batches, seed=self.config.seed, stats=self.stats,
                        streams=self.streams, stagger=self.stagger, room=self.seq_len, prefixes=self.prefixes)

    def score_batch(self, requests: list[ScoreRequest]) -> list[Score]:
        """Scoring: one forward over the batch, each request's log-likelihood."""
        return score(self.lm, requests, pad_id=self.tokenizer.pad_id or 0)

    def embed_batch(self, tokens: list[Sequence[int]], *, pooling: Pooling, normalize: bool) -> torch.Tensor:
        """Embedding: one forward over the batch, ``[len(tokens), hidden]`` pooled vectors."""
        return embed(self.encoder, tokens, pooling=pooling, normalize=normalize, pad_id=self.tokenizer.pad_id or 0)

    def fit(self, tokens: tuple[int, ...], max_new_tokens: int = 0, truncate: Literal["left"] | None = None
            ) -> tuple[int, ...]:
        """A request's tokens checked against the model's context and the planned length (cut on the left with
        ``truncate="left"``), leaving room for ``max_new_tokens``."""
        return fit_tokens(tokens, max_new_tokens, context=self.context, seq_len=self.seq_len, truncate=truncate)

    def _check_fits(self, index: int, tokens: tuple[int, ...]) -> None:
        """A text to score or embed fits the model's context and the planned length."""
        try:
            self.fit(tokens)
        except GenerateError as e:
            raise GenerateError(f"texts[{index}]: {e.lines[0]}") from None

    def _lm(self) -> CausalLM:
        lm = causal_lm(self.model, self.config.model.name)
        if self.config.parallel.mode != "pipeline" or self.launch is None or not hasattr(self, "loaded"):
            return lm
        return PipelinedLM(self.model, self.launch, self.loaded.dtype, torch.device(self.loaded.hardware.main_device))

    def _encoder(self) -> Encoder:
        return encoder(self.model, self.config.model.name)


def sampling_params(params: SamplingParams, fields: dict[str, Any]) -> SamplingParams:
    """``params`` with single fields replaced (``temperature=0.7``, ``stop="\\n"``).

    Raises:
        GenerateError: a field that is not a sampling setting, or a value ``SamplingParams`` refuses.
    """
    if not fields:
        return params
    unknown = sorted(set(fields) - set(SamplingParams.__dataclass_fields__))
    if unknown:
        raise GenerateError(f"{', '.join(unknown)}: not a sampling setting; expected any of "
                            f"{', '.join(SamplingParams.__dataclass_fields__)}")
    fields = dict(fields)
    for key in ("stop", "stop_token_ids"):  # one string or id, or a list of them
        if key in fields:
            value = fields[key]
            fields[key] = (value,) if isinstance(value, (str, int)) else tuple(value)
    return replace(params, **fields)


def _listed(texts: Sequence[Any], name: str) -> Sequence[Any]:
    if isinstance(texts, str):
        raise GenerateError(f"{name}: expected a list of strings, got one string; wrap it in a list")
    return texts
