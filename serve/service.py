"""What the server does, apart from HTTP: resolve ``model``, route by RoE, hand prompts to the engine.

One :class:`ServingService` serves one backbone (the registry's configured one) on one adapter pool; its engine
thread is the only one that runs the model, its audit writer the only one that writes decisions.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elmreg.data.prompts import PromptedExample
from elmreg.inference.assignment import Answerer
from elmreg.models.backbones import resolve_device
from elmreg.registry.errors import NotFoundError
from elmreg.registry.pause_points import pause_point
from elmreg.serve.auth import KeyChecker
from elmreg.serve.batcher import Batcher
from elmreg.serve.caller_limits import CallerLimits
from elmreg.serve.decision_writer import DecisionWriter
from elmreg.serve.metrics import ServeMetrics
from elmreg.serve.protocol import ApiError, Limits

if TYPE_CHECKING:
    from elmreg.api import Expert, Registry

_log = logging.getLogger(__name__)

AUTO, BASE = "auto", "base"
# How long a resolved model name is trusted: a retired expert stops being served within this time.
_EXPERT_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class Routed:
    """Who answers each of a request's prompts, and the decisions that chose them."""

    answerers: list[Answerer]

    @property
    def experts(self) -> list[Expert | None]:
        return [a.expert for a in self.answerers]

    @property
    def decision_ids(self) -> list[int | None]:
        return [a.decision_id for a in self.answerers]

    @property
    def expert_header(self) -> str:
        return ",".join(e.name if e else BASE for e in self.experts_in_order)

    @property
    def decision_header(self) -> str | None:
        ids = [str(i) for i in dict.fromkeys(self.decision_ids) if i is not None]
        return ",".join(ids) or None

    @property
    def experts_in_order(self) -> list[Expert | None]:
        """Each distinct expert once, in prompt order."""
        seen: dict[int | None, Expert | None] = {}
        for expert in self.experts:
            seen.setdefault(expert.id if expert else None, expert)
        return list(seen.values())


