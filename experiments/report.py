"""The results of an experiment as JSON (every number, with its provenance) and as a Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SECTION_TITLES = {
    "routing": "1. Seen-task routing accuracy (RoE)",
    "multitask": "2. Experts vs one multitask adapter on seen tasks",
    "continual": "3. Continual learning: adding new tasks",
    "unseen": "4. Unseen (held-out) tasks",
    "ablation": "5. Retriever ablation (text format x embedder)",
}


def write_results(result, out_dir: Path) -> list[Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path.write_text(markdown(data))
    return [json_path, md_path]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.1f}"
    return "" if value is None else str(value)


def _comparison_table(section: dict[str, Any], own: str, own_title: str) -> str:
    """Per task: base, MT, the section's own column, RoE and the oracle with their experts; then the means."""
    rows = [
        [
            x["task"],
            x["n"],
            x["base"],
            x["mt"],
            x[own],
            f"{x['roe']:.1f} ({x['roe_expert']})",
            f"{x['oracle']:.1f} ({x['oracle_expert']})",
        ]
        for x in section["rows"]
    ]
    mean = section["mean"]
    if rows:
        rows.append(["**mean**", "", mean["base"], mean["mt"], mean[own], mean["roe"], mean["oracle"]])
    return _table(["task", "n", "base", "MT", own_title, "RoE (expert)", "oracle (expert)"], rows)


def _footer(p: dict[str, Any]) -> str:
    # Every table says what produced it, so a copied table keeps its context.
    return (
        f"_Produced by: preset `{p['preset']}`, backbone `{p['backbone']}`, {p['kind']} K={p['K']}, "
        f"seed {p['seed']}, Q={p['q']}, eval limit {p['eval_limit']} (matrix {p.get('matrix_limit')}), "
        f"elmreg {p['elmreg_commit']}._"
    )


