"""The HTTP face of the server: OpenAI's completions, chat completions and models, plus health and metrics.

Handlers parse and check a request (every refusal is one JSON error with a 4xx code), route it off the event
loop, queue its prompts on the engine and wait for their answers without blocking the loop; streams are
server-sent events as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from elmreg.data.prompts import PromptedExample
from elmreg.registry.errors import ElmregError, NotFoundError, ServiceError, UserError
from elmreg.serve.engine import Answer, GenerationParams, Work
from elmreg.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse
from elmreg.serve.service import AUTO, BASE, Routed, ServingService

_log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class _RequestSinks:
    """The engine's deliveries for one request's prompts, moved onto the event loop as (index, kind, value)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, stream: bool):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self.sinks = [_Sink(self, index, stream) for index in range(count)]

    def put(self, item: tuple[int, str, Any]) -> None:
        # RuntimeError: the loop is gone (shutdown), nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self) -> None:
        for sink in self.sinks:
            sink.cancelled = True

    async def events(self) -> AsyncIterator[tuple[int, str, Any]]:
        open_rows = len(self.sinks)
        while open_rows:
            item = await self.queue.get()
            if item[1] in ("done", "error"):
                open_rows -= 1
            yield item

    async def answers(self) -> list[Answer]:
        answers: list[Answer | None] = [None] * len(self.sinks)
        async for index, kind, value in self.events():
            if kind == "error":
                raise value
            if kind == "done":
                answers[index] = value
        return answers  # type: ignore[return-value]


class _Sink:
    def __init__(self, owner: _RequestSinks, index: int, stream: bool):
        self.owner, self.index, self.stream = owner, index, stream
        self.cancelled = False

    def delta(self, text: str) -> None:
        if self.stream:
            self.owner.put((self.index, "delta", text))

    def finish(self, answer: Answer) -> None:
        self.owner.put((self.index, "done", answer))

    def fail(self, error: BaseException) -> None:
        self.owner.put((self.index, "error", error))


def _error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _as_api_error(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, NotFoundError):
        return ApiError(404, str(error))
    if isinstance(error, UserError):
        return ApiError(400, str(error))
    if isinstance(error, ServiceError):
        return ApiError(503, str(error))
    if isinstance(error, ElmregError):
        return ApiError(500, str(error))
    _log.error("request failed", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}")


def _headers(routed: Routed) -> dict[str, str]:
    headers = {"x-elmreg-expert": routed.expert_header}
    if routed.decision_header:
        headers["x-elmreg-decision-id"] = routed.decision_header
    return headers


def _usage(answers: list[Answer]) -> dict[str, int]:
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension(routed: Routed, index: int, answer: Answer | None) -> dict[str, Any]:
    """elmreg's fields on each choice: who answered, which decision chose it, the choices' log-likelihoods."""
    expert = routed.experts[index]
    fields: dict[str, Any] = {"expert": expert.name if expert else BASE}
    if routed.decision_ids[index] is not None:
        fields["decision_id"] = routed.decision_ids[index]
    if answer is not None and answer.choice_scores is not None:
        fields["choice_scores"] = answer.choice_scores
    return fields


def _completion_logprobs(answer: Answer) -> dict[str, Any] | None:
    if answer.logprobs is None:
        return None
    offsets, at = [], 0
    for item in answer.logprobs:
        offsets.append(at)
        at += len(item.token)
    return {
        "tokens": [i.token for i in answer.logprobs],
        "token_logprobs": [i.logprob for i in answer.logprobs],
        "top_logprobs": [dict(i.top) for i in answer.logprobs],
        "text_offset": offsets,
    }


