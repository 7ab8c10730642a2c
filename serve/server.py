"""Running the server: the service, the ASGI app, and uvicorn with a graceful SIGTERM."""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import uvicorn

from elmreg.registry.errors import UserError
from elmreg.serve.app import create_app
from elmreg.serve.auth import is_loopback
from elmreg.serve.protocol import Limits
from elmreg.serve.service import ServingService

if TYPE_CHECKING:
    from elmreg.api import Registry

_log = logging.getLogger(__name__)

# After SIGTERM, in-flight requests get this long to finish before uvicorn cancels them (the audit writer
# flushes after that either way).
GRACEFUL_SHUTDOWN_S = 60


def check_auth_setting(host: str, no_auth: bool) -> None:
    """Refuse to serve without keys on an address other machines can reach."""
    if no_auth and not is_loopback(host):
        raise UserError(
            f"--no-auth is allowed on loopback addresses only (127.0.0.1, ::1, localhost), not {host}; "
            "create a key with 'elmreg serve keys create NAME' instead"
        )


def build_server(
    registry: Registry,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    max_batch: int = 8,
    pool_capacity: int = 8,
    no_auth: bool = False,
    limits: Limits | None = None,
    log_level: str = "info",
) -> tuple[uvicorn.Server, ServingService]:
    """A uvicorn server over a started service (the backbone, embedder and engine are loaded here)."""
    check_auth_setting(host, no_auth)
    if max_batch < 1 or pool_capacity < 1:
        raise UserError("--max-batch and --pool-capacity must be at least 1")
    service = ServingService(
        registry,
        device=device,
        max_batch=max_batch,
        pool_capacity=pool_capacity,
        limits=limits,
        auth=not no_auth,
    )
    config = uvicorn.Config(
        create_app(service),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
    )
    return uvicorn.Server(config), service


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), for callers that must know the port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