def markdown(data: dict[str, Any]) -> str:
    """The Markdown report of ``ExperimentResult.to_dict()``."""
    p = data["provenance"]
    s = data["sections"]
    out = [
        f"# Experiment `{p['preset']}`",
        "",
        p.get("description") or "",
        "",
        "## Provenance",
        "",
        _table(
            ["what", "value"],
            [
                ["config", f"`{p['config']}`"],
                ["backbone", f"`{p['backbone']}`"],
                ["embedder", f"`{p['embedder']}`"],
                ["experts", f"{p['kind']}, K={p['K']}, training {json.dumps(p['training'], sort_keys=True)}"],
                [
                    "seed / Q / eval limit / matrix limit",
                    f"{p['seed']} / {p['q']} / {p['eval_limit']} / {p.get('matrix_limit')}",
                ],
                ["seen tasks", ", ".join(p["seen"])],
                ["new tasks (continual)", ", ".join(p["new"]) or "-"],
                ["unseen tasks", ", ".join(p["unseen"]) or "-"],
                ["MT baseline expert", p.get("mt_expert") or "-"],
                ["library version (seen library)", p.get("library_version")],
                ["elmreg", f"{p['elmreg_version']} at commit {p['elmreg_commit']}"],
                ["machine", f"{p['machine']}, device {p['device']}"],
                ["started / finished", f"{p['started_at']} / {p.get('finished_at', '')}"],
                ["seconds per stage", ", ".join(f"{k} {v}" for k, v in data["seconds"].items())],
            ],
        ),
        "",
        "Scores are the task's metric (accuracy in % for multiple-choice tasks) on a seeded sample of its "
        "validation split. Seen tasks: `oracle` is the best of the task's own expert, RoE's choice and the best "
        "expert of the seen experts x seen tasks matrix (scored on `matrix limit` examples per cell). Unseen "
        "tasks: `oracle` is the best seen expert on the task's evaluation examples.",
    ]
    if "routing" in s:
        r = s["routing"]
        out += [
            "",
            f"## {SECTION_TITLES['routing']}",
            "",
            f"RoE chose an expert of the **same dataset for {r['same_dataset']}/{r['tasks']}** seen tasks and "
            f"of the **same prompt for {r['same_prompt']}/{r['tasks']}** (paper: {r['paper']['same_dataset']} "
            f"and {r['paper']['same_prompt']}), at library version {r['library_version']}.",
            "",
            _table(
                ["task", "Q", "chosen expert", "votes", "margin", "same dataset", "same prompt"],
                [
                    [
                        x["task"],
                        x["q"],
                        x["chosen"],
                        x["votes"],
                        x["margin"],
                        x["same_dataset"],
                        x["same_prompt"],
                    ]
                    for x in r["rows"]
                ],
            ),
            "",
            _footer(p),
        ]
    if "multitask" in s:
        m = s["multitask"]
        out += [
            "",
            f"## {SECTION_TITLES['multitask']}",
            "",
            "MT: one adapter of the same kind and size trained on the union of the seen tasks' training examples "
            "(the same total number); its expert is retired, so it is never routed to.",
            "",
            _comparison_table(m, "own_expert", "own expert"),
            "",
            _footer(p),
        ]
    if "continual" in s:
        c = s["continual"]
        check = c["check"]
        variants = list(c["variants"])
        verdict = "PASSED" if check["identical"] else "FAILED"
        rows = [
            [
                x["task"],
                x["library_before"],
                x["library_after_pinned"],
                x["changed_pinned"],
                x["library_after_unpinned"],
                x["changed_unpinned"],
                x["mt_before"],
                *[f"{x[v]:.1f} ({x[v + '_changed']} changed)" for v in variants],
            ]
            for x in c["old"]
        ]
        mean = c["old_mean"]
        rows.append(
            [
                "**mean**",
                mean.get("library_before"),
                mean.get("library_after_pinned"),
                "",
                mean.get("library_after_unpinned"),
                "",
                mean.get("mt_before"),
                *[mean.get(v) for v in variants],
            ]
        )
        out += [
            "",
            f"## {SECTION_TITLES['continual']}",
            "",
            f"**Check {verdict}**: library predictions on the old tasks, routed at the pinned library version "
            f"{c['pinned_library_version']} after the library grew to version {c['library_version_after']}: "
            f"{check['detail']}. Unpinned routing: {c['unpinned']['detail']}.",
            "",
            f"MT variants fine-tune the MT adapter on the new tasks in order: `mt_sequential` without rehearsal, "
            f"`mt_rehearsal` mixing {c['rehearsal']} earlier examples into each stage (as CT0 did). "
            f"New experts trained in this run: {'yes' if c['trained_in_this_run'] else 'no (reused)'}.",
            "",
            "Old tasks:",
            "",
            _table(
                [
                    "task",
                    "library before",
                    "after (pinned)",
                    "changed",
                    "after (unpinned)",
                    "changed",
                    "MT before",
                    *variants,
                ],
                rows,
            ),
            "",
            "New tasks:",
            "",
            _table(
                ["task", "own expert", "RoE (expert)", "MT before", *variants],
                [
                    [
                        x["task"],
                        x["own_expert"],
                        f"{x['roe']:.1f} ({x['roe_expert']})",
                        x["mt_before"],
                        *[x[v] for v in variants],
                    ]
                    for x in c["new"]
                ],
            ),
            "",
            _footer(p),
        ]
    if "unseen" in s:
        u = s["unseen"]
        out += [
            "",
            f"## {SECTION_TITLES['unseen']}",
            "",
            f"Best single expert, chosen by its mean score on the seen tasks: `{u['best_single_expert']}`. "
            "RoE routes at the seen library's version.",
            "",
            _comparison_table(u, "best_single", "best single"),
            "",
            _footer(p),
        ]
    if "ablation" in s:
        a = s["ablation"]
        rows = [
            [
                x["embedder"],
                x.get("format", "-"),
                x.get("same_dataset", x.get("error")),
                x.get("same_prompt", ""),
                x.get("tasks", ""),
            ]
            for x in a["rows"]
        ]
        out += [
            "",
            f"## {SECTION_TITLES['ablation']}",
            "",
            f"Exact in-process retrieval over the seen experts' {a['library_size']} library samples; formats as the "
            "paper's Table 10: `both` = `Answer Choices: ..., Instance: ...` (the library's own), `instance` = the "
            "prompted input only, `choices` = the answer choices only.",
            "",
            _table(["embedder", "format", "same dataset", "same prompt", "tasks"], rows),
            "",
            _footer(p),
        ]
    return "\n".join(out).rstrip() + "\n"