def _chat_logprobs(answer: Answer) -> dict[str, Any] | None:
    if answer.logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            entry(i.token, i.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in i.top]}
            for i in answer.logprobs
        ]
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def create_app(service: ServingService) -> FastAPI:
    """The ASGI application over a started service (its lifespan's end closes the service: graceful shutdown)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting and waited for in-flight requests: answer the rest, write every decision.
        await run_in_threadpool(service.close)

    app = FastAPI(title="elmreg", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        endpoint = request.url.path if request.url.path in _ENDPOINTS else "other"
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            response: Response = _error_response(
                ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes")
            )
        else:
            try:
                response = await call_next(request)
            except (
                Exception
            ) as error:  # whatever a handler raised is this request's 4xx/5xx, not the server's end
                response = _error_response(_as_api_error(error))
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        return _error_response(_as_api_error(error))

    async def caller(request: Request) -> str:
        """The API key's name (the decisions' ``caller_label``); 401 without a valid key."""
        if not service.auth:
            return "anonymous"
        key = await run_in_threadpool(service.keys.check, request.headers.get("authorization"))
        if key is None:
            raise ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>' "
                "(make one with 'elmreg serve keys create NAME')",
                code="invalid_api_key",
            )
        return key.name

    async def body_of(request: Request) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None

    def check_common(req, prompts_count: int, max_tokens: int | None) -> int:
        if prompts_count > limits.max_prompts:
            raise ApiError(
                400,
                f"{prompts_count} prompts in one request; the limit is {limits.max_prompts}",
                param="prompt",
            )
        tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if not 1 <= tokens <= limits.max_new_tokens:
            raise ApiError(
                400,
                f"max_tokens must be between 1 and {limits.max_new_tokens}, got {tokens}",
                param="max_tokens",
            )
        if req.choices is not None and (
            not 1 <= len(req.choices) <= limits.max_choices or any(not c for c in req.choices)
        ):
            raise ApiError(400, f"choices takes 1 to {limits.max_choices} non-empty strings", param="choices")
        return tokens

    async def answer(works: list[Work], sinks: _RequestSinks) -> list[Answer]:
        service.engine.submit(works)
        try:
            return await sinks.answers()
        except BaseException:
            sinks.cancel()  # the client went away or a row failed: the engine skips what is left
            raise

    def works_for(routed: Routed, prompts: list[str], req, params: GenerationParams, sinks, *, special: bool):
        choices = tuple(req.choices) if req.choices else None
        return [
            Work(
                routed.experts[i],
                PromptedExample(prompt, "", choices),
                sinks.sinks[i],
                params,
                stream=req.stream,
                add_special_tokens=special,
            )
            for i, prompt in enumerate(prompts)
        ]

    # -- endpoints -----------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        checks: dict[str, Any] = {"backbone": service.backbone.name}

        def probe() -> None:
            checks["library_version"] = service.context.library.library_version()
            endpoints = service.context.endpoints
            service.context.artifacts.exists(f"s3://{endpoints.s3_bucket}/{endpoints.s3_prefix}.healthz")

        try:
            await run_in_threadpool(probe)
        except Exception as error:
            return JSONResponse({"status": "unavailable", "error": str(error)} | checks, status_code=503)
        checks |= {"engine_pending": service.engine.pending, "audit_pending": service.writer.pending}
        return JSONResponse({"status": "ok"} | checks)

    @app.get("/metrics")
    async def metrics() -> Response:
        service.metrics.queue_depth.set(service.engine.pending)
        service.metrics.audit_pending.set(service.writer.pending)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        await caller(request)
        experts = await run_in_threadpool(service.ready_experts)
        owned = {"object": "model", "owned_by": "elmreg"}
        data = [
            {
                "id": AUTO,
                "created": 0,
                **owned,
                "elmreg": {"kind": "routing", "backbone": service.backbone_name},
            },
            {
                "id": BASE,
                "created": 0,
                **owned,
                "elmreg": {"kind": "base", "backbone": service.backbone_name},
            },
        ] + [
            {
                "id": e.name,
                "created": int((e.ready_at or e.created_at).timestamp()),
                **owned,
                "elmreg": {"expert_id": e.id, "kind": e.kind, "library_version": e.library_version},
            }
            for e in experts
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        label = await caller(request)
        req: CompletionRequest = parse(CompletionRequest, await body_of(request))
        prompts = req.prompts
        max_tokens = check_common(req, len(prompts), req.max_tokens)
        for i, prompt in enumerate(prompts):
            service.check_prompt(prompt, param=f"prompt[{i}]" if len(prompts) > 1 else "prompt")
        choices = tuple(req.choices) if req.choices else None
        instances = [PromptedExample(p, "", choices) for p in prompts]
        routed = await run_in_threadpool(
            service.route, req.model, instances, per_prompt=req.routing == "per_prompt", caller_label=label
        )
        params = GenerationParams(max_tokens, req.stops, req.temperature or 0.0, req.logprobs, req.seed)
        sinks = _RequestSinks(asyncio.get_running_loop(), len(prompts), req.stream)
        works = works_for(routed, prompts, req, params, sinks, special=True)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": req.model}
        if req.stream:
            service.engine.submit(works)

            async def stream() -> AsyncIterator[bytes]:
                try:
                    async for index, kind, value in sinks.events():
                        if kind == "error":
                            yield _sse(_as_api_error(value).body())
                            return
                        text = value if kind == "delta" else ""
                        finish = value.finish_reason if kind == "done" else None
                        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
                        yield _sse(head | {"choices": [choice | _extension(routed, index, None)]})
                    yield _sse("[DONE]")
                finally:
                    sinks.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream", headers=_headers(routed))
        answers = await answer(works, sinks)
        body = head | {
            "choices": [
                {
                    "text": a.text,
                    "index": i,
                    "logprobs": _completion_logprobs(a),
                    "finish_reason": a.finish_reason,
                }
                | _extension(routed, i, a)
                for i, a in enumerate(answers)
            ],
            "usage": _usage(answers),
        }
        return JSONResponse(body, headers=_headers(routed))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        label = await caller(request)
        req: ChatRequest = parse(ChatRequest, await body_of(request))
        max_tokens = check_common(req, 1, req.max_completion_tokens or req.max_tokens)
        messages = [(m.role, m.text) for m in req.messages]
        prompt, special = service.chat_prompt(messages)
        service.check_prompt(prompt, param="messages", add_special_tokens=special)
        # RoE routes on what is asked: the last user message, as the library holds single instances.
        asked = next((text for role, text in reversed(messages) if role == "user"), messages[-1][1])
        choices = tuple(req.choices) if req.choices else None
        routed = await run_in_threadpool(
            service.route,
            req.model,
            [PromptedExample(asked, "", choices)],
            per_prompt=False,
            caller_label=label,
        )
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = GenerationParams(max_tokens, req.stops, req.temperature or 0.0, top, req.seed)
        sinks = _RequestSinks(asyncio.get_running_loop(), 1, req.stream)
        works = works_for(routed, [prompt], req, params, sinks, special=special)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": req.model}
        if req.stream:
            service.engine.submit(works)

            async def stream() -> AsyncIterator[bytes]:
                chunk = head | {"object": "chat.completion.chunk"}
                extension = _extension(routed, 0, None)
                try:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield _sse(chunk | {"choices": [first | extension]})
                    async for _, kind, value in sinks.events():
                        if kind == "error":
                            yield _sse(_as_api_error(value).body())
                            return
                        if kind == "delta":
                            delta = {"index": 0, "delta": {"content": value}, "finish_reason": None}
                        else:
                            delta = {"index": 0, "delta": {}, "finish_reason": value.finish_reason}
                        yield _sse(chunk | {"choices": [delta | extension]})
                    yield _sse("[DONE]")
                finally:
                    sinks.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream", headers=_headers(routed))
        (result,) = await answer(works, sinks)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": _chat_logprobs(result),
            "finish_reason": result.finish_reason,
        } | _extension(routed, 0, result)
        body = head | {"object": "chat.completion", "choices": [choice], "usage": _usage([result])}
        return JSONResponse(body, headers=_headers(routed))

    return app


_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz", "/metrics"})
