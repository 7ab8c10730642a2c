"""How the CLI reports errors: one line, no traceback, exit code 2 for anything the user can fix."""

from __future__ import annotations

import click

from elmreg.registry.errors import ElmregError, UserError


class UserFacingError(click.ClickException):
    """A click exception whose exit code says whether the user (2) or the environment (1) must act."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message.strip().splitlines()[0] if message.strip() else "error")
        self.exit_code = exit_code

    def format_message(self) -> str:
        return self.message


class ElmregGroup(click.Group):
    """A click group that turns elmreg's exceptions into one-line errors (``--debug`` keeps tracebacks)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            # click prints the usage text and a hint above its message; the rule is one line saying what is wrong
            # and how to fix it, so the hint joins the message.
            if (ctx.obj or {}).get("debug"):
                raise
            command = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise UserFacingError(f"{exc.format_message()} (see '{command} -h')") from exc
        except ElmregError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            raise UserFacingError(str(exc), exit_code=2 if isinstance(exc, UserError) else 1) from exc
