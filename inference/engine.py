"""The engine: answers prompts, each with the :class:`~elmreg.inference.assignment.Answerer` a router (or the
caller) assigned it. Every entry point (predict, eval, the benchmark, the experiments, ``elmreg serve``) hands
its prompts to an :class:`Engine`; they differ only in how they queue prompts and shape the answers.

:class:`PeftEngine` is the in-process implementation, on one backbone's adapter pool:

- LoRA experts (``ExpertKind.mixable``) and the plain backbone mix: one batch holds rows for up to the pool's
  capacity of distinct adapters, each row running its own adapter through PEFT's ``adapter_names`` (S-LoRA's and
  LoRAX's idea, on PEFT's mechanism). Rank classification scores every (prompt, choice) pair of such a batch in
  shared passes; generation is one ``generate`` call per batch.
- A batch of one answerer's rows runs that answerer alone. Rank classification then scores prompt by prompt
  (``scoring.choice_log_likelihoods``: a long prompt's key/value cache is shared by its choices).
- Experts of other kinds (``ffn_adapter``, ``full``) change the backbone itself, and a mixture (Arrow) puts every
  resident adapter under its router: their rows run in batches of that answerer alone, attached exclusively.

A row that finishes early (its ``max_tokens``, a stop string, end of sequence) is answered at once rather than
when the longest row of its batch ends. The engine never changes shared tokenizer state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from elmreg.data.prompts import PromptedExample
from elmreg.inference.assignment import Answerer, Assignment
from elmreg.inference.pool import BASE_ADAPTER, AdapterPool
from elmreg.inference.scoring import best_choice, choice_log_likelihoods, choice_log_likelihoods_batch
from elmreg.models.backbones import Backbone
from elmreg.registry.errors import UserError
from elmreg.registry.progress import SILENT, Reporter

# Offline callers (predict, eval) generate up to this many tokens per instance.
DEFAULT_MAX_NEW_TOKENS = 64
# Prompts per batch for offline callers: bounds activation memory of a generate call.
DEFAULT_MAX_BATCH = 8


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


class EngineObserver(Protocol):
    """What the engine reports (metrics)."""

    def batch(self, operation: str, rows: int, experts: int, seconds: float) -> None: ...

    def pool_change(self, hits: int, misses: int, evictions: int) -> None: ...

    def tokens_used(self, prompt: int, completion: int) -> None: ...


class Sink(Protocol):
    """Where an engine delivers one prompt's results (a server's implementation hands them to its event loop)."""

    cancelled: bool

    def delta(self, text: str) -> None:
        """More generated text (only when streaming)."""

    def finish(self, answer: Answer) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class _Collect:
    """The sink of an offline call: keeps the answer."""

    cancelled = False

    def __init__(self) -> None:
        self.answer: Answer | None = None

    def delta(self, text: str) -> None:
        pass

    def finish(self, answer: Answer) -> None:
        self.answer = answer

    def fail(self, error: BaseException) -> None:
        raise error


@dataclass
class Prompt:
    """One prompt to answer, by its answerer, delivered to its sink."""

    answerer: Answerer
    example: PromptedExample
    sink: Sink = field(default_factory=_Collect)
    params: GenerationParams = field(default_factory=GenerationParams)
    stream: bool = False
    # False when the prompt was rendered by a chat template, which writes the special tokens itself.
    add_special_tokens: bool = True
    # None: rank classification when the example has answer choices.
    classify_as: bool | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def classify(self) -> bool:
        return self.classify_as if self.classify_as is not None else bool(self.example.answer_choices)


def prompts_for(
    examples: Sequence[PromptedExample],
    assignment: Assignment,
    *,
    task_type: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[Prompt]:
    """The prompts of an offline call: rank classification for every example where they all carry answer
    choices (or ``task_type`` says classification), greedy generation otherwise."""
    if len(examples) != len(assignment):
        raise UserError(f"{len(examples)} instances but {len(assignment)} answerers; give one per instance")
    classify = task_type == "classification" or (
        task_type is None and all(e.answer_choices for e in examples)
    )
    params = GenerationParams(max_tokens=max_new_tokens)
    return [
        Prompt(answerer, example, params=params, classify_as=classify)
        for answerer, example in zip(assignment.answerers, examples, strict=True)
    ]


class Engine(Protocol):
    """Answers prompts. ``take_batch`` says which waiting prompts can share the oldest one's work; ``run``
    answers one such batch, delivering to each prompt's sink (deltas first when it streams)."""

    max_batch: int

    def take_batch(self, pending: Sequence[Prompt]) -> list[Prompt]: ...

    def run(self, batch: Sequence[Prompt]) -> None: ...


