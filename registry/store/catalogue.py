"""What the catalogue knows: backbones, embedders, tasks, experts and the lineage of merged experts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from elmreg.registry.entities import (
    AliasMove,
    Backbone,
    Embedder,
    Expert,
    ExpertAlias,
    Job,
    LibraryEntry,
    Publication,
    StoredArtifact,
    Task,
)
from elmreg.registry.search import ExpertQuery


class CatalogueStore(ABC):
    """Backbones, embedders, tasks and experts; publishing an expert makes it routable in the library."""

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

    @abstractmethod
    def register_trained_embedder(
        self,
        name: str,
        dimension: int,
        artifact: StoredArtifact,
        *,
        trained_from_id: int,
        training: dict[str, Any],
    ) -> Embedder:
        """Register a retriever trained by elmreg, whose weights are ``artifact`` (and its HNSW index).

        Raises:
            AlreadyExistsError: An embedder called ``name`` exists.
        """

    @abstractmethod
    def latest_trained_embedder(self) -> Embedder | None:
        """The most recently registered trained retriever (None when there is none)."""

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

    # -- experts -------------------------------------------------------------------------------------------
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
    def publish_experts(self, publications: Sequence[Publication], *, embedder_id: int) -> list[Expert]:
        """:meth:`publish_expert` for many experts in one transaction (bulk imports): all or none become
        routable, each at its own library version, in the order given.

        Raises:
            CatalogueError: As :meth:`publish_expert`, for any of them (then none is published).
        """

    @abstractmethod
    def get_expert(self, key: int | str) -> Expert:
        """Look an expert up by id, name or ``task@alias`` (the expert the alias names now): every verb that
        takes an expert (predict, serve's model, export, merges) resolves it here.

        Raises:
            NotFoundError: No such expert, task or alias.
        """

    @abstractmethod
    def search_experts(self, query: ExpertQuery) -> list[Expert]:
        """The experts matching ``query``'s filter, in its order, at most its limit (with their aliases)."""

    @abstractmethod
    def list_experts(self, *, status: str | None = None, task_id: int | None = None) -> list[Expert]:
        """Experts, oldest first, optionally filtered."""

    @abstractmethod
    def retire_expert(self, expert_id: int, *, force: bool = False, moved_by: str = "") -> Expert:
        """Take a ready expert out of routing (a new library version); its weights and audit history stay.

        Args:
            force: Remove the aliases that name the expert first (each removal is kept as a move by
                ``moved_by``), in the same transaction.

        Raises:
            NotFoundError: No such expert.
            InvalidStateError: The expert is not ready (already retired, or not trained yet), or an alias names
                it and ``force`` is False (the message names the alias).
        """

    # -- aliases, tags and descriptions --------------------------------------------------------------------
    @abstractmethod
    def set_alias(self, task_id: int, alias: str, expert_id: int, *, moved_by: str) -> AliasMove | None:
        """Point ``task@alias`` at ``expert_id``, creating the alias or moving it, and keep the move; one
        transaction, serialised per task, so concurrent moves apply one after the other.

        Returns:
            The move, or None when the alias already named that expert (nothing is written).

        Raises:
            NotFoundError: No such task or expert.
            InvalidNameError: The alias is outside the grammar.
            InvalidStateError: The expert belongs to another task, or is not ready.
        """

    @abstractmethod
    def remove_alias(self, task_id: int, alias: str, *, moved_by: str) -> AliasMove:
        """Remove ``task@alias`` and keep the removal as a move. Raises NotFoundError for an unknown alias."""

    @abstractmethod
    def list_aliases(self, task_id: int | None = None) -> list[ExpertAlias]:
        """Aliases (of one task, or all), by task and alias."""

    @abstractmethod
    def alias_moves(self, task_id: int | None = None, alias: str | None = None) -> list[AliasMove]:
        """Every move of the aliases (of one task, or one alias of it), oldest first."""

    @abstractmethod
    def tag_task(
        self,
        task_id: int,
        *,
        tags: dict[str, str] | None = None,
        remove: Sequence[str] = (),
        description: str | None = None,
    ) -> Task:
        """Set and remove tags of a task, and set its description when given (limits in ``registry.tags``).

        Raises:
            NotFoundError: No such task.
            UserError: A tag or the description is outside the limits, or a tag to remove is not there.
        """

    @abstractmethod
    def tag_expert(
        self,
        expert_id: int,
        *,
        tags: dict[str, str] | None = None,
        remove: Sequence[str] = (),
        description: str | None = None,
    ) -> Expert:
        """:meth:`tag_task` for an expert."""

    @abstractmethod
    def referenced_artifact_uris(self) -> set[str]:
        """Every artifact URI the catalogue points to (for garbage collection of the bucket)."""

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