class ServingService:
    """The registry's experts on one loaded backbone, for HTTP requests."""

    def __init__(
        self,
        registry: Registry,
        *,
        device: str = "auto",
        max_batch: int = 8,
        pool_capacity: int = 8,
        limits: Limits | None = None,
        auth: bool = True,
    ):
        self.registry = registry
        self.limits = limits or Limits()
        self.metrics = ServeMetrics()
        self.auth = auth
        self.keys = KeyChecker(registry) if auth else None
        self.caller_limits = CallerLimits(self.metrics)
        self.backbone_name = registry.settings.backbone
        engine = registry.engine(self.backbone_name, capacity=pool_capacity, device=resolve_device(device))
        engine.max_batch, engine.observer = max_batch, self.metrics
        self.backbone = engine.backbone
        # The request side counts tokens and renders chat templates on its own copy: a fast (Rust) tokenizer
        # keeps truncation and padding state that a call with those arguments sets, so one shared with the
        # engine thread can fail mid-call ("Already borrowed").
        self.tokenizer = copy.deepcopy(self.backbone.tokenizer)
        # Experts trained on another copy of the weights are not this backbone's (fingerprints must match).
        self.backbone_id = self._catalogue_backbone_id()
        self.router = registry.router()
        self._route_lock = (
            threading.Lock()
        )  # one embedding + vote at a time: they share the CPU with the engine
        self._replay_spilled()
        self.writer = DecisionWriter(
            registry,
            spill_dir=registry.settings.home / "serve",
            on_written=self.metrics.decisions_written.inc,
        )
        # The vLLM engine brings its own queue: vLLM batches continuously, so prompts go to it as they come.
        self.engine = engine.queue() if hasattr(engine, "queue") else Batcher(engine)
        self._experts: dict[str, tuple[Expert, float]] = {}
        self.engine.start()

    def _replay_spilled(self) -> None:
        """Write what an earlier run spilled while the catalogue was away (before this run can spill more)."""
        for result in self.registry.replay_decisions():
            if result.problems:
                _log.error("kept %s, nothing of it written: %s", result.path, "; ".join(result.problems))
            else:
                _log.warning(
                    "replayed %d spilled routing decision(s) from %s (%d were already in the catalogue)",
                    result.written,
                    result.path,
                    result.decisions - result.written,
                )

    def _catalogue_backbone_id(self) -> int | None:
        try:
            return self.registry.backbone(self.backbone_name).id
        except NotFoundError:
            return None  # nothing trained on it yet: only 'base' answers

    def close(self) -> None:
        """Answer what is queued, then write every routing decision (graceful shutdown)."""
        self.engine.close()
        self.writer.close()

    # -- models --------------------------------------------------------------------------------------------
    def ready_experts(self) -> list[Expert]:
        if self.backbone_id is None:
            self.backbone_id = self._catalogue_backbone_id()
        return [e for e in self.registry.experts(status="ready") if e.backbone_id == self.backbone_id]

    def expert(self, model: str) -> Expert | None:
        """The expert ``model`` names (name or id; ``base``: None).

        Raises:
            ApiError: 404 for an unknown, unready or other-backbone expert.
        """
        if model == BASE:
            return None
        now = time.monotonic()
        cached = self._experts.get(model)
        if cached is not None and now - cached[1] < _EXPERT_CACHE_SECONDS:
            return cached[0]
        try:
            expert = self.registry.expert(model)
        except NotFoundError:
            raise ApiError(
                404,
                f"model '{model}' does not exist: GET /v1/models lists them",
                param="model",
                code="model_not_found",
            ) from None
        if self.backbone_id is None:
            self.backbone_id = self._catalogue_backbone_id()
        if expert.status != "ready":
            raise ApiError(
                404,
                f"expert '{expert.name}' is {expert.status}, not ready",
                param="model",
                code="model_not_found",
            )
        if expert.backbone_id != self.backbone_id:
            raise ApiError(
                404,
                f"expert '{expert.name}' is trained on another backbone than this server's ({self.backbone_name})",
                param="model",
                code="model_not_found",
            )
        self._experts[model] = (expert, now)
        return expert

    # -- routing -------------------------------------------------------------------------------------------
    def route(
        self, model: str, instances: Sequence[PromptedExample], *, per_prompt: bool, caller_label: str
    ) -> Routed:
        """The expert of every instance: named, ``base``, or by RoE (``auto``) on the request's instances as
        Q (one decision), or on each instance alone (``per_prompt``). Blocking: run it off the event loop."""
        pause_point("serve-request")  # tests stop a request here to send SIGTERM while it is in flight
        if model != AUTO:
            return Routed([Answerer(self.expert(model))] * len(instances))
        if self.backbone_id is None:
            self.backbone_id = self._catalogue_backbone_id()
            if self.backbone_id is None:
                raise ApiError(
                    404,
                    f"model 'auto': no expert is trained on this server's backbone ({self.backbone_name})",
                    param="model",
                    code="model_not_found",
                )
        groups = [[i] for i in instances] if per_prompt else [list(instances)]
        answerers: list[Answerer] = []
        for group in groups:
            started = time.perf_counter()
            with self._route_lock:
                try:
                    assignment = self.router.assign(
                        group,
                        q=None,
                        backbone_id=self.backbone_id,
                        caller_label=caller_label,
                        recorder=self.writer.record,
                    )
                except NotFoundError as error:
                    raise ApiError(
                        404, f"model 'auto': {error}", param="model", code="model_not_found"
                    ) from None
            self.metrics.routing_latency.observe(time.perf_counter() - started)
            # Served only while ready and on this backbone (the expert cache's checks).
            self.expert(str(assignment.answerers[0].expert.id))
            answerers += assignment.answerers
        return Routed(answerers)

    # -- limits --------------------------------------------------------------------------------------------
    def count_tokens(self, text: str, *, add_special_tokens: bool = True) -> int:
        return len(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def check_prompt(self, text: str, *, param: str, add_special_tokens: bool = True) -> None:
        tokens = self.count_tokens(text, add_special_tokens=add_special_tokens)
        if tokens > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {tokens} tokens; this server takes at most {self.limits.max_prompt_tokens}",
                param=param,
                code="context_length_exceeded",
            )

    def chat_prompt(self, messages: list[tuple[str, str]]) -> tuple[str, bool]:
        """The prompt for a conversation, and whether the tokenizer should add special tokens to it.

        With a chat template the template writes the special tokens (and the assistant's turn opening); without
        one, the messages are joined as text, the way a base model reads a transcript.
        """
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            return rendered, False
        return "\n".join(f"{role}: {content}" for role, content in messages) + "\nassistant:", True
