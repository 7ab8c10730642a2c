"""The demo's stages at tiny scale (tiny backbone, synthetic BIG-bench tasks) and the HTML report."""

from __future__ import annotations

import base64
import datetime
from html.parser import HTMLParser
from types import SimpleNamespace

from click.testing import CliRunner
from conftest import lab_environ
from sqlalchemy import text

from elmreg.cli.main import cli
from elmreg.reports.registry_report import FIGURES, Figure
from elmreg.reports.templating import render


class _PageParser(HTMLParser):
    """Collects images and checks that every opened element is closed in order (well-formed enough)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.images: dict[str, str] = {}
        self.open: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images[attributes.get("id", "")] = attributes.get("src", "")
        elif tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1] if self.open else None}>")
        else:
            self.open.pop()


def _parse(path) -> _PageParser:
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.errors == [] and parser.open == [], (parser.errors, parser.open)
    return parser


def _png(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return base64.b64decode(src[len(prefix) :])


def test_demo_runs_every_stage_and_a_second_run_reuses_the_experts(lab, tmp_path):
    env = lab_environ(lab)
    report = tmp_path / "demo" / "report.html"
    args = [
        "demo",
        "--task",
        "bigbench:colours",
        "--task",
        "bigbench:moods",
        "--unseen",
        "bigbench:sizes/small_things",
        "--max-examples",
        "16",
        "--epochs",
        "1",
        "--eval-limit",
        "8",
        "--benchmark-limit",
        "4",
        "--report",
        str(report),
    ]
    first = CliRunner().invoke(cli, ["--quiet", *args], env=env, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    for stage in range(1, 10):
        assert f"[{stage}/9]" in first.output
    # Routing is decided by the library samples, not by how well the tiny experts learnt.
    assert "bigbench:colours (seen) -> colours" in first.output
    assert "bigbench:sizes/small_things (not in the library) ->" in first.output
    assert "2 trained now, 0 reused" in first.output
    assert f"Report: {report}" in first.output
    page = _parse(report)
    assert set(page.images) == set(FIGURES)

    with lab.context.engine.connect() as c:
        decisions = c.execute(
            text("SELECT caller_label, q FROM routing_decisions WHERE caller_label LIKE 'demo:%' ORDER BY id")
        ).all()
        stored = c.execute(
            text("SELECT route FROM evaluations WHERE benchmark_run_id IS NULL ORDER BY id")
        ).scalars()
        assert [route for route in stored] == ["roe", "base"] + ["expert"] * 4
        lineage = c.execute(
            text(
                "SELECT p.name, ep.weight FROM expert_parents ep JOIN experts p ON p.id = ep.parent_id "
                "JOIN experts m ON m.id = ep.expert_id WHERE m.kind = 'merged' ORDER BY ep.position"
            )
        ).all()
    assert [tuple(row) for row in lineage] == [("colours", 0.5), ("moods", 0.5)]
    assert "merged in" in first.output
    # The tiny tasks have fewer than 32 validation instances: Q is what was there.
    assert [d.caller_label for d in decisions] == [
        "demo:bigbench:colours",
        "demo:bigbench:sizes/small_things",
    ]

    experts_before = [e.id for e in lab.experts()]
    second = CliRunner().invoke(cli, ["--quiet", *args], env=env, catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert "colours: already registered" in second.output and "0 trained now, 2 reused" in second.output
    assert "reused" in second.output.split("Merge colours + moods")[1].splitlines()[1]
    assert "no expert became ready since the last benchmark" in second.output
    assert [e.id for e in lab.experts()] == experts_before


def test_report_on_an_empty_catalogue_says_what_is_missing(lab, tmp_path):
    result = CliRunner().invoke(
        cli, ["report", "--out", str(tmp_path / "r.html")], env=lab_environ(lab), catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "no data yet for: " + ", ".join(FIGURES) in result.output
    page = _parse(tmp_path / "r.html")
    assert page.images == {}
    assert "The library is empty" in (tmp_path / "r.html").read_text()


def test_report_draws_every_figure_from_the_catalogue(lab, tmp_path):
    fast = {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8}
    for name in ("colours", "moods"):
        lab.add_task(f"bigbench:{name}", max_examples=16, training=fast)
    lab.train()
    lab.benchmark(limit=4, out_dir=tmp_path / "bench")
    written = lab.report(tmp_path / "report.html")
    assert written.figures == list(FIGURES)
    page = _parse(written.path)
    for figure in FIGURES:
        assert _png(page.images[figure])[:8] == b"\x89PNG\r\n\x1a\n"
    html = written.path.read_text()
    # Tables carry the figures' numbers: both experts, their routing decisions and loss runs.
    assert html.count("<td>colours</td>") >= 3 and "audit_decisions" in html


def test_report_template_escapes_catalogue_text():
    figures = {figure_id: Figure(None, {}) for figure_id in FIGURES}
    figures["library-growth"] = Figure(
        None,
        {
            "changes": [
                {
                    "version": 1,
                    "change": "added",
                    "expert_name": "<b>x</b>",
                    "expert_kind": "lora",
                    "entries": 3,
                }
            ]
        },
    )
    figures["benchmark-heatmap"] = Figure(None, {"run": None})
    figures["routing-margins"] = Figure(None, {"decisions": []})
    figures["training-loss"] = Figure(None, {"curves": []})
    summary = SimpleNamespace(library_version=1, schema_revision="0002", row_counts={"tasks": 1})
    page = render(
        "elmreg.reports",
        "report.html.j2",
        filters={"when": lambda value: "", "score": str},
        summary=summary,
        figures=figures,
        written=datetime.datetime(2026, 1, 1),
    )
    assert "<td>&lt;b&gt;x&lt;/b&gt;</td>" in page and "<b>x</b>" not in page
