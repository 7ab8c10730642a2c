"""The scheduler: one active instance via an advisory lock, and the jobs it enqueues."""

from __future__ import annotations

from elmreg.registry.context import RegistryContext
from elmreg.registry.scheduler import Scheduler, enqueue_benchmark, enqueue_untrained_tasks


def test_only_one_scheduler_is_active_and_a_standby_takes_over(settings, registry):
    first, second = Scheduler(RegistryContext(settings)), Scheduler(RegistryContext(settings))
    try:
        assert first.try_become_active()
        assert not second.try_become_active()
        first.shutdown()  # the active one goes away: its connection closes and the lock is free
        assert second.try_become_active()
    finally:
        first.shutdown()
        second.shutdown()
        first.registry.close()
        second.registry.close()


def test_schedules_are_registered_in_the_catalogue(settings, registry):
    scheduler = Scheduler(RegistryContext(settings))
    try:
        assert scheduler.try_become_active()
        scheduler.start()
        runs = scheduler.next_runs()
        assert set(runs) == {"enqueue-untrained-tasks", "nightly-ingest", "nightly-benchmark"}
        assert runs["nightly-benchmark"].hour == 3 and runs["nightly-ingest"].hour == 1
        with registry.engine.connect() as connection:
            stored = connection.exec_driver_sql("SELECT id FROM apscheduler_jobs ORDER BY id").scalars().all()
        assert stored == sorted(runs)
    finally:
        scheduler.shutdown()
        scheduler.registry.close()


def test_enqueue_untrained_tasks_skips_tasks_with_jobs(settings, registry, unique):
    backbone = registry.catalogue.get_or_create_backbone(f"sched-{unique}", "causal")
    fields = dict(
        dataset="bigbench:toy",
        subset=None,
        split="train",
        level="prompt",
        task_type="generative",
        metric="rouge_l",
        templates=[],
        max_examples=8,
        expert_kind="lora",
        backbone_id=backbone.id,
    )
    quiet, _ = registry.catalogue.create_task(enqueue_training=False, name=f"quiet-{unique}", **fields)
    queued, job = registry.catalogue.create_task(enqueue_training=True, name=f"queued-{unique}", **fields)
    jobs = enqueue_untrained_tasks(settings)
    payloads = [registry.jobs.get_job(j).payload["task_id"] for j in jobs]
    assert quiet.id in payloads and queued.id not in payloads
    assert quiet.id not in [
        registry.jobs.get_job(j).payload["task_id"] for j in enqueue_untrained_tasks(settings)
    ]


def test_benchmark_is_enqueued_once_a_day(settings, registry):
    first, second = enqueue_benchmark(settings), enqueue_benchmark(settings)
    assert first == second and registry.jobs.get_job(first).kind == "benchmark"
