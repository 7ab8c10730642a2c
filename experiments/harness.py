"""The experiment harness: the seed paper's four claims, and its retriever ablation, on a registry.

Everything goes through ``elmreg.Registry``: tasks are registered and trained with ``add_task``/``train``, the
multitask (MT) baseline is an ordinary task over the union of the seen tasks' training examples (written as a
local JSON-lines dataset) whose expert is retired at once, so it never takes part in routing but stays usable
as ``expert=ID``; its continual fine-tuning starts each stage from the previous stage's weights
(``training.init_from``). Predictions are made once per (task, expert) and scored with the task's metric.

Sections (each a table in the report):

1. ``routing``: per seen task, RoE on Q validation instances; does it pick an expert of the same dataset, and of
   the same prompt (the paper's 280/296 and 185/296)?
2. ``multitask``: per seen task, the base backbone, the MT adapter, RoE and the oracle (best seen expert).
3. ``continual``: M new tasks join the library. The library's predictions on the old tasks, routed with the
   library version pinned to before, must be exactly the same (the check); unpinned routing is reported too.
   The MT adapter is fine-tuned on the new tasks in sequence, with and without rehearsal of old data.
4. ``unseen``: held-out tasks (never registered): base, MT, the best single seen expert (chosen by its mean
   score on the seen tasks), RoE and the oracle.
5. ``ablation``: routing accuracy of exact in-process retrieval for the paper's text formats x embedders.
6. ``routers`` (opt-in): every configured router (``inference.routers``) on the unseen tasks, against the oracle
   over the same routable experts: mean score with its standard error, the share of RoE's gap to the oracle it
   closes, its seen-task routing accuracy and latency.

Reruns are cheap: tasks already registered with the same specification, and their experts, are reused, and so
are the predictions of earlier runs (``prediction_cache``; ``fresh=True`` recomputes them).
"""

from __future__ import annotations

import json
import platform
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elmreg.api import Registry
from elmreg.data.prompts import PromptedExample, library_text
from elmreg.experiments.config import ExperimentConfig, RouterSpec, TaskSpec
from elmreg.experiments.continual import PredictionCheck, compare_predictions
from elmreg.experiments.prediction_cache import (
    PredictionCache,
    answering,
    mixture_answering,
    prediction_key,
)
from elmreg.inference.evaluation import metric_score
from elmreg.inference.router import exact_vote, sample_queries
from elmreg.registry.entities import Expert
from elmreg.registry.errors import CatalogueError, NotFoundError, UserError
from elmreg.registry.outputs import check_writable_folder
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.library_embedding import SAMPLES_PER_EXPERT, sample_indices

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ExperimentResult:
    """What a run produced: provenance, one dict per section, the continual check, timings."""

    provenance: dict[str, Any]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    check: PredictionCheck | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """False only when the continual-learning check ran and found a changed old prediction."""
        return self.check is None or self.check.identical

    def to_dict(self) -> dict[str, Any]:
        return {
            "provenance": self.provenance,
            "sections": self.sections,
            "checks": {
                "continual_identical": None if self.check is None else self.check.identical,
                "continual_detail": None if self.check is None else self.check.summary(),
            },
            "seconds": self.seconds,
        }


@dataclass
class _Eval:
    """A task as the harness evaluates it: its name, metric and evaluation instances."""

    name: str
    metric: str
    dataset: tuple[str, str | None]
    templates: list[dict[str, Any]]
    instances: list[PromptedExample]
    registered: bool
    limit: int | None