def answer(engine: Engine, prompts: Sequence[Prompt], *, progress: Reporter = SILENT) -> list[Answer]:
    """Every prompt answered by ``engine`` in batches it chooses, in input order (the offline entry point);
    ``progress`` is told how many are answered after each batch (the caller starts and finishes the step)."""
    sinks = [_Collect() for _ in prompts]
    pending = [replace(p, sink=s) for p, s in zip(prompts, sinks, strict=True)]
    done = 0
    while pending:
        batch = engine.take_batch(pending)
        taken = {id(p) for p in batch}
        pending = [p for p in pending if id(p) not in taken]
        engine.run(batch)
        done += len(batch)
        progress.advance(done)
    return [s.answer for s in sinks]


def answer_texts(
    engine: Engine,
    examples: Sequence[PromptedExample],
    assignment: Assignment,
    *,
    task_type: str | None = None,
    progress: Reporter = SILENT,
) -> list[str]:
    """The answer text of every example (whitespace-stripped generations, or the chosen answer choice)."""
    prompts = prompts_for(examples, assignment, task_type=task_type)
    return [a.text.strip() for a in answer(engine, prompts, progress=progress)]


class PeftEngine:
    """The in-process engine: PEFT adapters on one backbone's :class:`AdapterPool`. Not thread-safe: PEFT's
    active adapters are process state, so one thread runs it (``elmreg serve`` queues in front of it)."""

    def __init__(
        self,
        pool: AdapterPool | None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        observer: EngineObserver | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.pool = pool
        self.max_batch = max_batch
        self.observer = observer
        self.runs = 0  # batches answered: tests count that every entry point comes through here

    @property
    def backbone(self) -> Backbone:
        return self.pool.backbone

    def take_batch(self, pending: Sequence[Prompt]) -> list[Prompt]:
        """The oldest prompt and the waiting ones that can share its passes: the same operation, and either its
        own (non-mixable) answerer, or mixable answerers up to the pool's capacity of distinct adapters."""
        head = pending[0]
        batch: list[Prompt] = []
        adapters: set[tuple] = set()
        for prompt in pending:
            if len(batch) == self.max_batch:
                break
            if prompt.classify != head.classify or prompt.answerer.mixable != head.answerer.mixable:
                continue
            if not head.answerer.mixable:
                if prompt.answerer.key == head.answerer.key:
                    batch.append(prompt)
                continue
            if prompt.answerer.expert is not None and prompt.answerer.key not in adapters:
                if len(adapters) == self.pool.capacity:
                    continue  # more distinct adapters than the pool holds at once: a later batch
                adapters.add(prompt.answerer.key)
            batch.append(prompt)
        return batch

    def run(self, batch: Sequence[Prompt]) -> None:
        live = [p for p in batch if not p.sink.cancelled]
        if not live:
            return
        self.runs += 1
        experts = list({p.answerer.expert.id: p.answerer.expert for p in live if p.answerer.expert}.values())
        before = set(self.pool.resident) if self.observer is not None else set()
        started = time.perf_counter()
        with self._model(live, experts) as (model, adapters):
            if live[0].classify:
                self._classify(model, live, adapters)
            else:
                generate_rows(model, self.backbone, live, adapters, observer=self.observer)
        if self.observer is not None:
            after = set(self.pool.resident)
            wanted = {e.id for e in experts}
            self.observer.pool_change(
                hits=len(wanted & before), misses=len(wanted - before), evictions=len(before - after)
            )
            operation = "classify" if live[0].classify else "generate"
            self.observer.batch(operation, len(live), len(experts), time.perf_counter() - started)

    @contextmanager
    def _model(self, batch: list[Prompt], experts: list) -> Iterator[tuple[Any, list[str] | None]]:
        """The model for a batch, and each row's adapter name when rows mix adapters (None: one answerer)."""
        head = batch[0].answerer
        if head.mixture is not None:
            mixture = head.mixture
            with self.pool.use_arrow(
                mixture.experts, top_k=mixture.top_k, temperature=mixture.temperature
            ) as model:
                yield model, None
        elif len({p.answerer.key for p in batch}) == 1:
            # One answerer for every row: its adapter alone, without PEFT's per-row dispatch.
            with self.pool.use(head.expert) as model:
                yield model, None
        else:
            with self.pool.use_mixed(experts) as (model, names):
                yield (
                    model,
                    [names[p.answerer.expert.id] if p.answerer.expert else BASE_ADAPTER for p in batch],
                )

    def _classify(self, model, batch: list[Prompt], adapters: list[str] | None) -> None:
        examples = [p.example for p in batch]
        if adapters is None:
            scores = [choice_log_likelihoods(model, self.backbone, e) for e in examples]
        else:
            scores = choice_log_likelihoods_batch(model, self.backbone, examples, adapter_names=adapters)
        for prompt, values in zip(batch, scores, strict=True):
            prompt_tokens = len(self.backbone.tokenizer(prompt.example.input)["input_ids"])
            chosen = best_choice(prompt.example, values)
            prompt.sink.finish(Answer(chosen, "stop", prompt_tokens, 0, choice_scores=values))
            if self.observer is not None:
                self.observer.tokens_used(prompt_tokens, 0)


# -- generation with per-row limits, stop strings, streaming and log-probabilities ---------------------------
class _Rows(StoppingCriteria):
    """Follows each row of a ``generate`` call: decides when it is done and answers it right then.

    ``generate`` calls a stopping criterion once per step, after the step's tokens are appended, with one bool
    per row: rows reported done get padding from then on, and the call ends when every row is done.
    """

    def __init__(self, backbone, batch: list[Prompt], prompt_tokens: list[int], on_finish: Callable):
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
    model,
    backbone,
    batch: list[Prompt],
    adapters: list[str] | None,
    *,
    observer: EngineObserver | None = None,
) -> None:
    """Generate for every work of the batch in one ``generate`` call, answering each row as it finishes.

    Greedy decoding unless a row asked for a temperature (sampling applies only to those rows).
    """
    tokenizer = backbone.tokenizer
    ids = [tokenizer(w.example.input, add_special_tokens=w.add_special_tokens)["input_ids"] for w in batch]
    # Causal LMs continue from the last real token, so their prompts are padded on the left (asked per call:
    # the tokenizer is shared, and its own padding side stays as it is).
    side = "left" if backbone.family == "causal" else "right"
    encoded = tokenizer.pad({"input_ids": ids}, padding=True, padding_side=side, return_tensors="pt")
    encoded = encoded.to(backbone.device)

    def finished(work: Prompt, answer: Answer) -> None:
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


class LoadedModelEngine(PeftEngine):
    """Answers every prompt with one model already on its backbone, whatever the prompt's answerer: weights that
    are not (yet) an expert of the catalogue, such as a merge candidate being tuned."""

    def __init__(self, model, backbone: Backbone, *, max_batch: int = DEFAULT_MAX_BATCH):
        super().__init__(None, max_batch=max_batch)
        self._loaded_model, self._backbone = model, backbone

    @property
    def backbone(self) -> Backbone:
        return self._backbone

    def take_batch(self, pending: Sequence[Prompt]) -> list[Prompt]:
        head = pending[0]
        return [p for p in pending if p.classify == head.classify][: self.max_batch]

    @contextmanager
    def _model(self, batch: list[Prompt], experts: list) -> Iterator[tuple[Any, list[str] | None]]:
        yield self._loaded_model, None
