"""Garbage collection against a publish that reuses stored bytes, driven step by step.

Weights are content-addressed: publishing bytes that are already stored skips the upload. GC must never delete
such an object between that decision and the transaction that makes the new expert reference it.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

from elmreg.data.prompts import PromptedExample
from elmreg.registry.gc import collect_garbage
from elmreg.registry.leases import Lease
from elmreg.trainers.pipeline import publish

EXAMPLES = [PromptedExample(f"question {i}", "yes", ("no", "yes")) for i in range(4)]
LATER = dt.timedelta(hours=2)  # GC's clock: every object looks older than the grace period


def _expert(context, name: str):
    backbone = context.catalogue.get_or_create_backbone("gc-race-backbone", "causal")
    return context.catalogue.create_expert(name=name, backbone_id=backbone.id, kind="lora")


def test_gc_waits_for_a_publish_that_reuses_an_unreferenced_object(own_context, tmp_path):
    context = own_context
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(b"bytes an earlier, abandoned upload left in the bucket")
    orphan = context.artifacts.put_file(weights)  # unreferenced: a worker died before publishing it
    expert = _expert(context, "reuses-the-orphan")

    uploaded, resume = threading.Event(), threading.Event()
    outcome: dict = {}

    def pause_before_publishing() -> None:  # called after the upload step, before the publishing transaction
        uploaded.set()
        assert resume.wait(60)

    # A real claimed job: its lease check is the step between the upload and the publishing transaction.
    job = context.jobs.enqueue_job("gc-race", {})
    context.jobs.claim_job("gc-race-worker", lease_seconds=600, job_id=job.id)
    lease = Lease(job.id, "gc-race-worker", pause_before_publishing)

    def publisher() -> None:
        outcome["expert"] = publish(
            context, expert, weights, config={}, metrics={}, examples=EXAMPLES, seed=0, lease=lease,
        )  # fmt: skip

    def collector() -> None:
        outcome["gc"] = collect_garbage(
            context.catalogue, context.artifacts, context.jobs, delete=True,
            now=dt.datetime.now(dt.UTC) + LATER,
        )  # fmt: skip

    publishing = threading.Thread(target=publisher)
    publishing.start()
    assert uploaded.wait(120)  # the publisher decided the object is there (and skipped the upload)
    collecting = threading.Thread(target=collector)
    collecting.start()
    collecting.join(timeout=3)  # GC runs now, while the publish is in flight
    gc_waited = collecting.is_alive()
    resume.set()
    publishing.join(120)
    collecting.join(120)

    ready = outcome["expert"]
    assert ready.status == "ready" and ready.artifact.uri == orphan.uri
    assert context.artifacts.exists(orphan.uri), "a ready expert points at an object GC deleted"
    assert orphan.uri not in outcome["gc"].deleted
    assert gc_waited  # GC's delete step waited for the publish to commit
    assert context.artifact_cache.fetch(ready.artifact).read_bytes() == weights.read_bytes()


def test_reusing_stored_bytes_makes_the_object_young_again(own_context, tmp_path):
    context = own_context
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(b"bytes stored a while ago and uploaded again now")
    first = context.artifacts.put_file(weights)
    stored_at = (
        context.artifacts.stat(first.uri).last_modified if hasattr(context.artifacts, "stat") else None
    )
    time.sleep(2.5)  # S3 times have a resolution of one second
    context.artifacts.put_file(weights)  # same bytes: the upload is skipped
    grace = dt.timedelta(seconds=2)
    report = collect_garbage(context.catalogue, context.artifacts, context.jobs, delete=True, min_age=grace)
    assert report.deleted == [] and [o.uri for o in report.too_young] == [first.uri]
    assert context.artifacts.stat(first.uri).last_modified > stored_at
