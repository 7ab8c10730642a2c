"""OpenAI's models, completions and chat completions, with elmreg's fields (who answered, which decision chose it).

Each handler parses and checks its request (every refusal is one JSON error with a 4xx code), routes it off the
event loop, and queues its prompts on the engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from elmreg.data.prompts import PromptedExample
from elmreg.inference.engine import Answer, GenerationParams, Prompt
from elmreg.serve.dependencies import Caller, JsonBody, RequestLimits, Service, checked_max_tokens
from elmreg.serve.protocol import ChatRequest, CompletionRequest, parse
from elmreg.serve.service import AUTO, BASE, Routed
from elmreg.serve.streaming import RequestSinks, answer_all, stream_answers

router = APIRouter(prefix="/v1")


@router.get("/models")
async def models(_caller: Caller, service: Service) -> JSONResponse:
    experts = await run_in_threadpool(service.ready_experts)
    owned = {"object": "model", "owned_by": "elmreg"}
    data = [
        {"id": AUTO, "created": 0, **owned, "elmreg": {"kind": "routing", "backbone": service.backbone_name}},
        {"id": BASE, "created": 0, **owned, "elmreg": {"kind": "base", "backbone": service.backbone_name}},
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


@router.post("/completions")
async def completions(label: Caller, body: JsonBody, service: Service, limits: RequestLimits) -> Response:
    req: CompletionRequest = parse(CompletionRequest, body)
    prompts = req.prompts
    max_tokens = checked_max_tokens(req, limits, len(prompts), req.max_tokens)
    for i, prompt in enumerate(prompts):
        service.check_prompt(prompt, param=f"prompt[{i}]" if len(prompts) > 1 else "prompt")
    choices = tuple(req.choices) if req.choices else None
    routed = await run_in_threadpool(
        service.route,
        req.model,
        [PromptedExample(p, "", choices) for p in prompts],
        per_prompt=req.routing == "per_prompt",
        caller_label=label,
    )
    params = GenerationParams(max_tokens, req.stops, req.temperature or 0.0, req.logprobs, req.seed)
    sinks = RequestSinks(len(prompts), stream=req.stream)
    works = _works(routed, prompts, req, params, sinks, special=True)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
    }
    if req.stream:

        def chunk(index: int, kind: str, value: Any) -> dict[str, Any]:
            text = value if kind == "delta" else ""
            finish = value.finish_reason if kind == "done" else None
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            return head | {"choices": [choice | _extension(routed, index, None)]}

        return stream_answers(service.engine, works, sinks, chunk, headers=_headers(routed))
    answers = await answer_all(service.engine, works, sinks)
    choices_out = [
        {"text": a.text, "index": i, "logprobs": _completion_logprobs(a), "finish_reason": a.finish_reason}
        | _extension(routed, i, a)
        for i, a in enumerate(answers)
    ]
    return JSONResponse(head | {"choices": choices_out, "usage": _usage(answers)}, headers=_headers(routed))


@router.post("/chat/completions")
async def chat_completions(
    label: Caller, body: JsonBody, service: Service, limits: RequestLimits
) -> Response:
    req: ChatRequest = parse(ChatRequest, body)
    max_tokens = checked_max_tokens(req, limits, 1, req.max_completion_tokens or req.max_tokens)
    messages = [(m.role, m.text) for m in req.messages]
    prompt, special = service.chat_prompt(messages)
    service.check_prompt(prompt, param="messages", add_special_tokens=special)
    # RoE routes on what is asked: the last user message, as the library holds single instances.
    asked = next((text for role, text in reversed(messages) if role == "user"), messages[-1][1])
    choices = tuple(req.choices) if req.choices else None
    routed = await run_in_threadpool(
        service.route, req.model, [PromptedExample(asked, "", choices)], per_prompt=False, caller_label=label
    )
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = GenerationParams(max_tokens, req.stops, req.temperature or 0.0, top, req.seed)
    sinks = RequestSinks(1, stream=req.stream)
    works = _works(routed, [prompt], req, params, sinks, special=special)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
    if req.stream:
        streamed = head | {"object": "chat.completion.chunk"}
        extension = _extension(routed, 0, None)

        def chunk(_index: int, kind: str, value: Any) -> dict[str, Any]:
            if kind == "delta":
                delta = {"index": 0, "delta": {"content": value}, "finish_reason": None}
            else:
                delta = {"index": 0, "delta": {}, "finish_reason": value.finish_reason}
            return streamed | {"choices": [delta | extension]}

        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        opening = [streamed | {"choices": [first | extension]}]
        return stream_answers(service.engine, works, sinks, chunk, headers=_headers(routed), opening=opening)
    (result,) = await answer_all(service.engine, works, sinks)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": _chat_logprobs(result),
        "finish_reason": result.finish_reason,
    } | _extension(routed, 0, result)
    body_out = head | {"object": "chat.completion", "choices": [choice], "usage": _usage([result])}
    return JSONResponse(body_out, headers=_headers(routed))


def _works(
    routed: Routed,
    prompts: list[str],
    req,
    params: GenerationParams,
    sinks: RequestSinks,
    *,
    special: bool,
) -> list[Prompt]:
    choices = tuple(req.choices) if req.choices else None
    return [
        Prompt(
            routed.answerers[i],
            PromptedExample(prompt, "", choices),
            sinks.sinks[i],
            params,
            stream=req.stream,
            add_special_tokens=special,
        )
        for i, prompt in enumerate(prompts)
    ]


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
