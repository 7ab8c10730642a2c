"""The Python API: ``from elmreg import Registry``. The CLI is a thin layer over these verbs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elmreg.api_keys import SHOWN_CHARACTERS, key_digest, new_key
from elmreg.data.examples import render_split
from elmreg.data.prompts import PromptedExample
from elmreg.data.sources import DatasetSpec
from elmreg.registry.entities import (
    AliasMove,
    ApiKey,
    CatalogueSummary,
    Expert,
    ExpertAlias,
    Job,
    PendingDecision,
    RoutingDecisionRecord,
    RoutingVote,
    Task,
    TrainingRun,
)
from elmreg.registry.errors import CatalogueError, NotFoundError, UserError
from elmreg.registry.gc import DEFAULT_MIN_AGE, GcReport, collect_garbage
from elmreg.registry.progress import SILENT, Reporter
from elmreg.registry.search import expert_query
from elmreg.registry.settings import Settings, load_settings
from elmreg.registry.tags import check_description, merged_tags
from elmreg.runtime.context import RegistryContext
from elmreg.runtime.library_embedding import ReembedReport, reembed_library
from elmreg.runtime.tasks import IngestReport, TaskPlan, TaskRequest, add_task, ingest_manifests, plan_task

# The catalogue's records, for the CLI and the server: they import them from here, never from the stores.
__all__ = [
    "AliasMove",
    "ApiKey",
    "CatalogueSummary",
    "Expert",
    "ExpertAlias",
    "Job",
    "PendingDecision",
    "Registry",
    "RoutingDecisionRecord",
    "RoutingVote",
    "Task",
    "TrainingRun",
]

# A key's limits: a rate of at least one request in 100 s, and nothing beyond what one server could take.
MIN_KEY_RATE, MAX_KEY_LIMIT = 0.01, 100_000


class Registry:
    """An expert registry: its catalogue (PostgreSQL + pgvector) and its weights (S3).

    Example::

        from elmreg import Registry
        registry = Registry()                # embedded services, or ELMREG_* settings
        for expert in registry.experts(status="ready"):
            print(expert.name, expert.library_version)
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any):
        """Args:
        settings: Complete settings; by default read from ``ELMREG_*`` variables and the config file.
        **overrides: Individual settings to override, e.g. ``home="/data/elmreg"``.
        """
        self.context = RegistryContext(settings or load_settings(**overrides))
        # Loaded on first use and kept: an embedder and backbones take seconds to load.
        self._router = None
        self._pools: dict[str, Any] = {}
        self._engines: dict[str, Any] = {}
        self._engine_choice = (self.settings.engine, self.settings.vllm_url, self.settings.vllm_api_key)

    @property
    def settings(self) -> Settings:
        return self.context.settings

    def close(self) -> None:
        # A vLLM engine stops the vLLM server it started.
        for engine in self._engines.values():
            if hasattr(engine, "close"):
                engine.close()
        self._engines.clear()
        self.context.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- growing the library -------------------------------------------------------------------------------
    def add_task(
        self, dataset: str, *, now: bool = False, reporter: Reporter = SILENT, **options: Any
    ) -> Task:
        """Register a task (validated first; nothing is written if it is invalid) and queue its training.

        Args:
            dataset: ``bigbench:<task>``, a local json/jsonl/csv/parquet file or folder, or a hub id.
            now: Train the expert in this process before returning (otherwise a worker does it).
            reporter: Told of the training's progress when ``now``.
            **options: The other fields of ``registry.tasks.TaskRequest`` (prompt, kind, max_examples, ...).

        Example::

            registry.add_task("bigbench:strategyqa", max_examples=64, training={"epochs": 1})
        """
        task, job = add_task(self.context, TaskRequest(dataset=dataset, **options))
        if now and job is not None:
            done = self.worker(reporter=reporter).run_once(job_id=job.id)
            if done is None or done.status != "succeeded":
                raise CatalogueError(
                    f"training task {task.name} failed: {done.last_error if done else 'not runnable'}"
                )
        return task

    def worker(
        self, *, reporter: Reporter = SILENT, name: str | None = None, lease_seconds: float | None = None
    ):
        """A worker that runs queued ``train`` jobs (``.run_once()``, ``.drain()``, ``.run_forever()``)."""
        from elmreg.jobs import DEFAULT_LEASE_SECONDS, Worker

        return Worker(
            self.context, reporter=reporter, name=name, lease_seconds=lease_seconds or DEFAULT_LEASE_SECONDS
        )

    def train(self, *, reporter: Reporter = SILENT) -> list[Job]:
        """Run every queued training job in this process; returns the jobs as they ended."""
        return self.worker(reporter=reporter).drain()

    def ingest(self, folder: str | Path | None = None) -> IngestReport:
        """Register the tasks of the manifest folder (``ELMREG_MANIFEST_DIR``) that are not registered yet."""
        return ingest_manifests(self.context, Path(folder) if folder else None)

    def reembed(self, embedder: str, *, source: str | None = None) -> ReembedReport:
        """Build library entries for another sentence encoder from the texts of ``source`` (default: the
        configured embedder), so that retrievers can be compared. ``embedder`` is a hub id, a local folder or a
        trained retriever of the catalogue (fetched from the artifact store)."""
        from elmreg.runtime.retrievers import load_catalogued_embedder

        return reembed_library(
            self.context.catalogue,
            self.context.library,
            load_catalogued_embedder(self.context, embedder),
            source_embedder=source or self.settings.embedder,
        )

    def reindex(self, embedder: str | None = None):
        """Rebuild an embedder's HNSW index (default: the configured embedder's) with the current ``library_*``
        settings (index type, m, ef_construction, build memory and workers): settings changed after an index was
        built apply from then on. Routing keeps answering meanwhile, by exact scan, with the same decisions.

        Returns:
            ``(storage before, storage after, seconds)`` (``LibraryStorage``: entries, sizes, index type).
        """
        record = self.context.catalogue.get_embedder(embedder or self.settings.embedder)
        library = self.context.library
        before = library.storage(record.id)
        started = time.perf_counter()
        library.build_index(record.id, record.dimension)
        return before, library.storage(record.id), time.perf_counter() - started

    def train_retriever(
        self,
        *,
        name: str | None = None,
        epochs: int = 2,
        batch_size: int = 16,
        learning_rate: float = 5e-5,
        seed: int = 0,
        library_version: int | None = None,
        source: str | None = None,
        reporter: Reporter = SILENT,
    ):
        """Fine-tune the embedder on the library itself (pairs of samples of one expert, contrasted with the
        other experts' pairs of the batch by MultipleNegativesRankingLoss), publish it to the artifact store as
        the embedder ``name`` and re-embed the library with it; the ``trained`` router then routes with it.

        Args:
            name: The new embedder's name (default: ``retriever-v<library version>-<UTC time>``).
            epochs, batch_size, learning_rate, seed: ``trainers.retriever.RetrieverConfig``.
            library_version: Train on the experts routable at this version (default: now).
            source: The embedder whose entries are the training data and which is fine-tuned (default: the
                configured one).
            reporter: Told of the fine-tuning's progress.

        Returns:
            ``trainers.retriever.RetrieverReport``.

        Raises:
            UserError: An existing name, an unknown library version or source, or fewer than two experts with
                library samples; nothing is written.

        Example::

            registry.train_retriever(name="retriever-1", epochs=1)
            registry.route(queries, router="trained")
        """
        from elmreg.trainers.retriever import RetrieverConfig, train_retriever

        config = RetrieverConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
        return train_retriever(
            self.context,
            name=name,
            config=config,
            library_version=library_version,
            source=source,
            reporter=reporter,
        )

    def export_expert(self, key: int | str, out_dir: str | Path) -> Path:
        """Write an expert to a folder: PEFT format for LoRA, safetensors otherwise, plus a JSON card."""
        from elmreg.trainers.pipeline import export_expert

        return export_expert(self.context, self.expert(key), Path(out_dir))

    def import_expert(
        self, folder: str | Path, *, task: int | str, name: str | None = None, reporter: Reporter = SILENT
    ) -> Expert:
        """Register an existing PEFT LoRA adapter folder as an expert of a registered task. The tags and
        description of an ``elmreg_expert.json`` card in the folder (``export_expert`` writes one) come along."""
        from elmreg.trainers.pipeline import import_peft_adapter

        tags, description = _card_tags(Path(folder))  # checked before anything is written
        expert = import_peft_adapter(
            self.context, Path(folder), self.task(task), name=name, reporter=reporter
        )
        if tags or description:
            expert = self.context.catalogue.tag_expert(expert.id, tags=tags, description=description)
        return expert

    def merge(
        self,
        experts,
        *,
        weights=None,
        method: str = "task_arithmetic",
        density: float | None = None,
        seed: int = 0,
        name: str | None = None,
        library: str = "union",
        tune_on=(),
        grid=None,
        tune_limit: int | None = 32,
        reporter: Reporter = SILENT,
    ):
        """Merge ready experts of one kind and backbone into a new expert of kind ``merged``.

        The merged weights are uploaded like any expert's; the catalogue records its lineage (``expert_parents``:
        parents, positions, weights), ``merge_method`` and ``merge_params`` (parameters, a signature, the tuning
        table), and publishes it with its own library entries at a new library version, in one transaction.
        The same merge asked for twice returns the first one (``reused``).

        Args:
            experts: Two or more expert ids or names, all ``lora``, all ``ffn_adapter`` or all ``full`` (merged
                experts count as their parents' kind).
            weights: λ_i per expert (default 1/N each); θ = θ_pre + Σ λ_i τ_i for task arithmetic.
            method: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune``
                (PEFT's ``merge_utils``); for LoRA also PEFT's ``linear``, ``cat`` and ``svd`` combinations.
            density: Fraction kept by TIES / DARE / magnitude pruning (default 0.5).
            seed: Seeds DARE's random pruning.
            name: The new expert's name (default: the parents' names joined by '+').
            library: ``union`` (the parents' library samples, re-used as stored) or ``none`` (RoE never picks it).
            tune_on: Task names: choose the weights by grid search on their validation splits instead.
            grid: Weight values tried per expert when tuning (default 0.25, 0.5, 0.75, 1).
            tune_limit: Validation examples per task when tuning (seeded sample).
            reporter: Told of each step as a stage line (the CLI prints them).

        Returns:
            ``merging.pipeline.MergeResult``: ``expert``, ``reused``, ``seconds``, ``tuning``.

        Raises:
            UserError: A merge that makes no sense (fewer than 2 experts, unknown or unready ones, different
                backbones or kinds, mismatched shapes or ranks, wrong weight count); nothing is written.

        Example::

            merged = registry.merge(["colours", "moods"], weights=[0.5, 0.5]).expert
            registry.evaluate("colours", f"expert:{merged.id}")
        """
        from elmreg.merging.pipeline import merge_experts

        return merge_experts(
            self.context,
            list(experts),
            weights=weights,
            method=method,
            density=density,
            seed=seed,
            name=name,
            library=library,
            tune_on=list(tune_on),
            grid=grid,
            tune_limit=tune_limit,
            reporter=reporter,
        )

    # -- using the library ----------------------------------------------------------------------------------
    def router(self):
        """The router (loads the embedder once; reuse it for many decisions)."""
        from elmreg.inference.router import Router

        if self._router is None:
            # In-model routers (Arrow) run on this registry's adapter pool of the backbone.
            self._router = Router(
                self.context,
                pool_for=lambda backbone_id: self._pool(
                    self.context.catalogue.get_backbone(backbone_id).name
                ),
            )
        return self._router

    def route(self, instances, *, task: int | str | None = None, router: str = "roe", **options: Any):
        """Choose an expert for instances of one task, by Retrieval-of-Experts unless another ``router`` is
        named, recording the decision with the router's name and options.

        Args:
            instances: ``PromptedExample`` s or texts in the library format.
            task: The registered task they come from, if any (shown in the audit views).
            router: ``roe`` (the paper's), ``roe-knn``, ``centroid``, ... (``routers()`` lists them).
            **options: ``q``, ``router_options`` (e.g. ``{"top_k": 8}``), ``top_k``, ``kinds``, ``backbone_id``,
                ``library_version``, ``caller_label``.

        Returns:
            ``inference.router.RoutingDecision``.

        Example::

            registry.route(queries, router="roe-knn", router_options={"top_k": 16})
        """
        task_id = self.task(task).id if task is not None else None
        return self.router().route(instances, task_id=task_id, router=router, **options)

    def assign(self, instances, *, task: int | str | None = None, router: str = "roe", **options: Any):
        """Who answers each instance, by any router: one expert for the task (RoE and the other per-task
        routers, on Q of the instances), one per instance (``per-instance``), or a mixture (``arrow``). Every
        decision is recorded as by :meth:`route`.

        Args:
            instances: ``PromptedExample`` s (or texts in the library format, for routers that search it).
            task: The registered task they come from, if any (shown in the audit views).
            router: A name of ``routers()``.
            **options: As for :meth:`route`.

        Returns:
            ``inference.assignment.Assignment``: ``answerers`` (one per instance) and ``decisions``; answer it
            with :meth:`answer`.

        Example::

            assignment = registry.assign(queries, router="per-instance")
            rows = registry.answer(queries, assignment)
        """
        task_id = self.task(task).id if task is not None else None
        return self.router().assign(instances, task_id=task_id, router=router, **options)

    def assignment(self, experts):
        """An assignment that names each instance's expert (id, name or None for the base backbone)."""
        from elmreg.inference.assignment import assign_each

        return assign_each([self.expert(e) if e is not None else None for e in experts])

    @staticmethod
    def routers() -> dict[str, str]:
        """The registered routing methods: name -> one-line summary."""
        from elmreg.inference.routers import router_class, router_names

        return {name: router_class(name).summary for name in router_names()}

    def predict(
        self,
        instances,
        *,
        expert: int | str | None = None,
        route: str | None = None,
        task: int | str | None = None,
        q: int = 32,
        capacity: int = 4,
        compose: int | None = None,
        router_options: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Answer instances with one expert given (``expert``), with the experts a router assigns (``route``:
        any name of ``routers()``; ``per-instance`` answers each instance with the expert routed for it alone,
        ``arrow`` with its mixture), or with the base backbone (neither).

        With ``compose=K``, RoE's K most voted experts are merged (once; later calls reuse the merged expert)
        and the merged expert answers: for instructions that combine several tasks' skills. The decision records
        the composition in ``routing_decisions.details["compose"]``.

        Classification instances (with answer choices) are rank-classified; the others get greedy generations.

        Returns:
            One dict per instance, as :meth:`answer` gives.
        """
        from elmreg.inference.assignment import Assignment

        if expert is not None and route is not None:
            raise UserError("give either an expert or a route, not both")
        count = len(instances)
        if compose is not None:
            from elmreg.merging.compose import compose as compose_experts

            if expert is not None or route not in (None, "roe"):
                raise UserError("compose chooses its experts by RoE: give no expert and no other route")
            decision = self.route(instances, task=task, q=min(q, count), caller_label="predict:compose")
            merged = compose_experts(self.context, decision, compose).expert
            assignment = Assignment.fixed(merged, count, decision=decision)
        elif route is not None:
            assignment = self.assign(
                instances,
                task=task,
                q=min(q, count),
                router=route,
                router_options=router_options,
                caller_label="predict",
            )
        else:
            assignment = Assignment.fixed(self.expert(expert) if expert is not None else None, count)
        return self.answer(instances, assignment, task=task, capacity=capacity)

    def answer(
        self,
        instances,
        assignment,
        *,
        task: int | str | None = None,
        capacity: int = 4,
        task_type: str | None = None,
    ) -> list[dict[str, Any]]:
        """Answer each instance by its answerer in ``assignment`` (from :meth:`assign` or :meth:`assignment`),
        on the one engine of the experts' backbone (the task's, or the configured one, for the base backbone).

        Returns:
            One dict per instance, in input order: ``input``, ``prediction``, ``expert`` (the answering expert's
            name; for a mixture, the expert with the most routing mass; None: the base backbone),
            ``decision_id`` (None: named by the caller), and for a mixture ``mixture`` (its experts' names, most
            routing mass first).

        Raises:
            UserError: Counts differ, or the experts are on different backbones.
        """
        from elmreg.inference.engine import answer_texts

        if len(instances) != len(assignment):
            raise UserError(
                f"{len(instances)} instances but {len(assignment)} experts; give one expert per instance"
            )
        backbone_id = assignment.backbone_id()
        if backbone_id is not None:
            backbone = self.context.catalogue.get_backbone(backbone_id).name
        elif task is not None:
            backbone = self.context.catalogue.get_backbone(self.task(task).backbone_id).name
        else:
            backbone = self.settings.backbone
        engine = self.engine(backbone, capacity=capacity)
        predictions = answer_texts(engine, instances, assignment, task_type=task_type)
        mixtures = {d.decision_id: [t.expert_name for t in d.tallies] for d in assignment.decisions}
        rows = []
        for instance, answerer, prediction in zip(instances, assignment.answerers, predictions, strict=True):
            row = {
                "input": instance.input,
                "prediction": prediction,
                "expert": answerer.expert.name if answerer.expert else None,
                "decision_id": answerer.decision_id,
            }
            if answerer.mixture is not None:
                row["mixture"] = mixtures.get(answerer.decision_id) or [
                    e.name for e in answerer.mixture.experts
                ]
            rows.append(row)
        return rows

    def use_engine(
        self, engine: str, *, vllm_url: str | None = None, vllm_api_key: str | None = None
    ) -> None:
        """Answer with ``engine`` (``peft`` or ``vllm``, as ``ELMREG_ENGINE``) from now on; ``vllm_url``: a running
        vLLM server (default: ``ELMREG_VLLM_URL``; empty: elmreg starts one).

        Raises:
            UserError: An unknown engine, or an engine of another kind already answered in this registry.
        """
        if engine not in ("peft", "vllm"):
            raise UserError(f"unknown engine '{engine}'; use peft or vllm")
        _, url, key = self._engine_choice
        choice = (engine, (vllm_url if vllm_url is not None else url).rstrip("/"), vllm_api_key or key)
        if self._engines and choice != self._engine_choice:
            raise UserError("choose the engine before the first answer")
        self._engine_choice = choice

    def engine(self, backbone: str | None = None, *, capacity: int = 4, device: str | None = None):
        """The engine that answers for experts of ``backbone`` (default: the configured one) in this process: one
        per backbone. The built-in engine (``ELMREG_ENGINE=peft``) runs on the registry's one adapter pool of
        it (``capacity`` and ``device`` apply when it is first made); the vLLM engine talks to the vLLM server
        at ``ELMREG_VLLM_URL``, or to one it starts on the backbone's folder."""
        from elmreg.inference.engine import PeftEngine

        backbone = backbone or self.settings.backbone
        if backbone not in self._engines:
            if self._engine_choice[0] == "vllm":
                self._engines[backbone] = self._vllm_engine(backbone)
            else:
                self._engines[backbone] = PeftEngine(self._pool(backbone, capacity, device))
        return self._engines[backbone]

    def _vllm_engine(self, backbone: str):
        from elmreg.inference.vllm_engine import VllmEngine, load_served_backbone
        from elmreg.inference.vllm_server import VllmServer, connect
        from elmreg.models.backbones import local_folder

        _, url, api_key = self._engine_choice
        folder = local_folder(backbone, self.settings.cache_path)
        if folder is None:
            raise UserError(
                f"the vLLM engine needs the backbone as a local folder; {backbone} is neither a folder nor "
                "the default backbone"
            )
        served = load_served_backbone(backbone, folder)
        server = None
        if url:
            endpoint = connect(url, api_key)
        else:
            server = VllmServer(
                self.settings, folder, served_name="base", log_dir=self.settings.home / "serve"
            )
            endpoint = server.endpoint
        return VllmEngine(
            self.context,
            served,
            endpoint,
            max_lora_rank=self.settings.vllm_max_lora_rank,
            on_close=server.stop if server is not None else None,
        )

    def _pool(self, backbone: str, capacity: int = 4, device: str | None = None):
        from elmreg.inference.pool import AdapterPool

        if backbone not in self._pools:
            self._pools[backbone] = AdapterPool(self.context, backbone, capacity=capacity, device=device)
        return self._pools[backbone]

    def evaluate(
        self,
        task: int | str,
        route: str = "roe",
        *,
        split: str = "validation",
        limit: int | None = None,
        q: int = 32,
        reporter: Reporter = SILENT,
        router_options: dict[str, Any] | None = None,
    ):
        """Evaluate a route (``oracle``, ``base``, ``expert:<id>`` or a router: ``roe``, ``roe-knn``, ...) on a
        task's labelled split and store the result in ``evaluations``. Returns
        ``inference.evaluation.EvaluationResult``.

        Args:
            reporter: Told of each pass over the examples (one per task and answerer) as a counted step.
            router_options: Options of the router named by ``route`` (e.g. ``{"top_k": 8}``).
        """
        _check_evaluation_counts(limit, q)
        record = self.task(task)
        backbone = self.context.catalogue.get_backbone(record.backbone_id).name
        return self._evaluator(backbone, reporter).evaluate(
            record, route, split=split, limit=limit, q=q, router_options=router_options
        )

    def evaluate_dataset(
        self,
        plan: TaskPlan,
        route: str = "roe",
        *,
        split: str = "validation",
        limit: int | None = None,
        q: int = 32,
        reporter: Reporter = SILENT,
        router_options: dict[str, Any] | None = None,
    ):
        """Evaluate a route on data that is not a registered task (an unseen task): ``plan`` comes from
        :meth:`plan_task`, so nothing is registered or queued, and the result is returned, not stored (routing
        decisions are recorded, labelled ``eval:<name>``).

        Example::

            plan = registry.plan_task("bigbench:causal_judgment")
            registry.evaluate_dataset(plan, "roe", limit=100)
        """
        from elmreg.inference.evaluation import EvaluationData

        _check_evaluation_counts(limit, q)
        examples = self.examples(plan, split=split, limit=limit)
        try:
            backbone = self.context.catalogue.get_backbone(plan.backbone)
        except NotFoundError:
            raise UserError(
                f"no expert was trained on backbone {plan.backbone} yet: register and train tasks on it first"
            ) from None
        data = EvaluationData(
            plan.fields["name"],
            None,
            plan.fields["task_type"],
            plan.fields["metric"],
            backbone.id,
            split,
            limit,
            examples,
        )
        return self._evaluator(backbone.name, reporter).evaluate_data(
            data, route, q=q, record=False, router_options=router_options
        )

    def audit(self, view: str = "decisions", *, limit: int = 20, **filters: Any) -> list[dict[str, Any]]:
        """Rows of an audit view, newest first: what ``elmreg audit``'s SQL shows, as dicts.

        Args:
            view: ``decisions`` (one row per routing decision, with vote margin and runner-up), ``choices``
                (expert chosen per task per day), ``never_chosen`` (ready experts no decision picked) or
                ``votes`` (every vote with the library sample it matched).
            limit: At most this many rows.
            **filters: Column equalities, e.g. ``task="strategyqa"`` or ``decision_id=7``.

        Example::

            registry.audit("votes", decision_id=decision.decision_id, limit=32)
        """
        from elmreg.registry.audit_views import audit_view

        name, order_by = audit_view(view)
        if limit < 1:
            raise UserError(f"limit must be at least 1, got {limit}")
        return self.context.audit.audit_rows(name, order_by=order_by, filters=filters, limit=limit)

    def plan_task(self, dataset: str, *, to_register: bool = True, **options: Any) -> TaskPlan:
        """Validate a task exactly as ``add_task`` would, writing nothing and queueing no training: for data
        that must stay unseen (held-out evaluation tasks). ``plan.fields`` holds its name, templates, task type
        and metric; ``examples(plan)`` renders its data. ``to_register=False``: only to evaluate on
        (:meth:`evaluate_dataset`), so the name may be a registered task's."""
        return plan_task(self.context, TaskRequest(dataset=dataset, **options), to_register=to_register)

    def examples(
        self,
        task: int | str | TaskPlan,
        *,
        split: str = "validation",
        limit: int | None = None,
        seed: int = 0,
    ) -> list:
        """A task's labelled examples of ``split``, rendered with its template(s) as training and evaluation
        see them (``registry.prompts.PromptedExample``: ``input``, ``target``, ``answer_choices``).

        Args:
            task: A registered task (id or name), or an unregistered one from :meth:`plan_task`.
            limit: A seeded sample of this many rows (order kept); ``split=task.split``,
                ``limit=task.max_examples`` and the training seed give exactly the expert's training examples.

        Example::

            queries = registry.examples("colours", limit=32)
            registry.route(queries, task="colours")
        """
        fields = task.fields if isinstance(task, TaskPlan) else dataclasses.asdict(self.task(task))
        return render_split(
            DatasetSpec(fields["dataset"], fields["subset"], split),
            fields["templates"],
            cache_dir=self.settings.cache_path,
            limit=limit,
            seed=seed,
        )

    def _evaluator(self, backbone: str, reporter: Reporter = SILENT):
        from elmreg.inference.evaluation import Evaluator

        return Evaluator(
            self.context, backbone, pool=self._pool(backbone), engine=self.engine(backbone), reporter=reporter
        )

    def benchmark(
        self,
        *,
        since: dt.datetime | None = None,
        limit: int = 50,
        out_dir: str | Path | None = None,
        reporter: Reporter = SILENT,
    ):
        """Evaluate experts added since the last run (or ``since``) on every registered task's validation split,
        with RoE / oracle / base per task; stores the matrix and writes a Markdown report with a heatmap.
        Returns ``inference.benchmark.BenchmarkReport``.

        Args:
            reporter: Told of each pass over the examples (one per task and answerer) as a counted step.
        """
        from elmreg.inference.benchmark import run_benchmark

        return run_benchmark(
            self.context,
            since=since,
            limit=limit,
            out_dir=Path(out_dir) if out_dir else None,
            make_evaluator=lambda backbone: self._evaluator(backbone, reporter),
        )

    def report(self, out: str | Path | None = None):
        """Write a self-contained HTML report (library growth, latest benchmark heatmap, routing decisions with
        vote margins, training loss curves) to ``out`` (default: HOME/reports/report.html).
        Returns ``registry.report.Report`` (its ``path`` and the figures it holds)."""
        from elmreg.reports.registry_report import write_report

        return write_report(
            self.context, Path(out) if out else self.settings.home / "reports" / "report.html"
        )

    def instances(
        self, dataset: str, *, split: str = "validation", limit: int | None = None
    ) -> list[PromptedExample]:
        """Instances of a dataset split rendered with the dataset's default template (BIG-bench), as routing
        and prediction take them; for a registered task's own templates use :meth:`examples`.

        Args:
            dataset: ``bigbench:<task>[/<subtask>]`` or another source with a default template.
            split: The split to read.
            limit: A seeded sample of this many rows (order kept).

        Raises:
            UserError: An unknown dataset or split, or a source without a default template.

        Example::

            registry.route(registry.instances("bigbench:strategyqa", limit=32))
        """
        return render_split(
            DatasetSpec(dataset, split=split), None, cache_dir=self.settings.cache_path, limit=limit
        )

    def prune_decisions(self, before: dt.datetime, *, dry_run: bool = True) -> tuple[int, int]:
        """Delete routing decisions made before ``before`` with their votes.

        Args:
            before: An aware datetime; decisions made earlier go.
            dry_run: Only count what would go.

        Returns:
            ``(decisions, votes)`` deleted, or with ``dry_run`` that would be.
        """
        return self.context.library.prune_decisions(before, dry_run=dry_run)

    # -- the schema (these work on an empty or out-of-date catalogue) --------------------------------------
    def schema_revision(self) -> str | None:
        """The catalogue's Alembic revision (None: no elmreg schema yet)."""
        return self.context.schema_revision()

    @staticmethod
    def head_schema_revision() -> str:
        """The newest schema revision this elmreg ships."""
        from elmreg.registry.store import schema

        return schema.head_revision()

    def upgrade_schema(self, revision: str = "head") -> None:
        """Migrate the catalogue up to ``revision`` (creating it on an empty database).

        Raises:
            ServiceError: The database cannot be reached.
            CatalogueError: A migration failed (it is rolled back).
        """
        self.context.upgrade_schema(revision)

    def downgrade_schema(self, revision: str) -> None:
        """Migrate the catalogue down to ``revision``; ``base`` drops every elmreg table and its data.

        Raises:
            ServiceError: The database cannot be reached.
            CatalogueError: An unknown revision, or a migration failed.
        """
        self.context.downgrade_schema(revision)

    def check_pgvector(self, *, update: bool = False) -> str | None:
        """Compare the database's pgvector with what filtered routing needs.

        Args:
            update: First update the extension to the newest version the server has.

        Returns:
            None when pgvector is recent enough (or not installed yet), else one line saying what to do.
        """
        return self.context.check_pgvector(update=update)

    def endpoints(self):
        """Where the catalogue and the bucket are (``registry.services.Endpoints``); starts the embedded
        services if they are down."""
        return self.context.endpoints

    def status(self) -> CatalogueSummary:
        """Schema revision (and the head one), library version, server versions and row counts; describes an
        empty or out-of-date catalogue too (no row counts then)."""
        return self.context.summary()

    def health(self) -> dict[str, Any]:
        """What a server's health check asks: the catalogue answers and the bucket is reachable.

        Returns:
            ``{"library_version": N}``.

        Raises:
            ElmregError: The catalogue or the artifact store does not answer (the error says which).
        """
        library_version = self.context.library.library_version()
        endpoints = self.context.endpoints
        # Reading a key that never exists proves the bucket answers without writing anything.
        self.context.artifacts.exists(f"s3://{endpoints.s3_bucket}/{endpoints.s3_prefix}.healthz")
        return {"library_version": library_version}

    # -- the server's API keys -----------------------------------------------------------------------------
    def create_key(
        self, name: str, *, rate: float | None = None, concurrency: int | None = None
    ) -> tuple[ApiKey, str]:
        """Make an API key for ``elmreg serve``; the catalogue keeps only its digest.

        Args:
            name: Who it is for; the caller label of the routing decisions made for its requests.
            rate: Requests per second a server takes with the key (bursts of up to ``max(1, rate)``); more get
                HTTP 429 with ``Retry-After``. None: no limit.
            concurrency: Requests in flight at once with the key; more get HTTP 429. None: no limit.

        Returns:
            The key's record and the key itself, which nobody can see again after this.

        Raises:
            AlreadyExistsError: A key of that name exists (revoked ones too).
            UserError: A limit out of range.
        """
        if rate is not None and not (MIN_KEY_RATE <= rate <= MAX_KEY_LIMIT):  # also refuses NaN
            raise UserError(
                f"--rate must be between {MIN_KEY_RATE} and {MAX_KEY_LIMIT} requests/s, got {rate}"
            )
        if concurrency is not None and not 1 <= concurrency <= MAX_KEY_LIMIT:
            raise UserError(f"--concurrency must be between 1 and {MAX_KEY_LIMIT}, got {concurrency}")
        key = new_key()
        record = self.context.keys.add_key(
            name, key_digest(key), key[:SHOWN_CHARACTERS], rate=rate, concurrency=concurrency
        )
        return record, key

    def api_keys(self) -> list[ApiKey]:
        """Every API key, revoked ones too, oldest first."""
        return self.context.keys.list_keys()

    def revoke_key(self, name: str) -> ApiKey:
        """Revoke ``name``'s key: servers refuse it within their key cache's lifetime (seconds).

        Raises:
            NotFoundError: No key of that name.
        """
        return self.context.keys.revoke_key(name)

    # -- the scheduler -------------------------------------------------------------------------------------
    def scheduler(self, config=None):
        """A scheduler over this registry (``registry.scheduler.Scheduler``: ``.run(stop=event)``,
        ``.shutdown()``): it queues training, nightly ingestion and nightly benchmarks; one is active at a time.

        Args:
            config: ``registry.scheduler.ScheduleConfig`` (default: every minute, ingest 01:00, benchmark 03:00).
        """
        from elmreg.jobs.scheduler import Scheduler

        return Scheduler(self.context, config)

    # -- what a server needs of the catalogue ----------------------------------------------------------------
    def find_key(self, key_sha256: str):
        """The API key with this sha256 digest (None: no such key). ``serve.auth.KeyChecker`` checks callers
        with it; the key itself is never stored."""
        return self.context.keys.find_key(key_sha256)

    def reserve_decision_ids(self, count: int) -> list[int]:
        """``count`` routing-decision ids taken from the table's sequence before the rows exist: a server
        answers with a decision's id and writes the decision in a batch after."""
        return self.context.library.reserve_decision_ids(count)

    def record_decisions(self, decisions) -> None:
        """Write routing decisions (``PendingDecision`` s with reserved ids) and their votes in one transaction."""
        self.context.library.record_decisions(decisions)

    def replay_decisions(self, paths=None, *, dry_run: bool = False):
        """Write the routing decisions a server spilled when the catalogue was away (``HOME/serve``'s spill
        files, or ``paths``) under their reserved ids: a file replayed twice adds nothing. A file whose lines all
        parse (and whose decisions the catalogue takes) is removed after; one with a bad line is kept, nothing of
        it written, and its ``problems`` say ``FILE:LINE: what``.

        Returns:
            One ``registry.audit_spill.SpillReplay`` per file, oldest first.

        Raises:
            UserError: A named file does not exist.
        """
        from elmreg.registry.audit_spill import replay_spills, spill_files

        chosen = [Path(p) for p in paths] if paths else spill_files(self.settings.home / "serve")
        return replay_spills(self.context.library, chosen, dry_run=dry_run)

    def backbone(self, key: int | str):
        """A catalogued backbone (``registry.store.entities.Backbone``) by id or name. Raises NotFoundError."""
        return self.context.catalogue.get_backbone(key)

    # -- catalogue -----------------------------------------------------------------------------------------

    def tasks(self) -> list[Task]:
        """Every registered task, oldest first."""
        return self.context.catalogue.list_tasks()

    def task(self, key: int | str) -> Task:
        """A task by id or name. Raises NotFoundError."""
        return self.context.catalogue.get_task(key)

    def experts(self, *, status: str | None = None, task: int | str | None = None) -> list[Expert]:
        """Experts, oldest first, optionally only those of one status or task."""
        task_id = self.task(task).id if task is not None else None
        return self.context.catalogue.list_experts(status=status, task_id=task_id)

    def expert(self, key: int | str) -> Expert:
        """An expert by id, name or ``task@alias``. Raises NotFoundError."""
        return self.context.catalogue.get_expert(key)

    def search_experts(
        self, filter: str | None = None, *, order_by: str | None = None, limit: int | None = None
    ) -> list[Expert]:
        """Experts matching a filter of the grammar in ``registry.search``, compiled into parameterised SQL.

        Args:
            filter: e.g. ``"task = 'strategyqa' and tags.owner = 'nlp' and metrics.accuracy > 0.6"``.
            order_by: ``FIELD [asc|desc]`` (id, name, library_version, created_at, ready_at, retired_at,
                metrics.KEY); ties by id.
            limit: At most this many experts.

        Raises:
            FilterError: The filter or order is outside the grammar (the message names the token).

        Example::

            registry.search_experts("status = 'ready' and alias = 'prod'", order_by="created_at desc", limit=10)
        """
        return self.context.catalogue.search_experts(expert_query(filter, order_by=order_by, limit=limit))

    def retire(self, key: int | str, *, force: bool = False, by: str | None = None) -> Expert:
        """Take an expert out of routing; it stays in the catalogue and S3 with its audit history.

        Raises:
            InvalidStateError: An alias names the expert (unless ``force``, which removes the alias first,
                kept as a move by ``by``), or it is not ready.
        """
        return self.context.catalogue.retire_expert(
            self.expert(key).id, force=force, moved_by=by or _current_user()
        )

    # -- aliases, tags and descriptions --------------------------------------------------------------------
    def set_alias(
        self, task: int | str, alias: str, expert: int | str, *, by: str | None = None
    ) -> AliasMove | None:
        """Point ``task@alias`` at an expert of that task (creating or moving the alias atomically); the move
        is kept with ``by`` (default: the OS user). Returns None when the alias already named that expert.

        Raises:
            NotFoundError: Unknown task or expert.
            InvalidStateError: The expert belongs to another task, or is not ready.

        Example::

            registry.set_alias("strategyqa", "prod", "strategyqa-v2")
            registry.expert("strategyqa@prod")
        """
        return self.context.catalogue.set_alias(
            self.task(task).id, alias, self.expert(expert).id, moved_by=by or _current_user()
        )

    def unset_alias(self, task: int | str, alias: str, *, by: str | None = None) -> AliasMove:
        """Remove ``task@alias`` (the removal is kept as a move). Raises NotFoundError for an unknown alias."""
        return self.context.catalogue.remove_alias(self.task(task).id, alias, moved_by=by or _current_user())

    def aliases(self, task: int | str | None = None) -> list[ExpertAlias]:
        """Aliases of one task, or of all, by task and alias."""
        return self.context.catalogue.list_aliases(self.task(task).id if task is not None else None)

    def alias_history(self, task: int | str | None = None, alias: str | None = None) -> list[AliasMove]:
        """Every move of the aliases (of a task, or one of its aliases), oldest first: who, when, from, to."""
        return self.context.catalogue.alias_moves(self.task(task).id if task is not None else None, alias)

    def tag_task(
        self,
        task: int | str,
        tags: dict[str, str] | None = None,
        *,
        remove: Sequence[str] = (),
        description: str | None = None,
    ) -> Task:
        """Set (and ``remove``) tags of a task, and its Markdown description when given ('' clears it)."""
        return self.context.catalogue.tag_task(
            self.task(task).id, tags=tags, remove=remove, description=description
        )

    def tag_expert(
        self,
        expert: int | str,
        tags: dict[str, str] | None = None,
        *,
        remove: Sequence[str] = (),
        description: str | None = None,
    ) -> Expert:
        """:meth:`tag_task` for an expert (by id, name or ``task@alias``)."""
        return self.context.catalogue.tag_expert(
            self.expert(expert).id, tags=tags, remove=remove, description=description
        )

    def training_runs(self, task: int | str | None = None) -> list[TrainingRun]:
        """Training runs, oldest first."""
        return self.context.jobs.list_training_runs(task_id=self.task(task).id if task is not None else None)

    def jobs(self, *, status: str | None = None) -> list[Job]:
        """Queued, running and finished jobs, oldest first."""
        return self.context.jobs.list_jobs(status=status)

    def gc(self, *, delete: bool = False, min_age: dt.timedelta = DEFAULT_MIN_AGE) -> GcReport:
        """Report (and with ``delete``, remove) bucket objects that no expert references."""
        return collect_garbage(
            self.context.catalogue, self.context.artifacts, self.context.jobs, delete=delete, min_age=min_age
        )

    # -- backup and restore --------------------------------------------------------------------------------
    def backup(self, folder: str | Path):
        """Write a consistent snapshot of the catalogue and every object it references into ``folder`` (which
        must not exist or be empty). Returns ``registry.backup.BackupReport``."""
        from elmreg.runtime.backup import backup

        return backup(self.context, Path(folder))

    def restore(self, folder: str | Path):
        """Restore a backup into this registry's catalogue and bucket prefix, which must be empty; every file
        is verified before anything is written. Returns ``registry.backup.BackupReport``."""
        from elmreg.runtime.backup import restore

        return restore(self.context, Path(folder))


def _card_tags(folder: Path) -> tuple[dict[str, str], str | None]:
    """The tags and description of an exported expert's card in ``folder`` (none without a card)."""
    card_path = folder / "elmreg_expert.json"
    if not card_path.is_file():
        return {}, None
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{card_path}: not valid JSON ({exc})") from None
    tags = card.get("tags") or {}
    if not isinstance(tags, dict):
        raise UserError(f"{card_path}: tags must be an object of KEY: VALUE")
    description = card.get("description")
    if description is not None and not isinstance(description, str):
        raise UserError(f"{card_path}: description must be text")
    merged_tags({}, tags)
    if description is not None:
        check_description(description)
    return tags, description


def _current_user() -> str:
    """Who moves an alias when the caller does not say: the OS user (containers may have no name for it)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _check_evaluation_counts(limit: int | None, q: int) -> None:
    if limit is not None and limit < 1:
        # Zero examples would store a score of nothing in the evaluations table.
        raise UserError(f"limit must be at least 1, got {limit}")
    if q < 1:
        raise UserError(f"q must be at least 1, got {q}")
