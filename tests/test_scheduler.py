"""The scheduler: one active instance via an advisory lock, and the jobs it enqueues."""

from __future__ import annotations

import datetime as dt
import time

from elmreg.jobs.scheduler import ScheduleConfig, Scheduler, enqueue_benchmark, enqueue_untrained_tasks
from elmreg.runtime.context import RegistryContext


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
        first.context.close()
        second.context.close()


def test_schedules_run_from_memory_and_nothing_secret_or_pickled_is_written(settings, registry):
    """The schedules are code: nothing about them is persisted, so no row holds the settings (the S3 secret key,
    the database password) and no row needs pickle to be read."""
    endpoints = registry.endpoints
    # The keys as production passes them: in the settings (the embedded S3 otherwise reads them from a file).
    keyed = settings.replace(
        s3_access_key_id=endpoints.s3_access_key_id, s3_secret_access_key=endpoints.s3_secret_access_key
    )
    scheduler = Scheduler(RegistryContext(keyed))
    try:
        assert scheduler.try_become_active()
        scheduler.start()
        runs = scheduler.next_runs()
        assert set(runs) == {"enqueue-untrained-tasks", "nightly-ingest", "nightly-benchmark"}
        assert runs["nightly-benchmark"].hour == 3 and runs["nightly-ingest"].hour == 1
        secrets = [endpoints.s3_secret_access_key]
        if registry.engine.url.password:
            secrets.append(registry.engine.url.password)
        with registry.engine.connect() as connection:
            tables = connection.exec_driver_sql(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            ).scalars()
            for table in tables:
                for row in connection.exec_driver_sql(f'SELECT * FROM "{table}"'):
                    # Raw bytes too: a pickle's text form (hex) would hide a secret inside it.
                    raw = b" ".join(
                        bytes(v) if isinstance(v, bytes | memoryview) else repr(v).encode() for v in row
                    )
                    assert not any(secret.encode() in raw for secret in secrets), table
            binary = connection.exec_driver_sql(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND data_type = 'bytea'"
            ).all()
        assert binary == []  # the only bytea column elmreg ever had was APScheduler's pickled job state
    finally:
        scheduler.shutdown()
        scheduler.context.close()


def test_a_missed_nightly_run_is_caught_up_at_start(fresh_registry):
    """The schedules are not persisted, so a scheduler starting after tonight's benchmark hour (within the misfire
    grace) enqueues that benchmark at once; its dedupe key makes a second start the same day a no-op."""
    now = dt.datetime.now().astimezone()
    config = ScheduleConfig(benchmark_hour=now.hour, ingest_hour=(now.hour + 12) % 24)

    def benchmark_jobs():
        return [j for j in fresh_registry.jobs.list_jobs() if j.kind == "benchmark"]

    for _ in range(2):  # a start, then a restart the same day
        scheduler = Scheduler(fresh_registry, config)
        try:
            assert scheduler.try_become_active()
            scheduler.start()
            deadline = time.monotonic() + 20
            while not benchmark_jobs() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert scheduler.next_runs()["nightly-ingest"] > dt.datetime.now().astimezone() + dt.timedelta(
                hours=1
            )
        finally:
            scheduler.shutdown()
        assert len(benchmark_jobs()) == 1


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
    jobs = enqueue_untrained_tasks(registry)
    payloads = [registry.jobs.get_job(j).payload["task_id"] for j in jobs]
    assert quiet.id in payloads and queued.id not in payloads
    assert quiet.id not in [
        registry.jobs.get_job(j).payload["task_id"] for j in enqueue_untrained_tasks(registry)
    ]


def test_benchmark_is_enqueued_once_a_day(settings, registry):
    first, second = enqueue_benchmark(registry), enqueue_benchmark(registry)
    assert first == second and registry.jobs.get_job(first).kind == "benchmark"
