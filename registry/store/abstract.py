"""The catalogue's interface. Implementations return the frozen records of ``entities``, never ORM rows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from elmreg.registry.store.entities import (
    Backbone,
    CatalogueSummary,
    Embedder,
    Expert,
    Job,
    LibraryEntry,
    LibraryHit,
    StoredArtifact,
    Task,
    TrainingRun,
)


class RegistryStore(ABC):
    """Everything elmreg keeps about backbones, tasks, experts, the library, jobs and audits."""

    # -- status --------------------------------------------------------------------------------------------
    @abstractmethod
    def summary(self) -> CatalogueSummary:
        """Schema revision, library version, server versions and the row count of every table."""

    # -- backbones and embedders ---------------------------------------------------------------------------
    @abstractmethod
    def get_or_create_backbone(
        self, name: str, family: str, fingerprint: str | None = None, config: dict[str, Any] | None = None
    ) -> Backbone:
        """Return the backbone called ``name``, registering it first if it is new.

        Raises:
            CatalogueError: ``family`` is not 'causal' or 'seq2seq'.
        """

    @abstractmethod
    def get_backbone(self, key: int | str) -> Backbone:
        """Look a backbone up by id or name. Raises NotFoundError."""

    @abstractmethod
    def get_or_create_embedder(self, name: str, dimension: int, normalized: bool = True) -> Embedder:
        """Return the embedder called ``name``, registering it (and its HNSW index) first if it is new.

        Raises:
            CatalogueError: The embedder exists with another dimension.
        """

    @abstractmethod
    def get_embedder(self, key: int | str) -> Embedder:
        """Look an embedder up by id or name. Raises NotFoundError."""

    # -- tasks ---------------------------------------------------------------------------------------------
    @abstractmethod
    def create_task(self, *, enqueue_training: bool = True, **fields: Any) -> tuple[Task, Job | None]:
        """Register a task and, in the same transaction, queue the job that trains its expert.

        Args:
            enqueue_training: Queue a ``train`` job for the task (deduplicated per task).
            **fields: The columns of ``Task`` except id and created_at.

        Returns:
            The task and its training job (None when ``enqueue_training`` is False).

        Raises:
            AlreadyExistsError: A task with that name exists; nothing is written.
        """

    @abstractmethod
    def get_task(self, key: int | str) -> Task:
        """Look a task up by id or name. Raises NotFoundError."""

    @abstractmethod
    def list_tasks(self) -> list[Task]:
        """All tasks, oldest first."""

    # -- experts and the library ---------------------------------------------------------------------------
    @abstractmethod
    def create_expert(
        self,
        *,
        name: str,
        backbone_id: int,
        kind: str,
        task_id: int | None = None,
        config: dict[str, Any] | None = None,
        status: str = "pending",
    ) -> Expert:
        """Register an expert that has no weights yet. Raises AlreadyExistsError for a taken name."""

    @abstractmethod
    def set_expert_status(self, expert_id: int, status: str) -> Expert:
        """Move a not-yet-ready expert between 'pending', 'training' and 'failed'.

        Raises:
            CatalogueError: The move would make an expert ready without :meth:`publish_expert`.
        """

    @abstractmethod
    def publish_expert(
        self,
        expert_id: int,
        *,
        artifact: StoredArtifact,
        embedder_id: int,
        entries: Sequence[LibraryEntry],
        metrics: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        lease: tuple[int, str] | None = None,
    ) -> Expert:
        """Make an expert routable, atomically: record its verified artifact, insert its library entries,
        take the next library version and mark it 'ready'. Call only after the upload was verified.

        Args:
            lease: ``(job_id, worker)``: publish only while that worker still holds that job's lease, so a
                worker whose lease expired (and whose job was re-claimed) cannot add a second expert.

        Raises:
            CatalogueError: The expert is already ready or retired, an entry has the wrong dimension, or the
                lease is no longer held.
        """

    @abstractmethod
    def get_expert(self, key: int | str) -> Expert:
        """Look an expert up by id or name. Raises NotFoundError."""

    @abstractmethod
    def list_experts(self, *, status: str | None = None, task_id: int | None = None) -> list[Expert]:
        """Experts, oldest first, optionally filtered."""

    @abstractmethod
    def retire_expert(self, expert_id: int) -> Expert:
        """Take a ready expert out of routing (a new library version); its weights and audit history stay."""

    @abstractmethod
    def library_version(self) -> int:
        """The current library version (0 for an empty library)."""

    @abstractmethod
    def add_library_entries(self, expert_id: int, embedder_id: int, entries: Iterable[LibraryEntry]) -> int:
        """Bulk-insert (COPY) entries of an existing expert for one embedder; returns how many were written."""

    @abstractmethod
    def library_texts(self, expert_id: int, embedder_id: int) -> list[tuple[int, str]]:
        """The ``(sample_index, text)`` of an expert's entries for one embedder, in sample order."""

    @abstractmethod
    def library_entries(self, expert_id: int, embedder_id: int) -> list[LibraryEntry]:
        """An expert's entries for one embedder, with their embeddings, in sample order (to copy them)."""

    @abstractmethod
    def nearest_entries(
        self, embedder_id: int, query: Sequence[float], *, k: int = 1, library_version: int | None = None
    ) -> list[LibraryHit]:
        """The ``k`` entries of routable experts with the largest inner product with ``query``.

        Args:
            library_version: Search the library as it was at that version (default: now).
        """

    @abstractmethod
    def referenced_artifact_uris(self) -> set[str]:
        """Every artifact URI the catalogue points to (for garbage collection of the bucket)."""

    @abstractmethod
    def start_training_run(
        self,
        *,
        task_id: int,
        expert_id: int | None,
        worker: str,
        config: dict[str, Any],
        job_id: int | None = None,
    ) -> TrainingRun:
        """Record that ``worker`` started training an expert for a task."""

    @abstractmethod
    def finish_training_run(
        self, run_id: int, *, status: str, metrics: dict[str, Any] | None = None, error: str | None = None
    ) -> TrainingRun:
        """Close a training run as 'succeeded' or 'failed'."""

    @abstractmethod
    def abandon_training_runs(self, job_id: int, reason: str) -> int:
        """Close the still-running runs of a job whose worker vanished (its job was re-claimed) as failed."""

    @abstractmethod
    def list_training_runs(self, *, task_id: int | None = None) -> list[TrainingRun]:
        """Training runs, oldest first."""

    @abstractmethod
    def record_evaluation(
        self,
        *,
        task_id: int,
        expert_id: int | None,
        route: str,
        split: str,
        metric: str,
        score: float,
        n_examples: int,
        library_version: int | None,
        details: dict[str, Any] | None = None,
        benchmark_run_id: int | None = None,
    ) -> int:
        """Store one evaluation result; returns its id."""

    @abstractmethod
    def list_evaluations(self, *, task_id: int | None = None) -> list[dict[str, Any]]:
        """Evaluation results, oldest first, as plain dicts."""

    @abstractmethod
    def audit_rows(
        self, view: str, *, order_by: str | None, filters: dict[str, Any], limit: int
    ) -> list[dict[str, Any]]:
        """Rows of one audit view (a name from ``registry.audit.AUDIT_VIEWS``), newest first by ``order_by``,
        restricted to rows whose columns equal ``filters``."""

    # -- merged experts ------------------------------------------------------------------------------------
    @abstractmethod
    def create_merged_expert(
        self,
        *,
        name: str,
        backbone_id: int,
        config: dict[str, Any],
        merge_method: str,
        merge_params: dict[str, Any],
        parents: Sequence[tuple[int, float]],
        artifact: StoredArtifact,
        embedder_id: int | None,
        entries: Sequence[LibraryEntry],
    ) -> Expert:
        """Register a merged expert and make it routable, in one transaction: the expert (kind 'merged', its
        verified artifact, method and parameters), its lineage in ``expert_parents``, its library entries and the
        next library version. Call only after the upload was verified.

        Args:
            parents: ``(parent expert id, weight)`` in merge order.
            embedder_id: The embedder of ``entries`` (None when there are none).
            entries: The merged expert's library entries (may be empty: then RoE never picks it).

        Raises:
            AlreadyExistsError: The name is taken; nothing is written.
            NotFoundError: A parent does not exist.
            CatalogueError: A parent is not ready, or an entry has the wrong dimension.
        """

    @abstractmethod
    def find_merged_expert(self, signature: str) -> Expert | None:
        """The ready merged expert whose ``merge_params["signature"]`` is ``signature`` (same parents, weights,
        method and parameters), or None."""

    @abstractmethod
    def exclusive(self, key: str) -> AbstractContextManager[None]:
        """A context manager holding a lock named ``key`` across every process that uses this catalogue, so that
        work which must not run twice at once (the same merge requested by two callers) runs once."""

    @abstractmethod
    def annotate_routing_decision(self, decision_id: int, details: dict[str, Any]) -> None:
        """Add ``details`` (top-level keys) to a recorded routing decision's ``details``, e.g. that its experts
        were composed into a merged one.

        Raises:
            NotFoundError: No such decision.
        """

    # -- work queue ----------------------------------------------------------------------------------------
    @abstractmethod
    def enqueue_job(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        dedupe_key: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
    ) -> Job:
        """Queue a job. With a ``dedupe_key`` that is already queued or done, return that job instead."""

    @abstractmethod
    def claim_job(
        self, worker: str, *, lease_seconds: float, kinds: Sequence[str] | None = None
    ) -> Job | None:
        """Take the next runnable job (queued, or running with an expired lease) for ``worker``; with
        ``job_id``, that job only.

        Uses ``FOR UPDATE SKIP LOCKED`` so that any number of workers on any number of machines can claim
        concurrently and each job goes to exactly one of them.
        """

    @abstractmethod
    def heartbeat(self, job_id: int, worker: str, *, lease_seconds: float) -> bool:
        """Extend the lease; returns False when the worker no longer holds it (it must stop)."""

    @abstractmethod
    def finish_job(self, job_id: int, worker: str) -> Job:
        """Mark a job the worker holds as succeeded."""

    @abstractmethod
    def fail_job(
        self,
        job_id: int,
        worker: str,
        error: str,
        *,
        retry_delay_seconds: float = 30.0,
        permanent: bool = False,
    ) -> Job:
        """Record a failure: queue the job again after a delay, or mark it failed once attempts are used up
        (at once when ``permanent``: a failure that retrying cannot fix, such as bad task data)."""

    @abstractmethod
    def get_job(self, job_id: int) -> Job:
        """Look a job up. Raises NotFoundError."""

    @abstractmethod
    def list_jobs(self, *, status: str | None = None) -> list[Job]:
        """Jobs, oldest first."""
