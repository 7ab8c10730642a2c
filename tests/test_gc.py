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


def test_gc_lists_and_aborts_incomplete_multipart_uploads(settings, scratch_database, unique):
    # What a worker killed during the upload of a task vector over 64 MiB leaves: a multipart upload with a
    # stored part, never completed. No object listing shows it; its parts take room until it is aborted.
    context = RegistryContext(settings.replace(database_url=scratch_database, s3_prefix=f"gc-mp-{unique}/"))
    try:
        schema.upgrade(context.engine)
        artifacts = context.artifacts
        artifacts.ensure_bucket()
        client, bucket = artifacts.client, artifacts.bucket
        key = f"{artifacts.prefix}blobs/sha256/ab/{'ab' * 32}.safetensors"
        started = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata={"sha256": "ab" * 32})
        client.upload_part(
            Bucket=bucket, Key=key, UploadId=started["UploadId"], PartNumber=1, Body=b"\0" * (5 * 1024 * 1024)
        )
        assert list(artifacts.list_objects()) == []

        young = collect_garbage(context.catalogue, artifacts, context.jobs, delete=True)
        assert young.aborted == [] and young.incomplete_uploads == []
        assert [u.upload_id for u in young.young_uploads] == [started["UploadId"]]

        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
        dry = collect_garbage(context.catalogue, artifacts, context.jobs, now=later)
        assert [(u.uri, u.upload_id) for u in dry.incomplete_uploads] == [
            (f"s3://{bucket}/{key}", started["UploadId"])
        ]
        assert dry.aborted == []
        assert _uploads(client, bucket, key) == [started["UploadId"]]

        done = collect_garbage(context.catalogue, artifacts, context.jobs, delete=True, now=later)
        assert [u.upload_id for u in done.aborted] == [started["UploadId"]]
        assert _uploads(client, bucket, key) == []
        assert collect_garbage(context.catalogue, artifacts, context.jobs, now=later).incomplete_uploads == []
    finally:
        context.close()


def _uploads(client, bucket: str, key: str) -> list[str]:
    # Asked of S3 directly, not through the repository under test.
    return [
        u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    ]
