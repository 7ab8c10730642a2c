"""The vLLM engine: the :class:`~elmreg.inference.engine.Engine` protocol over a vLLM OpenAI server.

elmreg keeps what vLLM has no notion of (who answers: the routers, the audit, the catalogue); vLLM does the
generation and the scoring (paged attention, continuous batching, its LoRA kernels). Each prompt is one HTTP
call, and the calls of a batch run concurrently so that vLLM's scheduler sees them all at once.

- The plain backbone is vLLM's served model; a LoRA expert is the adapter ``expert-<id>``, loaded once through
  ``POST /v1/load_lora_adapter`` from a PEFT folder elmreg writes from the verified (sha256-checked) weights.
  vLLM serves LoRA adapters only: an Arrow mixture, or an expert of another kind (``ffn_adapter``, ``full``, a
  merge of those), is refused with a one-line error that names the built-in engine.
- Prompts go as token ids from elmreg's own tokenizer, so both engines read exactly the same tokens, and rank
  classification knows where each choice's tokens start: the choice's log-likelihood is the sum of the
  prompt log-probabilities (``echo`` + ``logprobs``) at those positions, end of sequence included, as
  ``inference.scoring`` computes it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from elmreg.experts.lora import export_peft_folder
from elmreg.inference.engine import Answer, EngineObserver, Prompt, TokenLogprob
from elmreg.inference.scoring import best_choice
from elmreg.inference.vllm_server import VllmEndpoint
from elmreg.models.encoding import target_text
from elmreg.registry.entities import Expert
from elmreg.registry.errors import ElmregError, ServiceError, UserError, first_line
from elmreg.registry.kinds import LORA, weights_kind
from elmreg.runtime.context import RegistryContext

# Prompts handed to vLLM at once; its own scheduler decides how many run in one step.
DEFAULT_MAX_BATCH = 256
# Generous: a long generation on a busy CPU takes minutes.
REQUEST_TIMEOUT_S = 600.0
_MAX_SOURCE_TOKENS = 512  # as inference.scoring truncates prompts for rank classification
_MAX_CHOICE_TOKENS = 128


@dataclass(frozen=True)
class ServedBackbone:
    """What elmreg itself needs of a backbone vLLM runs: its name and tokenizer (no weights in this process)."""

    name: str
    family: str
    tokenizer: Any
    path: Path


def load_served_backbone(name: str, folder: Path) -> ServedBackbone:
    """The tokenizer of the backbone in ``folder``.

    Raises:
        UserError: The backbone is a seq2seq model (vLLM's LoRA serving is for decoder-only models).
    """
    from transformers import AutoConfig, AutoTokenizer

    if getattr(AutoConfig.from_pretrained(folder), "is_encoder_decoder", False):
        raise UserError(
            f"backbone {name} is a seq2seq model, which the vLLM engine does not serve; use --engine peft"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ServedBackbone(name, "causal", tokenizer, folder)


def lora_name(expert: Expert) -> str:
    """The adapter name an expert has in vLLM (ids are never reused, and an id's weights never change)."""
    return f"expert-{expert.id}"


class VllmEngine:
    """Answers prompts through a vLLM OpenAI server (see the module docstring). Thread-safe."""

    def __init__(
        self,
        context: RegistryContext,
        backbone: ServedBackbone,
        endpoint: VllmEndpoint,
        *,
        max_lora_rank: int,
        max_batch: int = DEFAULT_MAX_BATCH,
        observer: EngineObserver | None = None,
        on_close=None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.context = context
        self.backbone = backbone
        self.endpoint = endpoint
        self.max_lora_rank = max_lora_rank
        self.max_batch = max_batch
        self.observer = observer
        self.runs = 0
        self._client = httpx.Client(
            base_url=endpoint.url,
            headers=endpoint.headers,
            timeout=REQUEST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=max_batch, max_keepalive_connections=max_batch),
        )
        self._calls = ThreadPoolExecutor(max_workers=min(max_batch, 64), thread_name_prefix="elmreg-vllm")
        self._loaded: set[str] = set()
        self._load_lock = threading.Lock()
        self._adapter_root = context.settings.cache_path / "vllm-adapters"
        self._on_close = on_close

    def queue(self) -> ConcurrentQueue:
        """A queue for a server in front of this engine (see :class:`ConcurrentQueue`)."""
        return ConcurrentQueue(self)

    def close(self) -> None:
        self._calls.shutdown(wait=True)
        self._client.close()
        if self._on_close is not None:
            self._on_close()

    # -- the Engine protocol -------------------------------------------------------------------------------
    def take_batch(self, pending: Sequence[Prompt]) -> list[Prompt]:
        """Every waiting prompt (up to ``max_batch``): each is its own call, so any mix shares vLLM's steps."""
        return list(pending[: self.max_batch])

    def run(self, batch: Sequence[Prompt]) -> None:
        live = [p for p in batch if not p.sink.cancelled]
        if not live:
            return
        self.runs += 1
        started = time.perf_counter()
        calls = []
        for prompt in live:
            try:
                model = self.model_name(prompt.answerer)
            except ElmregError as error:  # not servable here, or its weights failed their check
                prompt.sink.fail(error)
                continue
            if len(live) == 1:
                self._answer(prompt, model)
            else:
                calls.append(self._calls.submit(self._answer, prompt, model))
        for call in calls:
            call.result()
        if self.observer is not None:
            experts = len({p.answerer.key for p in live if p.answerer.expert is not None})
            for operation, rows in (
                ("classify", sum(p.classify for p in live)),
                ("generate", sum(not p.classify for p in live)),
            ):
                if rows:
                    self.observer.batch(operation, rows, experts, time.perf_counter() - started)

    # -- adapters ------------------------------------------------------------------------------------------
    def model_name(self, answerer) -> str:
        """The model name vLLM answers ``answerer`` by, loading its adapter into vLLM on first use.

        Raises:
            UserError: vLLM cannot answer it (a mixture, a kind other than LoRA, a rank above the server's).
        """
        if answerer.mixture is not None:
            raise UserError(
                f"the vLLM engine cannot answer an Arrow mixture of {len(answerer.mixture.experts)} experts "
                "(vLLM serves one LoRA adapter per prompt); the built-in engine (--engine peft) can"
            )
        expert = answerer.expert
        if expert is None:
            return self.endpoint.model
        kind = weights_kind(expert)
        if kind != LORA.name:
            shown = kind if kind == expert.kind else f"{expert.kind} (of {kind} experts)"
            raise UserError(
                f"expert '{expert.name}' is a {shown} expert, which vLLM cannot serve (it serves LoRA "
                "adapters); the built-in engine (--engine peft) can answer it"
            )
        name = lora_name(expert)
        if name not in self._loaded:
            with self._load_lock:
                if name not in self._loaded:
                    self._load(expert, name)
                    self._loaded.add(name)
        return name

    def _load(self, expert: Expert, name: str) -> None:
        rank = int(expert.config.get("adapter_config", {}).get("r", 0))
        if rank > self.max_lora_rank:
            raise UserError(
                f"expert '{expert.name}' has LoRA rank {rank}, above the vLLM server's --max-lora-rank "
                f"{self.max_lora_rank}; set ELMREG_VLLM_MAX_LORA_RANK to at least {rank}"
            )
        folder = self._adapter_folder(expert, name)
        response = self._client.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)}
        )
        if response.status_code != 200 and "already been loaded" not in response.text:
            raise UserError(
                f"vLLM refused expert '{expert.name}' ({response.status_code}): {_error_text(response)}"
            )

    def _adapter_folder(self, expert: Expert, name: str) -> Path:
        """The expert's PEFT folder, written from weights whose sha256 the artifact cache has just checked."""
        weights = self.context.artifact_cache.fetch(expert.artifact)
        folder = self._adapter_root / f"{name}-{expert.artifact.sha256[:16]}"
        if folder.is_dir():
            shutil.rmtree(folder)  # rewritten from the verified copy: never trust what the folder held
        self._adapter_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=self._adapter_root))
        try:
            export_peft_folder(weights, expert.config, staging)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    # -- one prompt ----------------------------------------------------------------------------------------
    def _answer(self, prompt: Prompt, model: str) -> None:
        try:
            answer = self._classify(prompt, model) if prompt.classify else self._generate(prompt, model)
        except BaseException as error:  # one prompt's failure is its own, never its batch's
            prompt.sink.fail(_as_error(error))
            return
        if answer is not None:
            prompt.sink.finish(answer)
            if self.observer is not None:
                self.observer.tokens_used(answer.prompt_tokens, answer.completion_tokens)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.backbone.tokenizer(prompt.example.input, add_special_tokens=prompt.add_special_tokens)[
            "input_ids"
        ]

    def _generation_body(self, prompt: Prompt, model: str) -> dict[str, Any]:
        params = prompt.params
        body: dict[str, Any] = {
            "model": model,
            "prompt": self._prompt_ids(prompt),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stop": list(params.stop),
        }
        if params.temperature > 0:
            # The built-in engine samples from the temperature alone: no top-k / top-p filters.
            body |= {"top_p": 1.0, "top_k": -1}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        return body

    def _generate(self, prompt: Prompt, model: str) -> Answer | None:
        body = self._generation_body(prompt, model) | {"return_token_ids": True}
        text = _Text(self.backbone.tokenizer, prompt)
        if not prompt.stream:
            data = self._post(body)
            choice = data["choices"][0]
            text.add(choice["token_ids"] or [])
            return text.answer(
                choice["finish_reason"], data["usage"]["prompt_tokens"], choice.get("logprobs")
            )
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        finish, usage, logprobs = None, {}, {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        with self._client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise _refusal(response)
            for line in response.iter_lines():
                if prompt.sink.cancelled:
                    return None  # leaving the stream closes it, and vLLM aborts the request
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text.add(choice.get("token_ids") or [])
                    text.emit(final=False)
                    for key, values in (choice.get("logprobs") or {}).items():
                        if key in logprobs:
                            logprobs[key] += values or []
                    finish = choice.get("finish_reason") or finish
        text.emit(final=True)
        return text.answer(finish, usage.get("prompt_tokens", len(body["prompt"])), logprobs)

    def _classify(self, prompt: Prompt, model: str) -> Answer:
        """Rank classification: each choice's summed log-probability after the prompt, as the built-in scorer."""
        tokenizer = self.backbone.tokenizer
        example = prompt.example
        if not example.answer_choices:
            raise UserError("rank classification needs answer choices for every instance")
        source = tokenizer(example.input, add_special_tokens=True)["input_ids"][-_MAX_SOURCE_TOKENS:]
        targets = []
        for choice in example.answer_choices:
            ids = tokenizer(target_text(choice), add_special_tokens=False)["input_ids"][:_MAX_CHOICE_TOKENS]
            targets.append(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
        data = self._post(
            {
                "model": model,
                "prompt": [source + t for t in targets],
                # One token is generated and ignored: what counts is the prompt's log-probabilities.
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": 0,
            }
        )
        scores = [0.0] * len(targets)
        for choice in data["choices"]:
            index = choice["index"]
            values = choice["logprobs"]["token_logprobs"]
            # Position p holds log p(token p | tokens before it): the choice's tokens follow the source's.
            scores[index] = float(sum(values[len(source) : len(source) + len(targets[index])]))
        return Answer(best_choice(example, scores), "stop", len(source), 0, choice_scores=scores)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self._client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise _refusal(response)
        return response.json()


class _Text:
    """One prompt's generated tokens as text, made the way the built-in engine makes it: elmreg's tokenizer
    decodes vLLM's token ids (special tokens skipped) and the text is cut before the first stop string. vLLM's
    own text can differ from that by spacing (its incremental detokenizer joins word-level tokens otherwise)."""

    def __init__(self, tokenizer, prompt: Prompt):
        self.tokenizer, self.prompt = tokenizer, prompt
        self.ids: list[int] = []
        self.emitted = 0

    def add(self, ids: list[int]) -> None:
        self.ids += ids

    @property
    def tokens(self) -> list[int]:
        """The generated tokens without the end of sequence (the built-in engine does not count it)."""
        eos = self.tokenizer.eos_token_id
        return self.ids[:-1] if self.ids and self.ids[-1] == eos else self.ids

    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.prompt.params.stop if s and s in text]
        return text[: min(cuts)] if cuts else text

    def emit(self, *, final: bool) -> None:
        text = self.text()
        if not final:
            # Hold back what could still be the start of a stop string, and half-decoded characters.
            hold = max((len(s) - 1 for s in self.prompt.params.stop), default=0)
            text = (text[: len(text) - hold] if hold else text).rstrip("\ufffd")
        if len(text) > self.emitted:
            self.prompt.sink.delta(text[self.emitted :])
            self.emitted = len(text)

    def answer(self, finish_reason: str | None, prompt_tokens: int, logprobs: dict | None) -> Answer:
        wanted = self.prompt.params.logprobs is not None
        return Answer(
            self.text(),
            finish_reason or "length",
            prompt_tokens,
            len(self.tokens),
            logprobs=(_token_logprobs(logprobs) or [])[: len(self.tokens)] if wanted else None,
        )


def _token_logprobs(logprobs: dict[str, Any] | None) -> list[TokenLogprob] | None:
    if not logprobs:
        return None
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    return [
        TokenLogprob(token, float(value), sorted((top or {}).items(), key=lambda kv: -kv[1]))
        for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True)
    ]


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else None
        return first_line(Exception(message or data.get("message") or response.text))
    except ValueError:
        return first_line(Exception(response.text or response.reason_phrase))


