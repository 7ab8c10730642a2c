"""From the engine thread to the event loop: a request's prompts queued on the engine, their answers awaited
without blocking the loop, or streamed as server-sent events the way OpenAI sends them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi.responses import StreamingResponse

from elmreg.inference.engine import Answer, Prompt
from elmreg.serve.batcher import Batcher
from elmreg.serve.protocol import as_api_error

# One engine delivery for one prompt of a request: (prompt index, "delta" | "done" | "error", value).
Event = tuple[int, str, Any]


class RequestSinks:
    """The engine's deliveries for one request's prompts, moved onto the event loop as events."""

    def __init__(self, count: int, *, stream: bool):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.sinks = [_Sink(self, index, stream) for index in range(count)]

    def put(self, item: Event) -> None:
        # RuntimeError: the loop is gone (shutdown), nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self) -> None:
        for sink in self.sinks:
            sink.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
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
    def __init__(self, owner: RequestSinks, index: int, stream: bool):
        self.owner, self.index, self.stream = owner, index, stream
        self.cancelled = False

    def delta(self, text: str) -> None:
        if self.stream:
            self.owner.put((self.index, "delta", text))

    def finish(self, answer: Answer) -> None:
        self.owner.put((self.index, "done", answer))

    def fail(self, error: BaseException) -> None:
        self.owner.put((self.index, "error", error))


async def answer_all(engine: Batcher, works: list[Prompt], sinks: RequestSinks) -> list[Answer]:
    """Queue the works and wait for every answer, in prompt order."""
    engine.submit(works)
    try:
        return await sinks.answers()
    except BaseException:
        sinks.cancel()  # the client went away or a row failed: the engine skips what is left
        raise


def stream_answers(
    engine: Batcher,
    works: list[Prompt],
    sinks: RequestSinks,
    chunk: Callable[[int, str, Any], dict[str, Any]],
    *,
    headers: dict[str, str],
    opening: Iterable[dict[str, Any]] = (),
) -> StreamingResponse:
    """Queue the works and stream their tokens: the ``opening`` chunks, then ``chunk(index, kind, value)`` per
    delta and per finished prompt, then ``[DONE]``. A failed prompt ends the stream with its error object; a
    client that goes away cancels what the engine has left."""
    engine.submit(works)

    async def events() -> AsyncIterator[bytes]:
        try:
            for payload in opening:
                yield _sse(payload)
            async for index, kind, value in sinks.events():
                if kind == "error":
                    yield _sse(as_api_error(value).body())
                    return
                yield _sse(chunk(index, kind, value))
            yield _sse("[DONE]")
        finally:
            sinks.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
