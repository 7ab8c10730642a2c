"""The batching engine: one thread owns the model and answers queued work in batches that mix experts.

Requests arrive concurrently from the HTTP loop; each prompt becomes one :class:`Work`. The engine thread takes
the oldest waiting work and everything that can share its forward passes:

- LoRA experts (``ExpertKind.mixable``) and the plain backbone mix: one batch holds rows for up to the pool's
  capacity of distinct adapters, each row running its own adapter through PEFT's ``adapter_names`` (S-LoRA's and
  LoRAX's idea, on PEFT's mechanism). Generation is one ``generate`` call per batch; rank classification scores
  every (prompt, choice) pair of the batch in shared passes (``scoring.choice_log_likelihoods_batch``).
- Experts of other kinds (``ffn_adapter``, ``full``) change the backbone itself, so they cannot share a pass with
  anything else: their work waits in its expert's queue and is answered in batches of that expert alone, with the
  expert attached exclusively (the pool detaches the adapters first, and puts them back on after).

The batch is static (rows join only between batches), but a row that finishes early (its ``max_tokens``, a stop
string, end of sequence) is answered at once rather than when the longest row ends. When the engine is idle, it
waits a few milliseconds after the first arrival so that a burst of requests lands in one batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from elmreg.data.prompts import PromptedExample
from elmreg.inference.pool import BASE_ADAPTER, AdapterPool
from elmreg.inference.scoring import best_choice, choice_log_likelihoods_batch
from elmreg.registry.entities import Expert
from elmreg.registry.kinds import get_expert_kind, weights_kind

_log = logging.getLogger(__name__)

# Waiting this long after the first request of an idle spell costs little latency and lets a burst share a batch.
DEFAULT_BATCH_WINDOW_S = 0.005


@dataclass(frozen=True)
class GenerationParams:
    """What one prompt asks of generation (validated by the HTTP layer)."""

    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    temperature: float = 0.0  # 0: greedy, as elmreg predict
    logprobs: int | None = None  # how many alternatives per token to report; None: no log-probabilities
    seed: int | None = None


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Answer:
    """One prompt's answer: generated text, or the rank-classified choice with every choice's log-likelihood."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    choice_scores: list[float] | None = None


class Sink(Protocol):
    """Where the engine thread delivers a work's results (implementations hand them to the event loop)."""

    cancelled: bool

    def delta(self, text: str) -> None:
        """More generated text (only when streaming)."""

    def finish(self, answer: Answer) -> None: ...

    def fail(self, error: BaseException) -> None: ...


@dataclass
class Work:
    """One prompt to answer with one expert (None: the plain backbone)."""

    expert: Expert | None
    example: PromptedExample
    sink: Sink
    params: GenerationParams = field(default_factory=GenerationParams)
    stream: bool = False
    # False when the prompt was rendered by a chat template, which writes the special tokens itself.
    add_special_tokens: bool = True
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def classify(self) -> bool:
        return bool(self.example.answer_choices)

    @property
    def mixable(self) -> bool:
        return self.expert is None or get_expert_kind(weights_kind(self.expert)).mixable


class EngineObserver(Protocol):
    """What the engine reports (metrics)."""

    def batch(self, operation: str, rows: int, experts: int, seconds: float) -> None: ...

    def pool_change(self, hits: int, misses: int, evictions: int) -> None: ...

    def tokens_used(self, prompt: int, completion: int) -> None: ...


