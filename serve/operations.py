"""For operators: ``/healthz`` (the catalogue and the bucket answer) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from elmreg.serve.dependencies import Service

router = APIRouter()


@router.get("/healthz")
async def healthz(service: Service) -> JSONResponse:
    checks: dict[str, Any] = {"backbone": service.backbone.name}
    try:
        checks |= await run_in_threadpool(service.registry.health)
    except Exception as error:
        return JSONResponse({"status": "unavailable", "error": str(error)} | checks, status_code=503)
    checks |= {"engine_pending": service.engine.pending, "audit_pending": service.writer.pending}
    return JSONResponse({"status": "ok"} | checks)


@router.get("/metrics")
async def metrics(service: Service) -> Response:
    service.metrics.queue_depth.set(service.engine.pending)
    service.metrics.audit_pending.set(service.writer.pending)
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
