"""``elmreg serve``: the OpenAI-compatible HTTP server, and its API keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from elmreg.cli.options import engine_options, use_engine
from elmreg.cli.output import echo_table

if TYPE_CHECKING:
    # Only for annotations: the API's imports are loaded when the root command builds the Registry.
    from elmreg.api import Registry

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _registry(ctx: click.Context) -> Registry:
    return ctx.obj["registry"]


@click.group(invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on."
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Torch device for the backbone (default: the global --device / ELMREG_DEVICE, auto).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 1024),
    default=8,
    show_default=True,
    help="Most prompts answered in one batch (across requests and experts).",
)
@click.option(
    "--pool-capacity",
    type=click.IntRange(1, 1024),
    default=8,
    show_default=True,
    help="LoRA experts kept resident on the backbone (least recently used evicted).",
)
@click.option("--no-auth", is_flag=True, help="Accept requests without an API key (loopback addresses only).")
@click.option(
    "--max-prompt-tokens", type=click.IntRange(1), default=2048, show_default=True, help="Longest prompt."
)
@click.option(
    "--max-new-tokens", type=click.IntRange(1), default=512, show_default=True, help="Largest max_tokens."
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(1024),
    default=1_000_000,
    show_default=True,
    help="Largest request body.",
)
@engine_options
@click.pass_context
def serve(
    ctx: click.Context,
    host,
    port,
    device,
    max_batch,
    pool_capacity,
    no_auth,
    max_prompt_tokens,
    max_new_tokens,
    max_body_bytes,
    engine,
    vllm_url,
) -> None:
    """Serve the registry's experts over an OpenAI-compatible HTTP API; `model: auto` picks the expert by RoE.

    \b
    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /healthz, GET /metrics.
    Requests need 'Authorization: Bearer <key>' (see 'elmreg serve keys create'); SIGTERM finishes the
    requests in flight and writes every routing decision before exiting.

    \b
    Example:
      elmreg serve keys create alice
      elmreg serve --port 8000 --max-batch 16
      elmreg serve --engine vllm                # vLLM generates; elmreg routes, limits and audits
      curl -H "Authorization: Bearer $KEY" localhost:8000/v1/completions \\
        -d '{"model": "auto", "prompt": "Is the sky blue?", "choices": ["yes", "no"]}'
    """
    if ctx.invoked_subcommand is not None:
        return
    from elmreg.serve.protocol import Limits
    from elmreg.serve.server import build_server, check_auth_setting

    registry = _registry(ctx)
    check_auth_setting(host, no_auth)  # before minutes of loading
    use_engine(registry, engine, vllm_url)
    click.echo(f"loading {registry.settings.backbone} and the embedder ...", err=True)
    server, service = build_server(
        registry,
        host=host,
        port=port,
        device=device or registry.settings.device,
        max_batch=max_batch,
        pool_capacity=pool_capacity,
        no_auth=no_auth,
        limits=Limits(
            max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens
        ),
        log_level=registry.settings.log_level.lower(),
    )
    if not no_auth and not registry.api_keys():
        click.echo("no API key exists yet: create one with 'elmreg serve keys create NAME'", err=True)
    click.echo(f"serving on http://{host}:{port} (backbone {service.backbone_name})", err=True)
    server.run()


@serve.group(context_settings=CONTEXT_SETTINGS)
def keys() -> None:
    """Create, list and revoke the server's API keys (only a hash of each key is stored)."""


@keys.command("create")
@click.argument("name")
@click.option(
    "--rate", type=float, help="Requests per second the key may make (over it: HTTP 429). Default: no limit."
)
@click.option(
    "--concurrency",
    type=int,
    help="Requests the key may have in flight at once (over it: HTTP 429). Default: no limit.",
)
@click.pass_context
def keys_create(ctx: click.Context, name: str, rate, concurrency) -> None:
    """Make an API key for NAME and print it once; NAME is the caller label of its routing decisions.

    \b
    Examples:
      elmreg serve keys create alice
      elmreg serve keys create batch-job --rate 5 --concurrency 2
    """
    record, key = _registry(ctx).create_key(name, rate=rate, concurrency=concurrency)
    click.echo(key)
    click.echo(f"key '{record.name}' created; it is shown only this once", err=True)


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List API keys: name, the key's first characters, its limits, when made and revoked.

    Example: elmreg serve keys list
    """
    rows = [
        (
            k.name,
            k.prefix + "...",
            f"{k.rate:g}/s" if k.rate is not None else "",
            k.concurrency if k.concurrency is not None else "",
            k.created_at.strftime("%Y-%m-%d %H:%M"),
            k.revoked_at or "",
        )
        for k in _registry(ctx).api_keys()
    ]
    echo_table(("name", "key", "rate", "concurrency", "created", "revoked"), rows)


@keys.command("revoke")
@click.argument("name")
@click.pass_context
def keys_revoke(ctx: click.Context, name: str) -> None:
    """Revoke NAME's key: its requests are refused within seconds.

    Example: elmreg serve keys revoke alice
    """
    record = _registry(ctx).revoke_key(name)
    click.echo(f"key '{record.name}' revoked")
