"""The engine: a model planned, validated and loaded once, then asked to generate as often as you like.

    from runner import Engine
    engine = Engine.from_overrides(["model=gpt2xl", "placement=balanced_low_0"])
    for c in engine.generate(["The capital of France is"], temperature=0.7, max_new_tokens=32):
        print(c.text)

Loading follows ``runner.pipeline``: checkpoint headers, the tokenizer, the cache length the
task's prompts need (``runtime.seq_len``, unless set), the plan and its validation, then the
weights. Everything that can be wrong with the prompts is found before a weight is read.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from runner.config import RunConfig, compose
from runner.errors import GenerateError
from runner.infer.generate import Completion, GenerationStats, Request, generate
from runner.infer.model import CausalLM, causal_lm  # the model object is loaded in place
from runner.infer.prompts import encode_prompts, fit, task_requests
from runner.infer.sampling import SamplingParams
from runner.pipeline import Planned, RunResult, load, open_source, plan
from runner.tokenizer import Tokenizer


class Engine:
    """A loaded model with its tokenizer, plan and memory ledger.

    Args:
        config: the typed run config (``runner.config.load_config``, or ``Engine.from_overrides``).
        run_dir: where converted disk weights go unless ``offload.folder`` is set (default: a new temporary folder).
        check_task: check the config's own prompts (``task.prompts``) against the plan before any weight is read,
            as ``python -m runner`` does; from Python they only size the cache, when ``runtime.seq_len`` is null.

    Raises:
        RunnerError: bad input at any stage, one line per problem, before any weight is read where possible.
    """

    tokenizer: Tokenizer  # the checkpoint's own (or bytes, for synthetic weights)
    lm: CausalLM          # the loaded model, behind the generation contract
    loaded: RunResult     # the plan, its check, the ledger and the timings of every stage
    config: RunConfig     # as planned: runtime.seq_len derived

    def __init__(self, config: RunConfig, run_dir: Path | None = None, *, check_task: bool = False):
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="runner-"))
        self.stats = GenerationStats()
        start = time.perf_counter()
        checkpoint = open_source(config)
        opened = time.perf_counter() - start
        config, self.tokenizer, requests = task_requests(config, checkpoint)
        task = config.task
        planned: Planned = plan(config, self.run_dir, checkpoint)
        planned.timings["checkpoint"] = round(planned.timings.get("checkpoint", 0.0) + opened, 4)
        self.lm = causal_lm(planned.model, config.model.name)  # an encoder fails here, before loading
        if check_task:
            self._fit(requests, task.sampling.max_new_tokens, task.truncate, planned)
        self.loaded = load(planned, self.run_dir)
        self.config = planned.config

    @classmethod
    def from_overrides(cls, overrides: Sequence[str] = (), run_dir: Path | None = None) -> Engine:
        """Compose the shipped configs with command-line style overrides, as ``python -m runner`` does."""
        return cls(compose(overrides), run_dir)

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
        task = self.config.task
        params = params or task.sampling
        if fields:
            unknown = sorted(set(fields) - set(SamplingParams.__dataclass_fields__))
            if unknown:
                raise GenerateError(f"{', '.join(unknown)}: not a sampling setting; expected any of "
                                    f"{', '.join(SamplingParams.__dataclass_fields__)}")
            for key in ("stop", "stop_token_ids"):  # one string or id, or a list of them
                if key in fields:
                    value = fields[key]
                    fields[key] = (value,) if isinstance(value, (str, int)) else tuple(value)
            params = replace(params, **fields)
        requests = encode_prompts(self.tokenizer, prompts, task.chat if chat is None else chat)
        requests = self._fit(requests, params.max_new_tokens, task.truncate if truncate is None else truncate,
                             self.loaded)
        return generate(self.lm, self.tokenizer, requests, params, batch_size=self.config.runtime.batch_size,
                        seed=self.config.seed, stats=self.stats)

    def _fit(self, requests: list[Request], max_new_tokens: int, truncate: Literal["left"] | None,
             planned: Planned) -> list[Request]:
        seq_len = planned.config.runtime.seq_len
        assert seq_len is not None  # derived before planning
        return fit(requests, max_new_tokens, context=self.lm.block_size, seq_len=seq_len, truncate=truncate)