class Engine:
    """Answers :class:`Work` on one adapter pool, from one thread (PEFT's active adapters are process state)."""

    def __init__(
        self,
        pool: AdapterPool,
        *,
        max_batch: int = 8,
        observer: EngineObserver | None = None,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.pool = pool
        self.max_batch = max_batch
        self.observer = observer
        self.batch_window_s = batch_window_s
        self._pending: list[Work] = []
        self._condition = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="elmreg-engine", daemon=True)

    # -- the HTTP side -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, work: Sequence[Work]) -> None:
        """Queue work (thread-safe); results go to each work's sink."""
        with self._condition:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._pending.extend(work)
            self._condition.notify_all()

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._pending) + (1 if self._busy else 0)

    def close(self, timeout: float | None = None) -> None:
        """Answer everything queued, then stop the thread."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return  # closing, nothing left
                if len(self._pending) < self.max_batch and not self._closing:
                    self._condition.wait_for(
                        lambda: len(self._pending) >= self.max_batch or self._closing,
                        timeout=self.batch_window_s,
                    )
                batch = self._take_batch()
                self._busy = True
            try:
                self._answer(batch)
            except BaseException as error:  # a batch's failure is its requests' error, never the server's end
                _log.exception("a batch of %d failed", len(batch))
                for work in batch:
                    work.sink.fail(error)
            finally:
                with self._condition:
                    self._busy = False

    def _take_batch(self) -> list[Work]:
        """The oldest work and the waiting work that can share its passes (called with the lock held)."""
        head = self._pending[0]
        batch: list[Work] = []
        experts: set[int] = set()
        for work in self._pending:
            if len(batch) == self.max_batch:
                break
            if work.classify != head.classify or work.mixable != head.mixable:
                continue
            if not head.mixable:
                if work.expert.id == head.expert.id:
                    batch.append(work)
                continue
            if work.expert is not None and work.expert.id not in experts:
                if len(experts) == self.pool.capacity:
                    continue  # more distinct adapters than the pool holds at once: a later batch
                experts.add(work.expert.id)
            batch.append(work)
        taken = {id(w) for w in batch}
        self._pending = [w for w in self._pending if id(w) not in taken]
        return batch

    def _answer(self, batch: list[Work]) -> None:
        live = [w for w in batch if not w.sink.cancelled]
        if not live:
            return
        experts = list({w.expert.id: w.expert for w in live if w.expert is not None}.values())
        before = set(self.pool.resident)
        started = time.perf_counter()
        if not live[0].mixable:
            with self.pool.use(experts[0]) as model:
                self._run_batch(model, live, None)
        elif not experts:
            with self.pool.use(None) as model:
                self._run_batch(model, live, None)
        elif len(experts) == 1 and all(w.expert is not None for w in live):
            # One adapter for every row: the active adapter alone, without PEFT's per-row dispatch.
            with self.pool.use(experts[0]) as model:
                self._run_batch(model, live, None)
        else:
            with self.pool.use_mixed(experts) as (model, names):
                adapters = [names[w.expert.id] if w.expert else BASE_ADAPTER for w in live]
                self._run_batch(model, live, adapters)
        if self.observer is not None:
            after = set(self.pool.resident)
            wanted = {e.id for e in experts}
            self.observer.pool_change(
                hits=len(wanted & before), misses=len(wanted - before), evictions=len(before - after)
            )
            operation = "classify" if live[0].classify else "generate"
            self.observer.batch(operation, len(live), len(experts), time.perf_counter() - started)

    def _run_batch(self, model, batch: list[Work], adapters: list[str] | None) -> None:
        if batch[0].classify:
            self._classify(model, batch, adapters)
        else:
            generate_rows(model, self.pool.backbone, batch, adapters, observer=self.observer)

    def _classify(self, model, batch: list[Work], adapters: list[str] | None) -> None:
        backbone = self.pool.backbone
        examples = [w.example for w in batch]
        scores = choice_log_likelihoods_batch(model, backbone, examples, adapter_names=adapters)
        for work, values in zip(batch, scores, strict=True):
            prompt_tokens = len(backbone.tokenizer(work.example.input)["input_ids"])
            answer = best_choice(work.example, values)
            work.sink.finish(Answer(answer, "stop", prompt_tokens, 0, choice_scores=values))
            if self.observer is not None:
                self.observer.tokens_used(prompt_tokens, 0)


# -- generation with per-row limits, stop strings, streaming and log-probabilities ---------------------------
class _Rows(StoppingCriteria):
    """Follows each row of a ``generate`` call: decides when it is done and answers it right then.

    ``generate`` calls a stopping criterion once per step, after the step's tokens are appended, with one bool
    per row: rows reported done get padding from then on, and the call ends when every row is done.
    """

    def __init__(self, backbone, batch: list[Work], prompt_tokens: list[int], on_finish: Callable):
        self.tokenizer = backbone.tokenizer
        self.batch = batch
        self.prompt_tokens = prompt_tokens
        self.eos = backbone.tokenizer.eos_token_id
        self.tokens: list[list[int]] = [[] for _ in batch]
        self.emitted = [0] * len(batch)
        self.done = [False] * len(batch)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in batch]
        self.step_log_probs: torch.Tensor | None = None  # set by _LogprobRecorder for the current step
        self.on_finish = on_finish

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for row, work in enumerate(self.batch):
            if self.done[row]:
                continue
            if work.sink.cancelled:  # the client went away: stop spending passes on it
                self.done[row] = True
                continue
            token = new[row]
            if token == self.eos:
                self._finish(row, "stop")
                continue
            self.tokens[row].append(token)
            if work.params.logprobs is not None and self.step_log_probs is not None:
                self.logprobs[row].append(self._token_logprob(row, token, work.params.logprobs))
            text, stopped = self._text(row)
            if stopped:
                self._finish(row, "stop", text)
            elif len(self.tokens[row]) >= work.params.max_tokens:
                self._finish(row, "length", text)
            elif work.stream:
                self._emit(row, text, final=False)
        return torch.tensor(self.done, device=input_ids.device)

    def _token_logprob(self, row: int, token: int, top: int) -> TokenLogprob:
        values = self.step_log_probs[row]
        best = torch.topk(values, top).indices.tolist() if top else []
        return TokenLogprob(
            self.tokenizer.decode([token]),
            float(values[token]),
            [(self.tokenizer.decode([t]), float(values[t])) for t in best],
        )

    def _text(self, row: int) -> tuple[str, bool]:
        """The row's text so far, cut before the first stop string; and whether one was found."""
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        cuts = [text.find(s) for s in self.batch[row].params.stop if s and s in text]
        if cuts:
            return text[: min(cuts)], True
        return text, False

    def _emit(self, row: int, text: str, *, final: bool) -> None:
        if not final:
            # Hold back what could still turn out to be the start of a stop string, and half-decoded characters.
            hold = max((len(s) - 1 for s in self.batch[row].params.stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        if len(text) > self.emitted[row]:
            self.batch[row].sink.delta(text[self.emitted[row] :])
            self.emitted[row] = len(text)

    def _finish(self, row: int, reason: str, text: str | None = None) -> None:
        self.done[row] = True
        work = self.batch[row]
        if text is None:
            text, _ = self._text(row)
        if work.stream:
            self._emit(row, text, final=True)
        logprobs = self.logprobs[row] if work.params.logprobs is not None else None
        self.on_finish(
            work, Answer(text, reason, self.prompt_tokens[row], len(self.tokens[row]), logprobs=logprobs)
        )

    def finish_remaining(self) -> None:
        """Rows still open when ``generate`` returned (it reached ``max_new_tokens``)."""
        for row in range(len(self.batch)):
            if not self.done[row] and not self.batch[row].sink.cancelled:
                self._finish(row, "length")


class _LogprobRecorder(LogitsProcessor):
    """Keeps the step's log-probabilities (before any sampling temperature) for the rows that asked for them."""

    def __init__(self, rows: _Rows):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.rows.step_log_probs = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _RowTemperatures(LogitsProcessor):
    """Sampling with each row's own temperature; greedy rows (temperature 0) keep only their arg-max, so
    sampling picks exactly the token greedy decoding would."""

    def __init__(self, temperatures: Sequence[float]):
        self.temperatures = list(temperatures)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for row, temperature in enumerate(self.temperatures):
            if temperature > 0:
                out[row] = scores[row] / temperature
            else:
                keep = int(torch.argmax(scores[row]))
                out[row] = float("-inf")
                out[row, keep] = scores[row, keep]
        return out


@torch.no_grad()
def generate_rows(
    model, backbone, batch: list[Work], adapters: list[str] | None, *, observer: EngineObserver | None = None
) -> None:
    """Generate for every work of the batch in one ``generate`` call, answering each row as it finishes.

    Greedy rows get exactly what ``scoring.generate`` (``elmreg predict``) gives: the same call, tokens and
    decoding; sampling applies only to rows that asked for a temperature.
    """
    tokenizer = backbone.tokenizer
    ids = [tokenizer(w.example.input, add_special_tokens=w.add_special_tokens)["input_ids"] for w in batch]
    # Causal LMs continue from the last real token, so their prompts are padded on the left.
    tokenizer.padding_side = "left" if backbone.family == "causal" else "right"
    try:
        encoded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(backbone.device)
    finally:
        tokenizer.padding_side = "right"

    def finished(work: Work, answer: Answer) -> None:
        work.sink.finish(answer)
        if observer is not None:
            observer.tokens_used(answer.prompt_tokens, answer.completion_tokens)

    rows = _Rows(backbone, batch, [len(i) for i in ids], finished)
    processors = LogitsProcessorList()
    if any(w.params.logprobs is not None for w in batch):
        processors.append(_LogprobRecorder(rows))
    sampling: dict[str, Any] = {"do_sample": False}
    if any(w.params.temperature > 0 for w in batch):
        processors.append(_RowTemperatures([w.params.temperature for w in batch]))
        seeds = {w.params.seed for w in batch if w.params.seed is not None}
        if seeds:
            torch.manual_seed(min(seeds))  # one generator per batch: a seed makes a lone request repeatable
        # top_k=0 / top_p=1 turn off the model's default sampling filters: the temperature is the whole recipe.
        sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    mixed = {} if adapters is None else {"adapter_names": adapters}
    model.generate(
        **encoded,
        **mixed,
        **sampling,
        max_new_tokens=max(w.params.max_tokens for w in batch),
        logits_processor=processors,
        stopping_criteria=StoppingCriteriaList([rows]),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    rows.finish_remaining()
