"""Garbage collection of the bucket: objects no catalogue row points to.

Weights are content-addressed and an upload is skipped when the object already exists, so a publisher may rely
on an object that GC is about to delete. Two rules keep the pair safe:

- A publisher holds the artifacts lock (shared; many publish at once) from its upload, or its decision to skip
  the upload, until the transaction that makes its expert ready has committed; a skipped upload also touches the
  object, so that it is young again.
- GC deletes under the same lock held exclusively, and only objects that, at that moment, no expert references
  and whose last modification is older than the grace period.

A publisher that has checked the object therefore either commits its reference before GC looks again, or starts
after GC has deleted the object and uploads it anew.

Weights over 64 MiB go up in parts; an uploader killed mid-way leaves a multipart upload that no object listing
shows but whose parts take room. GC lists those too and aborts the ones older than the grace period, under the
same exclusive lock: no publisher is uploading then, so none of them belongs to an upload in flight.
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from elmreg.registry.artifacts import ArtifactRepository, StoredObject
from elmreg.registry.artifacts.base import IncompleteUpload
from elmreg.registry.store.catalogue import CatalogueStore
from elmreg.registry.store.jobs import JobStore

# An upload becomes referenced only when its expert is published, moments later; objects younger than this
# may belong to a publish in flight and are never collected.
DEFAULT_MIN_AGE = dt.timedelta(hours=1)
ARTIFACTS_LOCK = "elmreg-artifacts"


def publishing_artifacts(jobs: JobStore) -> AbstractContextManager[None]:
    """Hold this around uploading weights and publishing the expert that references them (see the module doc)."""
    return jobs.exclusive(ARTIFACTS_LOCK, shared=True)


@dataclass(frozen=True)
class GcReport:
    unreferenced: list[StoredObject] = field(default_factory=list)
    too_young: list[StoredObject] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    # Multipart uploads never completed: old enough to abort, younger ones left alone, and those aborted.
    incomplete_uploads: list[IncompleteUpload] = field(default_factory=list)
    young_uploads: list[IncompleteUpload] = field(default_factory=list)
    aborted: list[IncompleteUpload] = field(default_factory=list)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(o.size for o in self.unreferenced)


def collect_garbage(
    catalogue: CatalogueStore,
    artifacts: ArtifactRepository,
    jobs: JobStore,
    *,
    delete: bool = False,
    min_age: dt.timedelta = DEFAULT_MIN_AGE,
    now: dt.datetime | None = None,
) -> GcReport:
    """Find (and with ``delete``, remove) objects under the configured prefix that no expert references, and
    multipart uploads there that were never completed.

    Args:
        jobs: The store whose lock publishers hold; ``delete`` waits for publishes in flight.
        delete: Remove the objects; without it this is a dry run that only reports them.
        min_age: Leave objects younger than this alone (an expert may be about to point at them), and uploads
            started less than this long ago.

    Raises:
        ArtifactError: The store cannot list objects or incomplete uploads.
    """
    now = now or dt.datetime.now(dt.UTC)
    # Read the references after listing: an object published while we list is then seen as referenced.
    objects = list(artifacts.list_objects())
    referenced = catalogue.referenced_artifact_uris()
    unreferenced, too_young = [], []
    for obj in objects:
        if obj.uri in referenced:
            continue
        (too_young if now - obj.last_modified < min_age else unreferenced).append(obj)
    incomplete, young_uploads = [], []
    for upload in artifacts.list_incomplete_uploads():
        (young_uploads if now - upload.initiated < min_age else incomplete).append(upload)
    deleted: list[str] = []
    aborted: list[IncompleteUpload] = []
    if delete and (unreferenced or incomplete):
        with jobs.exclusive(ARTIFACTS_LOCK):
            for upload in incomplete:
                artifacts.abort_upload(upload)
                aborted.append(upload)
            # No publish is in flight now: what the catalogue and the store say at this moment is final.
            referenced = catalogue.referenced_artifact_uris()
            for obj in unreferenced:
                current = artifacts.stat(obj.uri)
                if obj.uri in referenced or current is None or now - current.last_modified < min_age:
                    continue
                artifacts.delete(obj.uri)
                deleted.append(obj.uri)
    return GcReport(
        unreferenced=unreferenced,
        too_young=too_young,
        deleted=deleted,
        incomplete_uploads=incomplete,
        young_uploads=young_uploads,
        aborted=aborted,
    )
