"""The nightly benchmark: new experts x tasks, RoE/oracle/base per task, stored and reported."""

from __future__ import annotations

from sqlalchemy import text

from elmreg.jobs.scheduler import enqueue_benchmark

FAST = {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8}


def test_benchmark_run_stores_matrix_and_writes_report(lab, tmp_path):
    for name in ("colours", "moods"):
        lab.add_task(f"bigbench:{name}", max_examples=32, training=FAST)
    lab.train()
    report = lab.benchmark(limit=8, out_dir=tmp_path / "report")
    assert set(report.matrix) == {"colours", "moods"} and set(report.matrix["colours"]) == {
        "colours",
        "moods",
    }
    assert set(report.routes) == {"colours", "moods"}
    assert all(set(row) == {"roe", "roe_expert", "oracle", "base"} for row in report.routes.values())
    assert all(row["oracle"] >= row["roe"] for row in report.routes.values())
    markdown = report.report_path.read_text()
    assert "![expert x task scores](heatmap.png)" in markdown and "| colours |" in markdown
    assert (tmp_path / "report" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with lab.context.engine.connect() as c:
        run = c.execute(
            text("SELECT status, report_uri FROM benchmark_runs WHERE id = :id"), {"id": report.run_id}
        ).one()
        stored = c.execute(
            text(
                "SELECT route, count(*) FROM evaluations WHERE benchmark_run_id = :id GROUP BY route ORDER BY route"
            ),
            {"id": report.run_id},
        ).all()
    assert run.status == "succeeded" and run.report_uri == str(report.report_path)
    assert [tuple(r) for r in stored] == [("base", 2), ("expert", 4), ("oracle", 2), ("roe", 2)]

    # The next run only looks at experts added since this one: none, so nothing is evaluated or recorded.
    again = lab.benchmark(limit=8, out_dir=tmp_path / "again")
    assert again.run_id is None and again.matrix == {} and not (tmp_path / "again").exists()

    # A new expert: its row is evaluated; the oracle reuses the old experts' scores on the old tasks (same split
    # and sample size) and evaluates them only on the new task.
    lab.add_task("bigbench:sizes", max_examples=32, training=FAST)
    lab.train()
    third = lab.benchmark(limit=8, out_dir=tmp_path / "third")
    assert list(third.matrix) == ["sizes"] and third.reused_scores == 4
    with lab.context.engine.connect() as c:
        oracles = c.execute(
            text(
                "SELECT t.name, ev.score, ev.details FROM evaluations ev JOIN tasks t ON t.id = ev.task_id"
                " WHERE ev.benchmark_run_id = :id AND ev.route = 'oracle'"
            ),
            {"id": third.run_id},
        ).all()
    for task, score, details in oracles:
        assert score == max(details["scores"].values())
        reused = {"colours", "moods"} if task in ("colours", "moods") else set()
        assert set(details["reused"]) == reused, task
        if task in reused:
            assert {e: details["scores"][e] for e in reused} == {e: report.matrix[e][task] for e in reused}


def test_scheduler_job_is_run_by_a_worker(lab):
    lab.add_task("bigbench:colours", max_examples=16, training=FAST)
    lab.train()
    job_id = enqueue_benchmark(lab.context)
    job = lab.worker().run_once(job_id=job_id)
    assert job.status == "succeeded", job.last_error
    with lab.context.engine.connect() as c:
        assert (
            c.execute(text("SELECT count(*) FROM benchmark_runs WHERE status = 'succeeded'")).scalar_one()
            == 1
        )
