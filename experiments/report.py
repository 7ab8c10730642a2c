"""The results of an experiment as JSON (every number, with its provenance) and as a Markdown report
(``templates/results.md.j2``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elmreg.reports.templating import render

SECTION_TITLES = {
    "routing": "1. Seen-task routing accuracy (RoE)",
    "multitask": "2. Experts vs one multitask adapter on seen tasks",
    "continual": "3. Continual learning: adding new tasks",
    "unseen": "4. Unseen (held-out) tasks",
    "ablation": "5. Retriever ablation (text format x embedder)",
    "routers": "6. Routers on unseen tasks",
}


def write_results(result, out_dir: Path) -> list[Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path.write_text(markdown(data))
    return [json_path, md_path]


def _cell(value: Any) -> str:
    """A Markdown table cell: one decimal for scores, a bold **no** for a failed check, nothing for no value."""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.1f}"
    return "" if value is None else str(value)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def markdown(data: dict[str, Any]) -> str:
    """The Markdown report of ``ExperimentResult.to_dict()``."""
    return render(
        "elmreg.experiments",
        "results.md.j2",
        filters={"cell": _cell, "json": _json},
        data=data,
        p=data["provenance"],
        s=data["sections"],
        titles=SECTION_TITLES,
    )
