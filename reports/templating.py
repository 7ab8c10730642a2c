"""Reports rendered from Jinja2 templates that ship as package files (``<package>/templates/*.j2``).

Each package keeps the templates of its own reports; the page layout lives in the template and the code only
gathers the numbers. HTML templates (``*.html.j2``) are autoescaped; Markdown ones are not.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import jinja2


@cache
def _environment(package: str, filters: tuple[tuple[str, Callable[..., Any]], ...]) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        # A misspelt field is an error, not an empty cell in a report someone trusts.
        undefined=jinja2.StrictUndefined,
        # Block tags on lines of their own leave no blank lines behind.
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(filters)
    return environment


def render(
    package: str, name: str, filters: dict[str, Callable[..., Any]] | None = None, **context: Any
) -> str:
    """Render template ``name`` of ``package``'s ``templates`` folder with ``context``.

    Args:
        package: The package holding the template, e.g. ``"elmreg.reports"``.
        name: The file name, e.g. ``"report.html.j2"``.
        filters: Formatting filters the template uses, by name (functions of the module that renders it).
    """
    environment = _environment(package, tuple(sorted((filters or {}).items())))
    return environment.get_template(name).render(**context)