def _refusal(response: httpx.Response) -> Exception:
    """A 4xx of vLLM is the request's fault (a user error); anything else the service's."""
    message = f"vLLM answered {response.status_code}: {_error_text(response)}"
    return UserError(message) if 400 <= response.status_code < 500 else ServiceError(message)


def _as_error(error: BaseException) -> BaseException:
    if isinstance(error, httpx.TransportError):
        return ServiceError(f"the vLLM server is unreachable: {first_line(error)}")
    return error


class ConcurrentQueue:
    """The server's queue in front of a :class:`VllmEngine` (what ``serve.batcher.Batcher`` is for the built-in
    engine): every prompt goes to vLLM as soon as it is submitted. vLLM batches continuously; static batches
    in front of it would only make new prompts wait for the slowest of the batch before them."""

    def __init__(self, engine: VllmEngine, *, workers: int = DEFAULT_MAX_BATCH):
        self.engine = engine
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="elmreg-vllm-queue")
        self._condition = threading.Condition()
        self._pending = 0
        self._closing = False

    def start(self) -> None:
        pass

    def submit(self, prompts: Sequence[Prompt]) -> None:
        """Send prompts to vLLM (thread-safe); results go to each prompt's sink."""
        with self._condition:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._pending += len(prompts)
        for prompt in prompts:
            self._threads.submit(self._run, prompt)

    def _run(self, prompt: Prompt) -> None:
        try:
            self.engine.run([prompt])
        finally:
            with self._condition:
                self._pending -= 1
                self._condition.notify_all()

    @property
    def pending(self) -> int:
        with self._condition:
            return self._pending

    def close(self, timeout: float | None = None) -> None:
        """Answer what was submitted, then stop."""
        with self._condition:
            self._closing = True
            self._condition.wait_for(lambda: self._pending == 0, timeout=timeout)
        self._threads.shutdown(wait=False)
