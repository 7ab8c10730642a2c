"""The catalogue's stores on the real PostgreSQL + pgvector."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sqlalchemy import text

from elmreg.registry.entities import LibraryEntry, StoredArtifact
from elmreg.registry.errors import AlreadyExistsError, CatalogueError, NotFoundError
from elmreg.registry.store.models import hnsw_index_name

DIM = 384


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture
def backbone(registry, unique):
    return registry.catalogue.get_or_create_backbone(f"tiny-{unique}", "causal", fingerprint="f" * 16)


@pytest.fixture
def embedder(registry):
    return registry.catalogue.get_or_create_embedder("test-embedder-384", DIM)


def _task(registry, backbone, name, enqueue=True):
    return registry.catalogue.create_task(
        enqueue_training=enqueue,
        name=name,
        dataset="bigbench:toy",
        subset=None,
        split="train",
        level="prompt",
        task_type="classification",
        metric="accuracy",
        templates=[{"name": "inline", "jinja": "{{input}} ||| {{target}}", "answer_choices": "yes ||| no"}],
        max_examples=64,
        expert_kind="lora",
        backbone_id=backbone.id,
    )


def _publish(registry, backbone, embedder, name, vectors, task_id=None):
    expert = registry.catalogue.create_expert(
        name=name, backbone_id=backbone.id, kind="lora", task_id=task_id
    )
    artifact = StoredArtifact(f"s3://elmreg/blobs/sha256/aa/{name}", "a" * 64, 123)
    entries = [LibraryEntry(i, f"{name} sample {i}", v) for i, v in enumerate(vectors)]
    return registry.catalogue.publish_expert(
        expert.id, artifact=artifact, embedder_id=embedder.id, entries=entries
    )


def test_create_task_enqueues_training_in_the_same_transaction(registry, backbone, unique):
    task, job = _task(registry, backbone, f"task-{unique}")
    assert job is not None and job.kind == "train" and job.payload == {"task_id": task.id}
    assert registry.catalogue.get_task(task.name) == task
    assert registry.catalogue.get_task(task.id) == task
    with pytest.raises(AlreadyExistsError):
        _task(registry, backbone, f"task-{unique}")
    # The failed duplicate wrote nothing: still exactly one training job for that task.
    assert [j for j in registry.jobs.list_jobs() if j.payload.get("task_id") == task.id] == [job]


def test_unknown_keys_raise_not_found(registry):
    with pytest.raises(NotFoundError, match="no task 'nope'"):
        registry.catalogue.get_task("nope")
    with pytest.raises(NotFoundError):
        registry.catalogue.get_expert(10**9)


def test_publish_makes_expert_ready_with_entries_and_next_version(registry, backbone, embedder, unique):
    before = registry.library.library_version()
    vectors = [_unit(np.random.default_rng(i).normal(size=DIM)) for i in range(5)]
    expert = _publish(registry, backbone, embedder, f"exp-{unique}", vectors)
    assert expert.status == "ready"
    assert expert.library_version == before + 1 == registry.library.library_version()
    with registry.engine.connect() as c:
        count = c.execute(
            text("SELECT count(*) FROM library_entries WHERE expert_id = :e"), {"e": expert.id}
        ).scalar()
    assert count == 5
    with pytest.raises(CatalogueError, match="already ready"):
        registry.catalogue.publish_expert(
            expert.id, artifact=expert.artifact, embedder_id=embedder.id, entries=[]
        )


def test_database_refuses_ready_expert_without_artifact(registry, backbone, unique):
    expert = registry.catalogue.create_expert(name=f"raw-{unique}", backbone_id=backbone.id, kind="lora")
    with (
        pytest.raises(Exception, match="ck_experts_ready_has_verified_artifact"),
        registry.engine.begin() as c,
    ):
        c.execute(text("UPDATE experts SET status = 'ready' WHERE id = :id"), {"id": expert.id})
    with pytest.raises(CatalogueError):
        registry.catalogue.set_expert_status(expert.id, "ready")
    assert registry.catalogue.get_expert(expert.id).status == "pending"


def test_entry_with_wrong_dimension_rolls_back_everything(registry, backbone, embedder, unique):
    version = registry.library.library_version()
    expert = registry.catalogue.create_expert(name=f"bad-{unique}", backbone_id=backbone.id, kind="lora")
    entries = [LibraryEntry(0, "ok", np.ones(DIM)), LibraryEntry(1, "short", np.ones(10))]
    with pytest.raises(CatalogueError, match="384 dims"):
        registry.catalogue.publish_expert(
            expert.id,
            artifact=StoredArtifact("s3://b/k", "b" * 64, 1),
            embedder_id=embedder.id,
            entries=entries,
        )
    assert registry.catalogue.get_expert(expert.id).status == "pending"
    assert registry.library.library_version() == version


def test_nearest_entries_exact_order_and_scores(registry, backbone, embedder, unique):
    axis = np.zeros(DIM, dtype=np.float32)
    axis[7] = 1.0

    # Three entries at known inner products with the query axis: 0.9, 0.5, -0.2 (unit vectors).
    def at(ip, other):
        v = np.zeros(DIM, dtype=np.float32)
        v[7], v[other] = ip, np.sqrt(1 - ip**2)
        return v

    a = _publish(registry, backbone, embedder, f"near-a-{unique}", [at(0.5, 11)])
    b = _publish(registry, backbone, embedder, f"near-b-{unique}", [at(0.9, 12), at(-0.2, 13)])
    hits = registry.library.nearest_entries(embedder.id, axis, k=3)
    mine = [h for h in hits if h.expert_id in (a.id, b.id)]
    assert [(h.expert_id, h.sample_index) for h in mine][:2] == [(b.id, 0), (a.id, 0)]
    assert mine[0].score == pytest.approx(0.9, abs=1e-6)
    assert mine[1].score == pytest.approx(0.5, abs=1e-6)


def test_pinned_version_and_retirement(registry, backbone, embedder, unique):
    axis = np.zeros(DIM, dtype=np.float32)
    axis[100] = 1.0
    old = _publish(registry, backbone, embedder, f"old-{unique}", [axis * 0.99 + _unit(np.ones(DIM)) * 0.01])
    pinned = registry.library.library_version()
    new = _publish(registry, backbone, embedder, f"new-{unique}", [axis])
    assert registry.library.nearest_entries(embedder.id, axis, k=1)[0].expert_id == new.id
    assert (
        registry.library.nearest_entries(embedder.id, axis, k=1, library_version=pinned)[0].expert_id
        == old.id
    )

    retired = registry.catalogue.retire_expert(new.id)
    assert retired.status == "retired" and retired.retired_at_version == registry.library.library_version()
    assert registry.library.nearest_entries(embedder.id, axis, k=1)[0].expert_id == old.id
    # Pinned to the version before retirement, the retired expert is still what was routed then.
    assert (
        registry.library.nearest_entries(
            embedder.id, axis, k=1, library_version=retired.retired_at_version - 1
        )[0].expert_id
        == new.id
    )


def test_hnsw_index_serves_inner_product_search(registry, embedder):
    query = "[" + ",".join(["0.05"] * DIM) + "]"
    with registry.engine.begin() as c:
        c.execute(text("SET LOCAL enable_seqscan = off"))  # a tiny table would otherwise be scanned
        plan = "\n".join(
            c.execute(
                text(
                    f"EXPLAIN SELECT id FROM library_entries WHERE embedder_id = :e "
                    f"ORDER BY embedding::vector({DIM}) <#> CAST(:q AS vector({DIM})) LIMIT 1"
                ),
                {"e": embedder.id, "q": query},
            ).scalars()
        )
    assert f"Index Scan using {hnsw_index_name(embedder.id)}" in plan


def test_embedder_dimension_is_fixed(registry, embedder):
    assert registry.catalogue.get_or_create_embedder(embedder.name, DIM) == embedder
    with pytest.raises(CatalogueError, match="dimension 384"):
        registry.catalogue.get_or_create_embedder(embedder.name, 768)


def test_dedupe_key_enqueues_once(registry, unique):
    first = registry.jobs.enqueue_job("noop", {"n": 1}, dedupe_key=f"noop:{unique}")
    again = registry.jobs.enqueue_job("noop", {"n": 2}, dedupe_key=f"noop:{unique}")
    assert again.id == first.id and again.payload == {"n": 1}


def test_concurrent_claims_take_each_job_exactly_once(registry, unique):
    kind = f"k{unique}"
    ids = {registry.jobs.enqueue_job(kind, {"i": i}).id for i in range(20)}
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name):
        while (job := registry.jobs.claim_job(name, lease_seconds=60, kinds=[kind])) is not None:
            with lock:
                claimed.append(job.id)
            registry.jobs.finish_job(job.id, name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    assert all(registry.jobs.get_job(i).status == "succeeded" for i in ids)


def test_expired_lease_is_reclaimed_and_old_holder_loses_it(registry, unique):
    kind = f"lease{unique}"
    job = registry.jobs.enqueue_job(kind, {})
    first = registry.jobs.claim_job("crashed-worker", lease_seconds=60, kinds=[kind])
    assert first.id == job.id and first.attempts == 1
    assert registry.jobs.claim_job("other", lease_seconds=60, kinds=[kind]) is None
    with registry.engine.begin() as c:  # time passes: the crashed worker stops heartbeating
        c.execute(
            text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": job.id},
        )
    second = registry.jobs.claim_job("other", lease_seconds=60, kinds=[kind])
    assert second.id == job.id and second.attempts == 2 and second.lease_owner == "other"
    assert registry.jobs.heartbeat(job.id, "crashed-worker", lease_seconds=60) is False
    with pytest.raises(CatalogueError, match="no longer held"):
        registry.jobs.finish_job(job.id, "crashed-worker")
    assert registry.jobs.finish_job(job.id, "other").status == "succeeded"


def test_failures_retry_until_max_attempts(registry, unique):
    kind = f"fail{unique}"
    job = registry.jobs.enqueue_job(kind, {}, max_attempts=2)
    claimed = registry.jobs.claim_job("w", lease_seconds=60, kinds=[kind])
    after_first = registry.jobs.fail_job(claimed.id, "w", "boom 1", retry_delay_seconds=0)
    assert after_first.status == "queued" and after_first.last_error == "boom 1"
    claimed = registry.jobs.claim_job("w", lease_seconds=60, kinds=[kind])
    assert claimed is not None and claimed.attempts == 2
    final = registry.jobs.fail_job(claimed.id, "w", "boom 2", retry_delay_seconds=0)
    assert final.status == "failed" and final.finished_at is not None
    assert registry.jobs.claim_job("w", lease_seconds=60, kinds=[kind]) is None
    assert job.id == final.id


def test_summary_counts_tables(registry, backbone):
    summary = registry.audit.summary()
    assert summary.schema_revision == summary.head_revision
    assert tuple(int(p) for p in summary.pgvector_version.split(".")[:2]) >= (0, 6)
    assert summary.row_counts["backbones"] >= 1
    assert set(summary.row_counts) >= {"tasks", "experts", "library_entries", "jobs", "routing_votes"}


def test_concurrent_registration_of_one_embedder_and_backbone(registry, unique):
    """Two workers publishing their first experts at once both get the one embedder (and backbone) row."""
    results, errors = [], []

    def register():
        try:
            results.append(
                (
                    registry.catalogue.get_or_create_embedder(f"race-{unique}", 8).id,
                    registry.catalogue.get_or_create_backbone(f"race-{unique}", "causal").id,
                )
            )
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1


def test_job_whose_worker_is_lost_max_attempts_times_ends_failed(registry, backbone, unique):
    """A poison job (it kills its worker every time) is not re-run forever: after max_attempts lost leases it
    ends failed, saying so, and its abandoned training run is closed."""
    kind = f"poison{unique}"
    task, _ = _task(registry, backbone, f"poison-{unique}", enqueue=False)
    job = registry.jobs.enqueue_job(kind, {"task_id": task.id}, max_attempts=2)

    def lose_lease(job_id):  # the worker died: its lease runs out without a heartbeat
        with registry.engine.begin() as c:
            c.execute(
                text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                {"id": job_id},
            )

    for attempt in (1, 2):
        claimed = registry.jobs.claim_job(f"doomed-{attempt}", lease_seconds=60, kinds=[kind])
        assert claimed.id == job.id and claimed.attempts == attempt
        run = registry.jobs.start_training_run(
            task_id=task.id, expert_id=None, worker=f"doomed-{attempt}", config={}, job_id=job.id
        )
        lose_lease(job.id)
    assert registry.jobs.claim_job("next", lease_seconds=60, kinds=[kind]) is None
    failed = registry.jobs.get_job(job.id)
    assert failed.status == "failed" and failed.finished_at is not None and failed.lease_owner == "doomed-2"
    assert "lost 2 times" in failed.last_error and "doomed-2" in failed.last_error
    [run_row] = [r for r in registry.jobs.list_training_runs(task_id=task.id) if r.id == run.id]
    assert run_row.status == "failed" and "lost" in run_row.error
