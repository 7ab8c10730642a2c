"""The HTTP face of the server: the ASGI application over a started service.

Routes live in routers by concern (``openai_api``: OpenAI's models, completions and chat completions;
``operations``: health and metrics); what they are given (the service, limits, the caller's key, the body) in
``dependencies``; streaming in ``streaming``. Here: the request measurement, the body-size guard, and the one
JSON error shape every failure becomes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from elmreg.serve import openai_api, operations
from elmreg.serve.protocol import ApiError, as_api_error
from elmreg.serve.service import ServingService


def create_app(service: ServingService) -> FastAPI:
    """The ASGI application over a started service (its lifespan's end closes the service: graceful shutdown)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting and waited for in-flight requests: answer the rest, write every decision.
        await run_in_threadpool(service.close)

    app = FastAPI(title="elmreg", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.include_router(openai_api.router)
    app.include_router(operations.router)
    app.state.endpoints = frozenset(r.path for r in app.routes if isinstance(r, APIRoute))
    app.middleware("http")(_measure)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


async def _measure(request: Request, call_next) -> Response:
    """Refuse an oversized declared body before reading it; count and time every request by endpoint."""
    service: ServingService = request.app.state.service
    started = time.perf_counter()
    endpoint = request.url.path if request.url.path in request.app.state.endpoints else "other"
    length = request.headers.get("content-length")
    limit = service.limits.max_body_bytes
    if length is not None and (not length.isdigit() or int(length) > limit):
        response = _error_response(ApiError(413, f"the request body is larger than {limit} bytes"))
    else:
        try:
            response = await call_next(request)
        except (
            Exception
        ) as error:  # whatever a handler raised is this request's 4xx/5xx, not the server's end
            response = _error_response(as_api_error(error))
    service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
    return response


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return _error_response(error)


async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    return _error_response(ApiError(error.status_code, str(error.detail)))


async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    return _error_response(as_api_error(error))
