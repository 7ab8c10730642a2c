"""Garbage collection lists and deletes only objects that no expert references, and only old ones."""

from __future__ import annotations

import datetime as dt

import numpy as np

from elmreg.registry.entities import LibraryEntry
from elmreg.registry.gc import collect_garbage
from elmreg.registry.store import schema
from elmreg.runtime.context import RegistryContext


def test_gc_dry_run_then_delete(settings, scratch_database, tmp_path, unique):
    context = RegistryContext(settings.replace(database_url=scratch_database, s3_prefix=f"gc-{unique}/"))
    try:
        schema.upgrade(context.engine)
        catalogue, artifacts = context.catalogue, context.artifacts
        (tmp_path / "kept").write_bytes(b"weights of a published expert")
        (tmp_path / "orphan").write_bytes(b"an upload whose worker died before publishing")
        kept, orphan = artifacts.put_file(tmp_path / "kept"), artifacts.put_file(tmp_path / "orphan")
        backbone = catalogue.get_or_create_backbone("gc-backbone", "causal")
        embedder = catalogue.get_or_create_embedder("gc-embedder", 4)
        expert = catalogue.create_expert(name="kept", backbone_id=backbone.id, kind="lora")
        catalogue.publish_expert(
            expert.id, artifact=kept, embedder_id=embedder.id, entries=[LibraryEntry(0, "x", np.ones(4))]
        )

        # Both objects are seconds old.
        young = collect_garbage(catalogue, artifacts, context.jobs, delete=True)
        assert young.deleted == [] and [o.uri for o in young.too_young] == [orphan.uri]

        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
        dry = collect_garbage(catalogue, artifacts, context.jobs, now=later)
        assert [o.uri for o in dry.unreferenced] == [orphan.uri] and dry.deleted == []
        assert artifacts.exists(orphan.uri)

        done = collect_garbage(catalogue, artifacts, context.jobs, delete=True, now=later)
        assert done.deleted == [orphan.uri]
        assert not artifacts.exists(orphan.uri) and artifacts.exists(kept.uri)
    finally:
        context.close()
