"""The OpenAI-compatible request bodies, elmreg's extensions to them, and the JSON error every refusal gets.

Fields of OpenAI's API that elmreg does not implement are refused with a 400 that names them when they would
change the answer (``n`` > 1, ``echo``, ``suffix``, penalties, ``top_p`` < 1, ``logit_bias``), and accepted
when they would not (``user``, ``stream_options``, default values): clients written for OpenAI send them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from elmreg.registry.errors import ElmregError, NotFoundError, ServiceError, UserError

_log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal: the HTTP status and OpenAI's error object (``message``, ``type``, ``param``, ``code``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or {
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def as_api_error(error: BaseException) -> ApiError:
    """The refusal a failure becomes: elmreg's errors by their meaning, anything else a logged 500."""
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


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; larger requests get a 400 or 413 instead of the server's memory."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_prompts: int = 64
    max_choices: int = 64


class _Request(BaseModel):
    # Unknown fields are kept out of the way rather than refused: OpenAI adds fields often.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=500)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # elmreg's extensions
    choices: list[str] | None = None
    routing: Literal["per_request", "per_prompt"] = "per_request"

    def unsupported(self) -> None:
        """Refuse what would change the answer in a way elmreg does not implement."""
        if self.n not in (None, 1):
            raise ApiError(400, "n > 1 is not supported: ask once per completion", param="n")
        if self.top_p not in (None, 1, 1.0):
            raise ApiError(400, "top_p < 1 is not supported: use temperature alone", param="top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ApiError(
                400, f"temperature must be between 0 and 2, got {self.temperature}", param="temperature"
            )
        if self.choices is not None and self.stream:
            raise ApiError(
                400, "classification (choices) answers are not streamed: drop stream", param="stream"
            )

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise ApiError(400, f"logprobs must be between 0 and 5, got {self.logprobs}", param="logprobs")

    @property
    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise ApiError(400, "prompt is empty: give a string or a list of strings", param="prompt")
        return prompts


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The content as text (OpenAI's content parts: the text ones, joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 5:
            raise ApiError(400, "top_logprobs must be between 0 and 5", param="top_logprobs")


def parse(model: type[BaseModel], body: Any) -> Any:
    """A request body as ``model``, or a 400 that says which field is wrong and how."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None
    request.unsupported()
    return request
