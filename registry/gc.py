"""Garbage collection of the bucket: objects no catalogue row points to."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from elmreg.registry.artifacts import ArtifactRepository, StoredObject
from elmreg.registry.store.catalogue import CatalogueStore

# An upload becomes referenced only when its expert is published, moments later; objects younger than this
# may belong to a publish in flight and are never collected.
DEFAULT_MIN_AGE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class GcReport:
    unreferenced: list[StoredObject] = field(default_factory=list)
    too_young: list[StoredObject] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(o.size for o in self.unreferenced)


def collect_garbage(
    catalogue: CatalogueStore,
    artifacts: ArtifactRepository,
    *,
    delete: bool = False,
    min_age: dt.timedelta = DEFAULT_MIN_AGE,
    now: dt.datetime | None = None,
) -> GcReport:
    """Find (and with ``delete``, remove) objects under the configured prefix that no expert references.

    Args:
        delete: Remove the objects; without it this is a dry run that only reports them.
        min_age: Leave objects younger than this alone (an expert may be about to point at them).
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
    deleted = []
    if delete:
        for obj in unreferenced:
            artifacts.delete(obj.uri)
            deleted.append(obj.uri)
    return GcReport(unreferenced=unreferenced, too_young=too_young, deleted=deleted)
