"""The worker loop with plain handlers: outcomes, retries and lost leases (training is tested elsewhere)."""

from __future__ import annotations

import time

from sqlalchemy import text

from elmreg.jobs import Worker
from elmreg.registry.errors import TaskSpecError


def test_success_failure_and_permanent_failure(fresh_registry):
    ok = fresh_registry.jobs.enqueue_job("ok", {})
    flaky = fresh_registry.jobs.enqueue_job("flaky", {}, max_attempts=3)
    bad = fresh_registry.jobs.enqueue_job("bad", {}, max_attempts=3)
    ran = []

    def flaky_handler(context):
        raise RuntimeError("the GPU fell off")

    def bad_handler(context):
        raise TaskSpecError("column 'question' is not in the dataset")

    worker = Worker(
        fresh_registry,
        {"ok": lambda c: ran.append(c.job.id), "flaky": flaky_handler, "bad": bad_handler},
        name="w1",
        retry_delay_seconds=3600,
    )
    ended = {job.id: job for job in worker.drain()}
    assert ran == [ok.id]
    assert ended[ok.id].status == "succeeded"
    assert ended[flaky.id].status == "queued" and "the GPU fell off" in ended[flaky.id].last_error
    assert "Traceback" in ended[flaky.id].last_error  # unexpected errors keep their traceback for operators
    # Bad task data will not fix itself: failed at once, one line, no retries left to burn.
    assert ended[bad.id].status == "failed" and ended[bad.id].attempts == 1
    assert ended[bad.id].last_error == "column 'question' is not in the dataset"


def test_worker_that_lost_its_lease_does_not_finish_the_job(fresh_registry):
    job = fresh_registry.jobs.enqueue_job("slow", {})
    other = Worker(fresh_registry, {"slow": lambda c: None}, name="other")

    def slow_handler(context):
        # While this worker is "stuck", its lease expires and another worker takes the job over.
        with fresh_registry.engine.begin() as connection:
            connection.execute(
                text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                {"id": job.id},
            )
        assert other.run_once().status == "succeeded"
        context._lost.set()  # what the heartbeat thread sets when fresh_registry.jobs.heartbeat() answers False

    stuck = Worker(fresh_registry, {"slow": slow_handler}, name="stuck")
    ended = stuck.run_once()
    assert ended.status == "succeeded" and ended.lease_owner == "other" and ended.attempts == 2


def test_heartbeat_extends_the_lease(fresh_registry):
    fresh_registry.jobs.enqueue_job("beat", {})
    seen = {}

    def handler(context):
        first = fresh_registry.jobs.get_job(context.job.id).lease_expires_at
        # With a 0.6 s lease the heartbeat fires every 0.2 s; wait for a few beats.
        time.sleep(0.7)
        seen["extended"] = fresh_registry.jobs.get_job(context.job.id).lease_expires_at > first
        context.check_lease()

    worker = Worker(fresh_registry, {"beat": handler}, name="w", lease_seconds=0.6)
    assert worker.run_once().status == "succeeded"
    assert seen["extended"]
