"""The Python API: ``from elmreg import Registry``. The CLI is a thin layer over these verbs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Any

from elmreg.registry.context import RegistryContext
from elmreg.registry.errors import CatalogueError, NotFoundError, UserError
from elmreg.registry.examples import render_split
from elmreg.registry.gc import DEFAULT_MIN_AGE, GcReport, collect_garbage
from elmreg.registry.library import ReembedReport, reembed_library
from elmreg.registry.settings import Settings, load_settings
from elmreg.registry.sources import DatasetSpec
from elmreg.registry.store.entities import CatalogueSummary, Expert, Job, Task, TrainingRun
from elmreg.registry.tasks import IngestReport, TaskPlan, TaskRequest, add_task, ingest_manifests, plan_task


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

    @property
    def settings(self) -> Settings:
        return self.context.settings

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- growing the library -------------------------------------------------------------------------------
    def add_task(self, dataset: str, *, now: bool = False, hooks=None, **options: Any) -> Task:
        """Register a task (validated first; nothing is written if it is invalid) and queue its training.

        Args:
            dataset: ``bigbench:<task>``, a local json/jsonl/csv/parquet file or folder, or a hub id.
            now: Train the expert in this process before returning (otherwise a worker does it).
            hooks: ``trainers.pipeline.TrainingHooks`` for progress reporting when ``now``.
            **options: The other fields of ``registry.tasks.TaskRequest`` (prompt, kind, max_examples, ...).

        Example::

            registry.add_task("bigbench:strategyqa", max_examples=64, training={"epochs": 1})
        """
        task, job = add_task(self.context, TaskRequest(dataset=dataset, **options))
        if now and job is not None:
            done = self.worker(hooks=hooks).run_once(job_id=job.id)
            if done is None or done.status != "succeeded":
                raise CatalogueError(
                    f"training task {task.name} failed: {done.last_error if done else 'not runnable'}"
                )
        return task

    def worker(self, *, hooks=None, name: str | None = None, lease_seconds: float | None = None):
        """A worker that runs queued ``train`` jobs (``.run_once()``, ``.drain()``, ``.run_forever()``)."""
        from elmreg.jobs import DEFAULT_LEASE_SECONDS, Worker

        return Worker(
            self.context, hooks=hooks, name=name, lease_seconds=lease_seconds or DEFAULT_LEASE_SECONDS
        )

    def train(self, *, hooks=None) -> list[Job]:
        """Run every queued training job in this process; returns the jobs as they ended."""
        return self.worker(hooks=hooks).drain()

    def ingest(self, folder: str | Path | None = None) -> IngestReport:
        """Register the tasks of the manifest folder (``ELMREG_MANIFEST_DIR``) that are not registered yet."""
        return ingest_manifests(self.context, Path(folder) if folder else None)

    def reembed(self, embedder: str, *, source: str | None = None) -> ReembedReport:
        """Build library entries for another sentence encoder from the texts of ``source`` (default: the
        configured embedder), so that retrievers can be compared. ``embedder`` is a hub id, a local folder or a
        trained retriever of the catalogue (fetched from the artifact store)."""
        from elmreg.registry.retrievers import load_catalogued_embedder

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
        hooks=None,
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
            hooks: ``trainers.pipeline.TrainingHooks`` for progress reporting.

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
            hooks=hooks,
        )

    def export_expert(self, key: int | str, out_dir: str | Path) -> Path:
        """Write an expert to a folder: PEFT format for LoRA, safetensors otherwise, plus a JSON card."""
        from elmreg.trainers.pipeline import export_expert

        return export_expert(self.context, self.expert(key), Path(out_dir))

    def import_expert(
        self, folder: str | Path, *, task: int | str, name: str | None = None, hooks=None
    ) -> Expert:
        """Register an existing PEFT LoRA adapter folder as an expert of a registered task."""
        from elmreg.trainers.pipeline import import_peft_adapter

        return import_peft_adapter(self.context, Path(folder), self.task(task), name=name, hooks=hooks)

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
        stage=None,
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
            stage: Called with a line per step (the CLI prints them).

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
            stage=stage,
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

    def route_each(
        self, instances, *, task: int | str | None = None, router: str = "per-instance", **options: Any
    ):
        """Route every instance on its own (Q=1): one recorded decision per instance, in input order.

        Args:
            router: ``per-instance`` (its ``base`` option picks the router applied to each instance) or any
                other router.
            **options: ``router_options``, ``kinds``, ``backbone_id``, ``library_version``, ``caller_label``.
        """
        task_id = self.task(task).id if task is not None else None
        return self.router().route_each(instances, task_id=task_id, router=router, **options)

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
        """Answer instances with one expert: given (``expert``), chosen by a router (``route="roe"``, or any
        name of ``routers()``), or none (base). ``route="per-instance"`` answers each instance with the expert
        routed for it alone.

        With ``compose=K``, RoE's K most voted experts are merged (once; later calls reuse the merged expert)
        and the merged expert answers: for instructions that combine several tasks' skills. The decision records
        the composition in ``routing_decisions.details["compose"]``.

        Classification instances (with answer choices) are rank-classified; the others get greedy generations.

        Returns:
            One dict per instance: ``input``, ``prediction``, ``expert`` and (for RoE) ``decision_id``.
        """
        from elmreg.inference.scoring import answer

        if expert is not None and route is not None:
            raise UserError("give either an expert or a route, not both")
        chosen, decision_id = None, None
        if compose is not None:
            from elmreg.merging.compose import compose as compose_experts

            if expert is not None or route not in (None, "roe"):
                raise UserError("compose chooses its experts by RoE: give no expert and no other route")
            decision = self.route(
                instances, task=task, q=min(q, len(instances)), caller_label="predict:compose"
            )
            chosen, decision_id = (
                compose_experts(self.context, decision, compose).expert,
                decision.decision_id,
            )
        elif route is not None:
            from elmreg.inference.routers import make_router

            method = make_router(route, router_options)
            if method.in_model:
                decision = self.route(
                    instances, task=task, q=min(q, len(instances)), router=method, caller_label="predict"
                )
                return self.predict_mixture(instances, decision)
            if method.per_instance:
                decisions = self.route_each(instances, task=task, router=method, caller_label="predict")
                rows = self.predict_each(
                    instances, [d.chosen_expert_id for d in decisions], capacity=capacity
                )
                return [r | {"decision_id": d.decision_id} for r, d in zip(rows, decisions, strict=True)]
            decision = self.route(
                instances, task=task, q=min(q, len(instances)), router=method, caller_label="predict"
            )
            chosen, decision_id = self.expert(decision.chosen_expert_id), decision.decision_id
        elif expert is not None:
            chosen = self.expert(expert)
        backbone = (
            self.context.catalogue.get_backbone(chosen.backbone_id).name
            if chosen
            else (
                self.context.catalogue.get_backbone(self.task(task).backbone_id).name
                if task
                else self.settings.backbone
            )
        )
        pool = self._pool(backbone, capacity)
        with pool.use(chosen) as model:
            predictions = answer(model, pool.backbone, instances)
        return [
            {
                "input": i.input,
                "prediction": p,
                "expert": chosen.name if chosen else None,
                "decision_id": decision_id,
            }
            for i, p in zip(instances, predictions, strict=True)
        ]

    def predict_mixture(self, instances, decision) -> list[dict[str, Any]]:
        """Answer instances as an in-model router's ``decision`` (e.g. ``route(..., router="arrow")``) routed them:
        with its mixture of experts, token by token. ``expert`` in each row is the expert with the most routing
        mass (the decision's choice); ``mixture`` names them all."""
        from elmreg.inference.arrow import answer_mixture

        expert = self.expert(decision.chosen_expert_id)
        pool = self._pool(self.context.catalogue.get_backbone(expert.backbone_id).name)
        predictions = answer_mixture(pool, self.context.catalogue, decision, instances)
        mixture = [t.expert_name for t in decision.tallies]
        return [
            {
                "input": i.input,
                "prediction": p,
                "expert": expert.name,
                "mixture": mixture,
                "decision_id": decision.decision_id,
            }
            for i, p in zip(instances, predictions, strict=True)
        ]

    def predict_each(
        self, instances, experts, *, capacity: int = 4, task_type: str | None = None
    ) -> list[dict[str, Any]]:
        """Answer each instance with its own expert (id, name or None for the base backbone), all experts of one
        backbone. LoRA experts share batches (PEFT mixed-adapter batches for generation), on one loaded backbone.

        Returns:
            One dict per instance, in input order: ``input``, ``prediction``, ``expert``.

        Raises:
            UserError: Counts differ, or the experts are on different backbones.
        """
        from elmreg.inference.mixed import answer_each

        if len(instances) != len(experts):
            raise UserError(
                f"{len(instances)} instances but {len(experts)} experts; give one expert per instance"
            )
        records = [self.expert(e) if e is not None else None for e in experts]
        backbone_ids = {r.backbone_id for r in records if r is not None}
        if len(backbone_ids) > 1:
            raise UserError("the experts of one call must share a backbone; split the instances by backbone")
        backbone = (
            self.context.catalogue.get_backbone(backbone_ids.pop()).name
            if backbone_ids
            else self.settings.backbone
        )
        pool = self._pool(backbone, capacity)
        predictions = answer_each(pool, instances, records, task_type=task_type)
        return [
            {"input": i.input, "prediction": p, "expert": r.name if r else None}
            for i, p, r in zip(instances, predictions, records, strict=True)
        ]

    def _pool(self, backbone: str, capacity: int = 4):
        from elmreg.inference.pool import AdapterPool

        if backbone not in self._pools:
            self._pools[backbone] = AdapterPool(self.context, backbone, capacity=capacity)
        return self._pools[backbone]

    def evaluate(
        self,
        task: int | str,
        route: str = "roe",
        *,
        split: str = "validation",
        limit: int | None = None,
        q: int = 32,
        progress=None,
        router_options: dict[str, Any] | None = None,
    ):
        """Evaluate a route (``oracle``, ``base``, ``expert:<id>`` or a router: ``roe``, ``roe-knn``, ...) on a
        task's labelled split and store the result in ``evaluations``. Returns
        ``inference.evaluation.EvaluationResult``.

        Args:
            progress: ``progress(description, done, total)`` while examples are answered.
            router_options: Options of the router named by ``route`` (e.g. ``{"top_k": 8}``).
        """
        if limit is not None and limit < 1:
            # Zero examples would store a score of nothing in the evaluations table.
            raise UserError(f"limit must be at least 1, got {limit}")
        if q < 1:
            raise UserError(f"q must be at least 1, got {q}")
        record = self.task(task)
        backbone = self.context.catalogue.get_backbone(record.backbone_id).name
        return self._evaluator(backbone, progress).evaluate(
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
        progress=None,
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
        return self._evaluator(backbone.name, progress).evaluate_data(
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
        from elmreg.registry.audit import audit_view

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

    def _evaluator(self, backbone: str, progress=None):
        from elmreg.inference.evaluation import Evaluator

        return Evaluator(self.context, backbone, pool=self._pool(backbone), progress=progress)

    def benchmark(
        self,
        *,
        since: dt.datetime | None = None,
        limit: int = 50,
        out_dir: str | Path | None = None,
        progress=None,
    ):
        """Evaluate experts added since the last run (or ``since``) on every registered task's validation split,
        with RoE / oracle / base per task; stores the matrix and writes a Markdown report with a heatmap.
        Returns ``inference.benchmark.BenchmarkReport``.

        Args:
            progress: ``progress(description, done, total)`` while examples are answered.
        """
        from elmreg.inference.benchmark import run_benchmark

        return run_benchmark(
            self.context,
            since=since,
            limit=limit,
            out_dir=Path(out_dir) if out_dir else None,
            make_evaluator=lambda backbone: self._evaluator(backbone, progress),
        )

    def report(self, out: str | Path | None = None):
        """Write a self-contained HTML report (library growth, latest benchmark heatmap, routing decisions with
        vote margins, training loss curves) to ``out`` (default: HOME/reports/report.html).
        Returns ``registry.report.Report`` (its ``path`` and the figures it holds)."""
        from elmreg.registry.report import write_report

        return write_report(
            self.context, Path(out) if out else self.settings.home / "reports" / "report.html"
        )

    # -- catalogue -----------------------------------------------------------------------------------------
    def status(self) -> CatalogueSummary:
        """Schema revision, library version and row counts."""
        return self.context.audit.summary()

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
        """An expert by id or name. Raises NotFoundError."""
        return self.context.catalogue.get_expert(key)

    def retire(self, key: int | str) -> Expert:
        """Take an expert out of routing; it stays in the catalogue and S3 with its audit history."""
        return self.context.catalogue.retire_expert(self.expert(key).id)

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
        from elmreg.registry.backup import backup

        return backup(self.context, Path(folder))

    def restore(self, folder: str | Path):
        """Restore a backup into this registry's catalogue and bucket prefix, which must be empty; every file
        is verified before anything is written. Returns ``registry.backup.BackupReport``."""
        from elmreg.registry.backup import restore

        return restore(self.context, Path(folder))
