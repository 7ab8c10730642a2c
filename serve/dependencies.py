"""What the endpoints are given (FastAPI ``Depends``): the service, its limits, the caller's key, the JSON body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from elmreg.serve.protocol import ApiError, Limits
from elmreg.serve.service import ServingService

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def get_service(request: Request) -> ServingService:
    return request.app.state.service


Service = Annotated[ServingService, Depends(get_service)]


def get_limits(service: Service) -> Limits:
    return service.limits


RequestLimits = Annotated[Limits, Depends(get_limits)]


async def get_caller(request: Request, service: Service) -> AsyncIterator[str]:
    """The API key's name (the decisions' ``caller_label``); 401 without a valid key, 429 over its limits (its
    slot is held until the response is sent)."""
    if not service.auth:
        yield "anonymous"
        return
    key = await run_in_threadpool(service.keys.check, request.headers.get("authorization"))
    if key is None:
        raise ApiError(
            401,
            "a valid API key is required: send 'Authorization: Bearer <key>' "
            "(make one with 'elmreg serve keys create NAME')",
            code="invalid_api_key",
        )
    with service.caller_limits.admit(key):
        yield key.name


Caller = Annotated[str, Depends(get_caller)]


async def get_json_body(request: Request, limits: RequestLimits) -> Any:
    """The request body as JSON, read in chunks so that an oversized body is refused before it is all read."""
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


JsonBody = Annotated[Any, Depends(get_json_body)]


def checked_max_tokens(req, limits: Limits, prompts_count: int, max_tokens: int | None) -> int:
    """The tokens to generate per prompt, once the request's prompt count, max_tokens and choices fit the
    limits (a 400 naming the parameter otherwise)."""
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