def git_commit(root: Path = REPO_ROOT) -> str:
    """The elmreg checkout's commit, with ``+dirty`` when it has uncommitted changes ("unknown" outside git)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit[:12] + ("+dirty" if dirty else "")


class Harness:
    """Runs one experiment configuration against a registry (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        config: ExperimentConfig,
        *,
        reporter: Reporter = SILENT,
        fresh: bool = False,
    ):
        self.registry = registry
        self.config = config
        self.reporter = reporter
        # Predictions of earlier runs, unless asked to recompute them (see prediction_cache).
        self.cache = PredictionCache(registry.settings.cache_path / "experiments" / "predictions")
        self.use_cache = not fresh
        self._predictions: dict[tuple[str, int | None, int | None], list[str]] = {}
        self._evals: dict[tuple[str, int | None], _Eval] = {}
        self.experts: dict[str, Expert] = {}  # seen and new task name -> its expert
        self.mt: Expert | None = None
        # The MT adapter trained for only as many optimiser steps as one expert (claim 2 at equal steps).
        self.mt_equal_steps: Expert | None = None
        self.library_version: int | None = None  # the seen library, before the new tasks joined
        self.fresh_continual = False

    # -- tasks and experts -----------------------------------------------------------------------------------
    def _ensure_tasks(self, specs: list[TaskSpec]) -> dict[str, Expert]:
        """Register what is missing, train what is queued, and return each task's ready (or retired) expert."""
        for spec in specs:
            try:
                task = self.registry.task(spec.name)
            except NotFoundError:
                self.registry.add_task(spec.dataset, name=spec.name, **spec.options)
                self.reporter.stage(f"    {spec.name}: registered")
                continue
            _check_same_spec(task, spec)
        if any(not self._expert_of(s.name) for s in specs):
            started = time.perf_counter()
            jobs = self.registry.train(reporter=self.reporter)
            self.reporter.stage(f"    trained {len(jobs)} expert(s) in {time.perf_counter() - started:.0f} s")
        experts = {}
        for spec in specs:
            expert = self._expert_of(spec.name)
            if expert is None:
                raise CatalogueError(
                    f"task {spec.name} has no trained expert; see 'elmreg jobs' for the error"
                )
            experts[spec.name] = expert
        return experts

    def _expert_of(self, task: str) -> Expert | None:
        try:
            experts = self.registry.experts(task=task)
        except NotFoundError:  # not registered (yet)
            return None
        usable = [e for e in experts if e.status in ("ready", "retired")]
        return usable[0] if usable else None

    def _derived_task(self, name: str, rows: list[dict[str, Any]], *, training: dict[str, Any]) -> Expert:
        """A task trained on ``rows`` (already prompted examples) whose expert is retired at once: baselines
        that must never be routed to."""
        try:
            self.registry.task(name)
        except NotFoundError:
            folder = self.registry.settings.home / "experiments" / "data"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name.replace('/', '_')}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            classification = all(r.get("choices") for r in rows)
            self.registry.add_task(
                str(path),
                name=name,
                prompt="{{input}} ||| {{target}}",
                answer_choices="{{choices}}" if classification else None,
                task_type="classification" if classification else "generative",
                kind=self.config.shared.get("kind", "lora"),
                backbone=self.config.backbone,
                max_examples=len(rows),
                training=training,
            )
            self.reporter.stage(f"    {name}: registered ({len(rows)} examples)")
        found = self._expert_of(name)
        if found is None:
            self.registry.train(reporter=self.reporter)
            found = self._expert_of(name)
        if found is None:
            raise CatalogueError(f"baseline {name} could not be trained; see 'elmreg jobs'")
        if found.status == "ready":
            found = self.registry.retire(found.id)
        return found

    def _training_rows(self, task: str) -> list[dict[str, Any]]:
        """The task's training examples exactly as its expert saw them, as MT dataset rows."""
        record = self.registry.task(task)
        examples = self.registry.examples(
            task,
            split=record.split,
            limit=record.max_examples,
            seed=int(record.training_config.get("seed", 0)),
        )
        return [
            {
                "input": e.input,
                "target": e.target,
                "choices": "|||".join(e.answer_choices) if e.answer_choices else "",
                "source": task,
            }
            for e in examples
        ]

    def _expert_steps(self) -> int:
        """The optimiser steps one seen expert took (the most of any, if K differs between tasks)."""
        steps = [int(e.metrics["steps"]) for e in self.experts.values() if "steps" in e.metrics]
        if steps:
            return max(steps)
        # Experts without recorded steps: the schedule says it (ceil(K / batch size) x epochs).
        training = self._mt_training()
        largest = max(len(self._training_rows(spec.name)) for spec in self.config.seen)
        return -(-largest // int(training.get("batch_size", 8))) * int(training.get("epochs", 5))

    def _mt_training(self) -> dict[str, Any]:
        # The MT adapter is of the same kind and size as an expert: the seen tasks' shared training options.
        return dict(self.config.shared.get("training", {}))

    # -- predictions ---------------------------------------------------------------------------------------
    def _eval(self, spec: TaskSpec, registered: bool, limit: int | None = -1) -> _Eval:
        limit = self.config.eval_limit if limit == -1 else limit
        if (spec.name, limit) in self._evals:
            return self._evals[(spec.name, limit)]
        seed = self.config.seed
        if registered:
            task = self.registry.task(spec.name)
            fields = {"metric": task.metric, "dataset": task.dataset, "subset": task.subset}
            templates = task.templates
            instances = self.registry.examples(spec.name, split=spec.eval_split, limit=limit, seed=seed)
        else:
            plan = self.registry.plan_task(spec.dataset, name=spec.name, **spec.options)
            fields, templates = plan.fields, plan.fields["templates"]
            instances = self.registry.examples(plan, split=spec.eval_split, limit=limit, seed=seed)
        if not instances:
            raise UserError(f"task {spec.name} has no validation examples to evaluate")
        self._evals[(spec.name, limit)] = _Eval(
            spec.name,
            fields["metric"],
            (fields["dataset"], fields["subset"]),
            templates,
            instances,
            registered,
            limit,
        )
        return self._evals[(spec.name, limit)]

    def predictions(self, task: _Eval, expert: Expert | None, *, fresh: bool = False) -> list[str]:
        """The predictions of ``expert`` (None: the base backbone) on the task's evaluation instances."""
        key = (task.name, task.limit, expert.id if expert else None)
        if not fresh and key not in self._predictions and self.use_cache:
            stored = self.cache.get(self._disk_key(task, expert), len(task.instances))
            if stored is not None:
                self._predictions[key] = stored
        if fresh or key not in self._predictions:
            started = time.perf_counter()
            answered = self.registry.predict(
                task.instances,
                expert=expert.id if expert else None,
                task=None if expert else self.config.seen[0].name,  # the base backbone of the experiment
            )
            self._predictions[key] = [a["prediction"] for a in answered]
            self.cache.put(self._disk_key(task, expert), self._predictions[key])
            self.reporter.stage(
                f"    {task.name} x {expert.name if expert else 'base'}: "
                f"{len(task.instances)} answered in {time.perf_counter() - started:.1f} s"
            )
        return self._predictions[key]

    def _disk_key(self, task: _Eval, expert: Expert | None) -> str:
        return prediction_key(answering(expert, self.config.seen[0].name), task.instances)

    def score(self, task: _Eval, expert: Expert | None) -> float:
        predictions = self.predictions(task, expert)
        return round(metric_score(task.metric, predictions, [e.target for e in task.instances]), 2)

    def route(self, task: _Eval, *, library_version: int | None, label: str):
        return self.registry.route(
            task.instances,
            task=task.name if task.registered else None,
            q=min(self.config.q, len(task.instances)),
            library_version=library_version,
            # Only experts of the experiment's kind: merged experts (kind 'merged') answer compositions, not
            # tasks, and would blur "same dataset" (they have no task of their own).
            kinds=[self.config.shared.get("kind", "lora")],
            caller_label=f"experiment:{self.config.name}:{label}",
        )

    def _same(self, task: _Eval, expert: Expert) -> tuple[bool, bool]:
        """(same dataset, same prompt) of the expert's task and ``task``."""
        if expert.task_id is None:
            return False, False
        other = self.registry.task(expert.task_id)
        same_dataset = (other.dataset, other.subset) == task.dataset
        same_prompt = same_dataset and [t.get("jinja") for t in other.templates] == [
            t.get("jinja") for t in task.templates
        ]
        return same_dataset, same_prompt

    # -- the run -------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Train (or reuse) the seen experts and the MT adapter; fix the library version of the seen library."""
        config = self.config
        self.reporter.stage(f"Seen tasks ({len(config.seen)}): experts")
        self.experts.update(self._ensure_tasks(list(config.seen)))
        if {"multitask", "continual", "unseen"} & set(config.sections):
            rows = [row for spec in config.seen for row in self._training_rows(spec.name)]
            self.reporter.stage(f"Multitask baseline: one adapter on the union of {len(rows)} examples")
            self.mt = self._derived_task(
                f"{config.name}.mt-{config.fingerprint()}", rows, training=self._mt_training()
            )
        if "multitask" in config.sections:
            rows = [row for spec in config.seen for row in self._training_rows(spec.name)]
            steps = self._expert_steps()
            self.reporter.stage(
                f"Multitask baseline at one expert's budget: {steps} optimiser steps on the same union"
            )
            self.mt_equal_steps = self._derived_task(
                f"{config.name}.mt-steps{steps}-{config.fingerprint()}",
                rows,
                training={**self._mt_training(), "max_steps": steps},
            )
        # Routing before the new tasks joined: the earliest library version at which they were all absent.
        new_versions = [
            e.library_version
            for spec in config.new
            if (e := self._expert_of(spec.name)) is not None and e.library_version is not None
        ]
        current = self.registry.status().library_version
        self.library_version = min(new_versions) - 1 if new_versions else current
        self.fresh_continual = not new_versions

    def run_routing(self) -> dict[str, Any]:
        rows = []
        for spec in self.config.seen:
            task = self._eval(spec, registered=True)
            decision = self.route(task, library_version=self.library_version, label="routing")
            chosen = self.registry.expert(decision.chosen_expert_id)
            same_dataset, same_prompt = self._same(task, chosen)
            rows.append(
                {
                    "task": spec.name,
                    "q": decision.q,
                    "chosen": chosen.name,
                    "votes": decision.tallies[0].votes,
                    "margin": decision.margin,
                    "same_dataset": same_dataset,
                    "same_prompt": same_prompt,
                    "decision_id": decision.decision_id,
                }
            )
        n = len(rows)
        return {
            "rows": rows,
            "same_dataset": sum(r["same_dataset"] for r in rows),
            "same_prompt": sum(r["same_prompt"] for r in rows),
            "tasks": n,
            "library_version": self.library_version,
            "paper": {"same_dataset": "280/296", "same_prompt": "185/296"},
        }

    def _roe_expert(self, task: _Eval, label: str) -> Expert:
        decision = self.route(task, library_version=self.library_version, label=label)
        return self.registry.expert(decision.chosen_expert_id)

    def seen_matrix(self) -> dict[str, dict[str, float]]:
        """Score of every seen expert on every seen task (the oracle, and the best single expert's choice)."""
        matrix: dict[str, dict[str, float]] = {}
        for spec in self.config.seen:
            task = self._eval(spec, registered=True, limit=self.config.matrix_limit)
            matrix[spec.name] = {
                name: self.score(task, self.experts[name]) for name in (s.name for s in self.config.seen)
            }
        return matrix

    def run_multitask(self) -> dict[str, Any]:
        matrix = self.seen_matrix()
        rows = []
        for spec in self.config.seen:
            task = self._eval(spec, registered=True)
            roe = self._roe_expert(task, "multitask")
            # The matrix (on matrix_limit examples) proposes the best expert; the oracle is the best of it, the
            # task's own expert and RoE's choice on the same examples as the other columns (ties: own expert).
            proposed = max(matrix[spec.name], key=lambda n: (matrix[spec.name][n], n == spec.name))
            candidates = {n: self.experts[n] for n in (spec.name, proposed)} | {roe.name: roe}
            scores = {n: self.score(task, e) for n, e in candidates.items()}
            oracle_name = max(scores, key=lambda n: (scores[n], n == spec.name))
            rows.append(
                self._comparison_row(
                    spec.name,
                    task,
                    own_expert=scores[spec.name],
                    roe=self.score(task, roe),
                    roe_expert=roe.name,
                    oracle=scores[oracle_name],
                    oracle_expert=oracle_name,
                    mt_equal_steps=self.score(task, self.mt_equal_steps),
                )
            )
        mt_steps = self.mt.metrics.get("steps") if self.mt else None
        return {
            "rows": rows,
            "mean": _means(rows, ("base", "mt", "own_expert", "roe", "oracle", "mt_equal_steps")),
            "matrix": matrix,
            "steps": {"expert": self._expert_steps(), "mt": mt_steps},
        }

    def _comparison_row(self, name: str, task: _Eval, **columns: Any) -> dict[str, Any]:
        """A row of the multitask and unseen tables: the task, its base and MT scores, then ``columns``."""
        return {
            "task": name,
            "metric": task.metric,
            "n": len(task.instances),
            "base": self.score(task, None),
            "mt": self.score(task, self.mt),
            **columns,
        }

    def run_continual(self) -> tuple[dict[str, Any], PredictionCheck]:
        config = self.config
        old = [self._eval(spec, registered=True) for spec in config.seen]
        # Before: the library's answers with routing pinned to the seen library (cached from section 2 if run).
        before_experts = {t.name: self._roe_expert(t, "continual:before") for t in old}
        before = {t.name: list(self.predictions(t, before_experts[t.name])) for t in old}
        mt_before = {t.name: list(self.predictions(t, self.mt)) for t in old}

        self.reporter.stage(f"Continual learning: {len(config.new)} new task(s) join the library")
        self.experts.update(self._ensure_tasks(list(config.new)))
        variants = self._continual_mt()

        after_experts = {
            t.name: self.registry.expert(
                self.route(
                    t, library_version=self.library_version, label="continual:after-pinned"
                ).chosen_expert_id
            )
            for t in old
        }
        after = {t.name: self.predictions(t, after_experts[t.name], fresh=True) for t in old}
        check = compare_predictions(before, after)
        unpinned_experts = {
            t.name: self.registry.expert(
                self.route(t, library_version=None, label="continual:after-unpinned").chosen_expert_id
            )
            for t in old
        }
        unpinned = {
            t.name: (
                after[t.name]
                if unpinned_experts[t.name].id == after_experts[t.name].id
                else self.predictions(t, unpinned_experts[t.name])
            )
            for t in old
        }
        unpinned_check = compare_predictions(before, unpinned)

        old_rows = []
        for t in old:
            targets = [e.target for e in t.instances]
            row = {
                "task": t.name,
                "n": len(t.instances),
                "library_before": round(metric_score(t.metric, before[t.name], targets), 2),
                "library_after_pinned": round(metric_score(t.metric, after[t.name], targets), 2),
                "changed_pinned": check.changed.get(t.name, 0),
                "library_after_unpinned": round(metric_score(t.metric, unpinned[t.name], targets), 2),
                "changed_unpinned": unpinned_check.changed.get(t.name, 0),
                "unpinned_expert": unpinned_experts[t.name].name,
                "mt_before": round(metric_score(t.metric, mt_before[t.name], targets), 2),
            }
            for label, expert in variants.items():
                predictions = self.predictions(t, expert)
                row[label] = round(metric_score(t.metric, predictions, targets), 2)
                row[f"{label}_changed"] = sum(
                    a != b for a, b in zip(mt_before[t.name], predictions, strict=True)
                )
            old_rows.append(row)
        new_rows = []
        for spec in config.new:
            t = self._eval(spec, registered=True)
            roe = self.registry.expert(
                self.route(t, library_version=None, label="continual:new").chosen_expert_id
            )
            row = {
                "task": spec.name,
                "n": len(t.instances),
                "own_expert": self.score(t, self.experts[spec.name]),
                "roe": self.score(t, roe),
                "roe_expert": roe.name,
                "mt_before": self.score(t, self.mt),
            }
            row.update({label: self.score(t, expert) for label, expert in variants.items()})
            new_rows.append(row)
        columns = ("library_before", "library_after_pinned", "library_after_unpinned", "mt_before", *variants)
        return (
            {
                "old": old_rows,
                "old_mean": _means(old_rows, columns),
                "new": new_rows,
                "new_mean": _means(new_rows, ("own_expert", "roe", "mt_before", *variants)),
                "pinned_library_version": self.library_version,
                "library_version_after": self.registry.status().library_version,
                "check": {
                    "identical": check.identical,
                    "compared": check.compared,
                    "detail": check.summary(),
                },
                "unpinned": {"identical": unpinned_check.identical, "detail": unpinned_check.summary()},
                "variants": {label: expert.name for label, expert in variants.items()},
                "rehearsal": config.rehearsal,
                "trained_in_this_run": self.fresh_continual,
                # Kept so that anyone can re-check the claim from the JSON alone.
                "predictions_before": before,
                "predictions_after_pinned": after,
            },
            check,
        )

    def _continual_mt(self) -> dict[str, Expert]:
        """The MT adapter fine-tuned on the new tasks one after another, without and with rehearsal."""
        config = self.config
        variants: dict[str, Expert] = {}
        plans = [("mt_sequential", 0)] + (
            [("mt_rehearsal", config.rehearsal)] if config.rehearsal > 0 else []
        )
        for label, rehearsal in plans:
            previous = self.mt
            seen_rows = [row for spec in config.seen for row in self._training_rows(spec.name)]
            for stage, spec in enumerate(config.new, start=1):
                rows = self._training_rows(spec.name)
                if rehearsal:
                    # CT0's rehearsal: a seeded sample of the data of every earlier stage, mixed in.
                    rng = random.Random(config.seed + stage)
                    rows = rows + rng.sample(seen_rows, min(rehearsal, len(seen_rows)))
                suffix = "seq" if not rehearsal else f"rehearsal{rehearsal}-"
                name = f"{config.name}.mt-{config.fingerprint()}.{suffix}{stage}"
                self.reporter.stage(
                    f"    {label} stage {stage}: {spec.name} ({len(rows)} examples) from {previous.name}"
                )
                previous = self._derived_task(
                    name, rows, training={**self._mt_training(), "init_from": previous.name}
                )
                seen_rows = seen_rows + self._training_rows(spec.name)
            variants[label] = previous
        return variants

    def best_single_expert(self) -> tuple[str, dict[str, float]]:
        """The seen expert with the best mean score over the seen tasks (chosen without unseen data)."""
        matrix = self.seen_matrix()
        means = {
            name: round(float(np.mean([matrix[t][name] for t in matrix])), 2)
            for name in (s.name for s in self.config.seen)
        }
        return max(means, key=lambda n: (means[n], n)), means

    def run_unseen(self) -> dict[str, Any]:
        best, means = self.best_single_expert()
        rows = []
        for spec in self.config.unseen:
            task = self._eval(spec, registered=False)
            roe = self._roe_expert(task, "unseen")
            scores = {
                name: self.score(task, self.experts[name]) for name in (s.name for s in self.config.seen)
            }
            scores.setdefault(roe.name, self.score(task, roe))
            oracle = max(scores, key=lambda n: scores[n])
            rows.append(
                self._comparison_row(
                    spec.name,
                    task,
                    best_single=scores[best],
                    roe=scores[roe.name],
                    roe_expert=roe.name,
                    oracle=scores[oracle],
                    oracle_expert=oracle,
                )
            )
        return {
            "rows": rows,
            "mean": _means(rows, ("base", "mt", "best_single", "roe", "oracle")),
            "best_single_expert": best,
            "seen_means": means,
        }

    def run_routers(self) -> dict[str, Any]:
        """Every configured router against the seen library: on the unseen tasks the score of the expert(s) it
        picks (mean over tasks with its standard error, the gap to the oracle, and how much of RoE's gap it
        closes), its routing accuracy on the seen tasks (picks the task's own expert), and its latency."""
        unseen = [self._eval(spec, registered=False) for spec in self.config.unseen]
        seen = [self._eval(spec, registered=True) for spec in self.config.seen]
        if not unseen:
            raise UserError("the routers section needs unseen tasks")
        specs = [self._with_retriever(spec) for spec in self.config.routers]
        # The oracle picks among exactly the experts the routers can pick: those routable at the pinned version
        # (in a shared catalogue that can include other experiments' experts, not only this one's seen tasks).
        candidates = self._routable_experts()
        oracle: dict[str, float] = {}
        for task in unseen:
            oracle[task.name] = max(self.score(task, expert) for expert in candidates)
        results, correct = [], {}
        for spec in specs:
            self.reporter.stage(f"    router {spec.label}")
            rows, latencies, correct[spec.label] = [], [], []
            for task in unseen:
                score, chosen, latency, predictions = self._routed_score(task, spec)
                rows.append({"task": task.name, "score": score, "experts": chosen, "n": len(task.instances)})
                latencies.append(latency)
                correct[spec.label].append(
                    np.array([p == e.target for p, e in zip(predictions, task.instances, strict=True)], float)
                )
            hits = [self._routed_to_own(task, spec) for task in seen]
            results.append(
                {
                    "router": spec.label,
                    "rows": rows,
                    "unseen_mean": round(float(np.mean([r["score"] for r in rows])), 2),
                    "unseen_se": _mean_standard_error(rows, unseen),
                    "seen_routing_accuracy": round(100.0 * float(np.mean(hits)), 1),
                    "latency_ms": round(float(np.median(latencies)), 1),
                }
            )
        oracle_mean = round(float(np.mean(list(oracle.values()))), 2)
        roe = next((r for r in results if r["router"] == "roe"), None)
        accuracy = all(t.metric == "accuracy" for t in unseen)
        for r in results:
            r["gap_to_oracle"] = round(oracle_mean - r["unseen_mean"], 2)
            if roe is not None and accuracy:
                # Paired: every router answers the same examples, so its difference to RoE is measured far more
                # precisely than the ± of each mean (which includes how hard the tasks are).
                r["vs_roe"], r["vs_roe_se"] = _paired_difference(correct[r["router"]], correct["roe"])
            if roe is not None and oracle_mean > roe["unseen_mean"]:
                # 1.0: closes RoE's whole gap to the oracle; 0: no better than RoE; negative: worse.
                r["gap_closed_vs_roe"] = round(
                    (r["unseen_mean"] - roe["unseen_mean"]) / (oracle_mean - roe["unseen_mean"]), 3
                )
        return {
            "routers": results,
            "oracle": {"rows": oracle, "mean": oracle_mean, "candidates": [e.name for e in candidates]},
            "unseen_tasks": len(unseen),
            "examples_per_task": [len(t.instances) for t in unseen],
        }

    def _routable_experts(self) -> list[Expert]:
        """Ready experts of the experiment's kind in the library at its pinned version."""
        version, kind = self.library_version, self.config.shared.get("kind", "lora")
        return [
            e
            for e in self.registry.experts(status="ready")
            if e.kind == kind
            and e.library_version is not None
            and e.library_version <= version
            and (e.retired_at_version is None or e.retired_at_version > version)
        ]

    def _with_retriever(self, spec: RouterSpec) -> RouterSpec:
        """A ``trained`` router without an ``embedder`` option routes with this experiment's retriever, trained
        on the seen library (at its pinned version) the first time and reused by later runs."""
        if spec.router != "trained" or "embedder" in spec.options:
            return spec
        name = f"{self.config.name}-retriever-v{self.library_version}-{self.config.fingerprint()}"
        try:
            self.registry.context.catalogue.get_embedder(name)
        except NotFoundError:
            started = time.perf_counter()
            self.registry.train_retriever(
                name=name, library_version=self.library_version, seed=self.config.seed
            )
            self.reporter.stage(f"    trained retriever {name} in {time.perf_counter() - started:.1f} s")
        # Labelled as configured: the embedder's name is in the decisions' router options.
        return _LabelledRouterSpec(spec.router, {**spec.options, "embedder": name}, spec.label)

    def _routing_options(self, spec, label: str) -> dict[str, Any]:
        """How the routers section routes: ``spec``'s router against the pinned seen library, experts of the
        experiment's kind only, labelled for the audit views."""
        return {
            "router": spec.router,
            "router_options": spec.options,
            "library_version": self.library_version,
            "kinds": [self.config.shared.get("kind", "lora")],
            "caller_label": f"experiment:{self.config.name}:{label}",
        }

    def _routed_score(self, task: _Eval, spec) -> tuple[float, dict[str, Any], float, list[str]]:
        """The score on ``task`` of what the router assigns: one expert for the task, one per instance, or an
        in-model router's mixture (each expert's predictions on the task are computed once, so routing only
        reads them). Returns the score, the experts picked (instances each; for a mixture, each expert's share
        of the routing mass), the routing latency (ms) and the predictions."""
        options = self._routing_options(spec, "routers")
        assignment = self.registry.assign(
            task.instances, q=min(self.config.q, len(task.instances)), **options
        )
        predictions = self._assigned_predictions(task, assignment)
        decision = assignment.decision
        if decision is not None and assignment.answerers[0].mixture is not None:
            # Each expert's share of the routing mass (the answers come from the whole mixture).
            chosen = {t.expert_name: round(t.strength / decision.q, 3) for t in decision.tallies}
        else:
            chosen = assignment.experts_chosen()
        score = round(metric_score(task.metric, predictions, [e.target for e in task.instances]), 2)
        return score, chosen, sum(d.latency_ms for d in assignment.decisions), predictions

    def _assigned_predictions(self, task: _Eval, assignment) -> list[str]:
        """Each instance's prediction by its answerer, read from that answerer's predictions on the whole task."""
        by_answerer: dict[tuple, list[str]] = {}
        predictions = []
        for index, answerer in enumerate(assignment.answerers):
            if answerer.key not in by_answerer:
                by_answerer[answerer.key] = (
                    self._mixture_predictions(task, assignment, answerer.mixture)
                    if answerer.mixture is not None
                    else self.predictions(task, answerer.expert)
                )
            predictions.append(by_answerer[answerer.key][index])
        return predictions

    def _mixture_predictions(self, task: _Eval, assignment, mixture) -> list[str]:
        """The answers of an in-model router's mixture on ``task`` (kept on disk like any expert's)."""
        experts = list(mixture.experts)
        options = {"top_k": mixture.top_k, "temperature": mixture.temperature}
        key = prediction_key(mixture_answering(experts, options), task.instances)
        stored = self.cache.get(key, len(task.instances)) if self.use_cache else None
        if stored is not None:
            return stored
        started = time.perf_counter()
        predictions = [row["prediction"] for row in self.registry.answer(task.instances, assignment)]
        self.reporter.stage(
            f"    {task.name} x {assignment.decisions[0].router} mixture of {len(experts)}: "
            f"{len(task.instances)} answered in {time.perf_counter() - started:.1f} s"
        )
        self.cache.put(key, predictions)
        return predictions

    def _routed_to_own(self, task: _Eval, spec) -> float:
        """The share of the seen task's instances that routing gives to its own expert."""
        own = self.experts[task.name].id
        options = self._routing_options(spec, "routers-seen")
        assignment = self.registry.assign(
            task.instances, task=task.name, q=min(self.config.q, len(task.instances)), **options
        )
        return float(np.mean([a.expert is not None and a.expert.id == own for a in assignment.answerers]))

    def run_ablation(self) -> dict[str, Any]:
        from elmreg.models.embedder import load_embedder

        config = self.config
        library: list[tuple[str, PromptedExample]] = []
        for spec in config.seen:
            record = self.registry.task(spec.name)
            seed = int(record.training_config.get("seed", 0))
            examples = self.registry.examples(
                spec.name, split=record.split, limit=record.max_examples, seed=seed
            )
            # The same S samples the expert's library entries were embedded from.
            library += [
                (spec.name, examples[i]) for i in sample_indices(len(examples), SAMPLES_PER_EXPERT, seed)
            ]
        tasks = [self._eval(spec, registered=True) for spec in config.seen]
        # The router's own seeded choice of Q instances, so that the "both" row routes the same queries.
        queries = {t.name: sample_queries(t.instances, min(config.q, len(t.instances))) for t in tasks}
        names = list(config.embedders) or [self.registry.settings.embedder]
        rows = []
        for embedder_name in names:
            try:
                embedder = load_embedder(embedder_name)
            except UserError as exc:
                rows.append({"embedder": embedder_name, "error": str(exc)})
                continue
            for text_format in config.formats:
                started = time.perf_counter()
                entries = embedder.embed([library_text(e, text_format) for _, e in library])
                owners = [(self.experts[name].id, name) for name, _ in library]
                same_dataset = same_prompt = 0
                for t in tasks:
                    vectors = embedder.embed([library_text(e, text_format) for e in queries[t.name]])
                    chosen = exact_vote(vectors @ entries.T, owners)[0].expert_name
                    same = self._same(t, self.experts[chosen])
                    same_dataset += same[0]
                    same_prompt += same[1]
                rows.append(
                    {
                        "embedder": embedder_name,
                        "format": text_format,
                        "same_dataset": same_dataset,
                        "same_prompt": same_prompt,
                        "tasks": len(tasks),
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
        return {"rows": rows, "library_size": len(library), "experts": len(config.seen)}


@dataclass(frozen=True)
class _LabelledRouterSpec(RouterSpec):
    """A router spec whose options were filled in by the harness, shown under the label it was configured with."""

    configured_label: str = ""

    @property
    def label(self) -> str:
        return self.configured_label


def _mean_standard_error(rows: list[dict[str, Any]], tasks: list[_Eval]) -> float | None:
    """Standard error of the mean accuracy over tasks: each task's binomial standard error (in points),
    combined as for a mean of independent estimates. None for metrics other than accuracy."""
    if any(t.metric != "accuracy" for t in tasks):
        return None
    variances = [
        r["score"] * (100.0 - r["score"]) / len(t.instances) for r, t in zip(rows, tasks, strict=True)
    ]
    return round(float(np.sqrt(sum(variances))) / len(tasks), 2)


def _paired_difference(router: list[np.ndarray], roe: list[np.ndarray]) -> tuple[float, float]:
    """Mean over tasks of the router's accuracy minus RoE's on the same examples, in points, with its standard
    error (each task's per-example differences, combined as for a mean of independent estimates)."""
    differences = [a - b for a, b in zip(router, roe, strict=True)]
    mean = float(np.mean([d.mean() for d in differences]))
    variance = sum(d.var(ddof=1) / len(d) if len(d) > 1 else 0.0 for d in differences)
    return round(100.0 * mean, 2), round(100.0 * float(np.sqrt(variance)) / len(differences), 2)


def _means(rows: list[dict[str, Any]], columns) -> dict[str, float]:
    return {
        c: round(float(np.mean([r[c] for r in rows])), 2)
        for c in columns
        if rows and all(c in r for r in rows)
    }


def _check_same_spec(task, spec: TaskSpec) -> None:
    """A registered task is reused only if it was registered with the same specification."""
    options = spec.options
    wanted = {
        "dataset": spec.dataset,
        "subset": options.get("subset"),
        "expert_kind": options.get("kind", "lora"),
        "training": {"seed": 0, **(options.get("training") or {})},
    }
    have = {
        "dataset": task.dataset,
        "subset": task.subset,
        "expert_kind": task.expert_kind,
        "training": {"seed": 0, **task.training_config},
    }
    if options.get("max_examples") is not None:
        wanted["max_examples"], have["max_examples"] = options["max_examples"], task.max_examples
    if wanted != have:
        differing = sorted(k for k in wanted if wanted[k] != have[k])
        raise UserError(
            f"task {task.name} is registered with another specification ({', '.join(differing)} differ); "
            "give the experiment's task another name, or use another registry home"
        )


def provenance(registry: Registry, config: ExperimentConfig) -> dict[str, Any]:
    """What produced the numbers: preset, backbone, tasks, K, seed, elmreg commit, machine."""
    import torch

    from elmreg import __version__

    settings = registry.settings
    return {
        "preset": config.name,
        "config": config.source,
        "description": config.description,
        "backbone": config.backbone or settings.backbone,
        "embedder": settings.embedder,
        "kind": config.shared.get("kind", "lora"),
        "K": config.shared.get("max_examples"),
        "training": config.shared.get("training", {}),
        "seed": config.seed,
        "q": config.q,
        "eval_limit": config.eval_limit,
        "matrix_limit": config.matrix_limit,
        "rehearsal": config.rehearsal,
        "seen": [t.name for t in config.seen],
        "new": [t.name for t in config.new],
        "unseen": [t.name for t in config.unseen],
        "elmreg_version": __version__,
        "elmreg_commit": git_commit(),
        "device": settings.device,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_experiment(
    registry: Registry,
    config: ExperimentConfig,
    *,
    out_dir: Path | None = None,
    reporter: Reporter = SILENT,
    fresh: bool = False,
) -> ExperimentResult:
    """Run every section of ``config`` and write ``results.json`` and ``results.md`` to ``out_dir``
    (default: HOME/experiments/<name>/). A failed continual check is recorded, not raised: see ``passed``.
    Predictions of earlier runs (same expert weights, same instances) are reused unless ``fresh``; ``reporter``
    is told of each section and step as it runs."""
    from elmreg.experiments.report import write_results

    out = check_writable_folder(out_dir or registry.settings.home / "experiments" / config.name)
    harness = Harness(registry, config, reporter=reporter, fresh=fresh)
    result = ExperimentResult(provenance(registry, config))
    started = time.perf_counter()

    def timed(name: str, step: Callable[[], Any]) -> Any:
        begin = time.perf_counter()
        reporter.stage(f"[{name}]")
        value = step()
        result.seconds[name] = round(time.perf_counter() - begin, 1)
        reporter.stage(f"    ({result.seconds[name]:.1f} s)")
        return value

    timed("prepare", harness.prepare)
    result.provenance["library_version"] = harness.library_version
    if "routing" in config.sections:
        result.sections["routing"] = timed("routing", harness.run_routing)
    if "multitask" in config.sections:
        result.sections["multitask"] = timed("multitask", harness.run_multitask)
    if "unseen" in config.sections and config.unseen:
        # Before the continual section: the seen library is what unseen tasks are routed against either way
        # (pinned version), and this way its numbers exist even if continual training fails.
        result.sections["unseen"] = timed("unseen", harness.run_unseen)
    if "continual" in config.sections and config.new:
        section, check = timed("continual", harness.run_continual)
        result.sections["continual"] = section
        result.check = check
    if "ablation" in config.sections:
        result.sections["ablation"] = timed("ablation", harness.run_ablation)
    if "routers" in config.sections and config.unseen:
        result.sections["routers"] = timed("routers", harness.run_routers)
    result.seconds["total"] = round(time.perf_counter() - started, 1)
    result.provenance["mt_expert"] = harness.mt.name if harness.mt else None
    result.provenance["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result.files = write_results(result, Path(out))
    return result
