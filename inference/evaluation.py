"""Evaluating a route on labelled data: accuracy, ROUGE-L, BLEU; results on registered tasks stored in
``evaluations``.

Routes: ``base`` (the backbone alone), ``expert:<id or name>``, ``oracle`` (the best ready expert on this data:
the paper's upper bound), and every registered router (``inference.routers``): ``roe`` (the expert RoE chooses from
Q unlabeled instances of the evaluation data), ``roe-knn``, ``centroid``, ... and ``per-instance`` (each example
answered by the expert chosen for it alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from elmreg.data.examples import task_examples
from elmreg.data.prompts import PromptedExample
from elmreg.inference.assignment import Answerer, Assignment
from elmreg.inference.engine import Engine, PeftEngine, answer_texts
from elmreg.inference.pool import AdapterPool
from elmreg.inference.router import Router
from elmreg.inference.routers import make_router, router_names
from elmreg.registry.entities import Expert, Task
from elmreg.registry.errors import UserError
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.context import RegistryContext


@dataclass(frozen=True)
class EvaluationResult:
    task: str
    route: str
    expert: str | None
    metric: str
    score: float
    n_examples: int
    evaluation_id: int | None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationData:
    """Labelled examples to evaluate routes on: a registered task's split (``task_id`` set; results are stored)
    or data that is not a registered task, e.g. an unseen task (``task_id`` None; nothing is stored)."""

    name: str
    task_id: int | None
    task_type: str
    metric: str
    backbone_id: int
    split: str
    limit: int | None
    examples: list[PromptedExample]

    @classmethod
    def of_task(cls, task: Task, examples: list[PromptedExample], *, split: str, limit: int | None):
        return cls(task.name, task.id, task.task_type, task.metric, task.backbone_id, split, limit, examples)

    @property
    def key(self) -> tuple:
        """Identifies these examples in the evaluator's score cache."""
        return (self.task_id if self.task_id is not None else f"dataset:{self.name}", self.split, self.limit)


def metric_score(metric: str, predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Accuracy (exact match, in %), ROUGE-L F1 (in %) or corpus BLEU."""
    if metric == "accuracy":
        return 100.0 * sum(p == t for p, t in zip(predictions, targets, strict=True)) / len(targets)
    if metric == "rouge_l":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        return (
            100.0
            * sum(scorer.score(t, p)["rougeL"].fmeasure for p, t in zip(predictions, targets, strict=True))
            / len(targets)
        )
    if metric == "bleu":
        import sacrebleu

        return float(sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score)
    raise UserError(f"unknown metric '{metric}'")


class Evaluator:
    """Evaluates routes for tasks of one backbone, sharing one adapter pool and one router."""

    def __init__(
        self,
        context: RegistryContext,
        backbone_name: str,
        *,
        pool: AdapterPool | None = None,
        engine: Engine | None = None,
        reporter: Reporter = SILENT,
    ):
        """Args:
        reporter: Told of each pass over a task's examples (one per answerer) as a counted step.
        """
        self.context = context
        self.reporter = reporter
        self.pool = pool or AdapterPool(context, backbone_name)
        self._router: Router | None = None
        self._engine = engine
        # (task, split, limit, answerer) -> score: a benchmark run asks for the same expert on the same examples
        # for its matrix, the oracle and RoE; each is computed once per evaluator.
        self._scores: dict[tuple, float] = {}

    def remember(self, task: Task, expert: Expert, score: float, *, split: str, limit: int | None) -> None:
        """Take ``expert``'s score on this sample of ``task`` as measured earlier, instead of answering again
        (an expert's weights and a seeded sample never change)."""
        self._scores[(task.id, split, limit, Answerer(expert).key)] = score

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self.context, pool_for=lambda backbone_id: self.pool)
        return self._router

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = PeftEngine(self.pool)
        return self._engine

    def _predictions(self, data: EvaluationData, assignment: Assignment) -> list[str]:
        chosen = assignment.experts_chosen()
        who = next(iter(chosen)) if len(chosen) == 1 else f"{len(chosen)} experts"
        description = f"{data.name} with {'the base backbone' if who == 'base' else who}"
        self.reporter.start(description, len(data.examples))
        try:
            return answer_texts(
                self.engine, data.examples, assignment, task_type=data.task_type, progress=self.reporter
            )
        finally:
            self.reporter.finish()

    def _score(self, data: EvaluationData, assignment: Assignment) -> float:
        keys = {a.key for a in assignment.answerers}
        # Weights and a seeded sample never change: one answerer's score on these examples is computed once.
        key = (*data.key, keys.pop()) if len(keys) == 1 else None
        if key is None or key not in self._scores:
            predictions = self._predictions(data, assignment)
            score = metric_score(data.metric, predictions, [e.target for e in data.examples])
            if key is None:
                return score
            self._scores[key] = score
        return self._scores[key]

    def evaluate(
        self,
        task: Task,
        route: str,
        *,
        split: str = "validation",
        limit: int | None = None,
        q: int = 32,
        record: bool = True,
        router_options: Mapping[str, Any] | None = None,
    ) -> EvaluationResult:
        """Evaluate ``route`` on ``task``'s ``split`` and store the result.

        Raises:
            UserError: Unknown route, router option or expert, or no examples.
        """
        examples = task_examples(task, cache_dir=self.context.settings.cache_path, split=split, limit=limit)
        if not examples:
            raise UserError(f"task {task.name} has no examples in split '{split}'")
        data = EvaluationData.of_task(task, examples, split=split, limit=limit)
        return self.evaluate_data(data, route, q=q, record=record, router_options=router_options)

    def evaluate_data(
        self,
        data: EvaluationData,
        route: str,
        *,
        q: int = 32,
        record: bool = True,
        router_options: Mapping[str, Any] | None = None,
    ) -> EvaluationResult:
        """Evaluate ``route`` on ``data``; stored in ``evaluations`` when ``record`` and ``data`` is a task's."""
        if not data.examples:
            raise UserError(f"{data.name} has no examples to evaluate on")
        if route == "oracle":
            expert, score, details = self._oracle(data)
        else:
            assignment, details = self._assignment(data, route, q, router_options)
            score = self._score(data, assignment)
            only = assignment.answerers[0] if len({a.key for a in assignment.answerers}) == 1 else None
            # The evaluation names its expert when one expert answered everything.
            expert = only.expert if only is not None and only.mixture is None else None
        evaluation_id = None
        if record and data.task_id is not None:
            evaluation_id = self.context.evaluations.record_evaluation(
                task_id=data.task_id,
                expert_id=expert.id if expert else None,
                route=route.split(":", 1)[0],
                split=data.split,
                metric=data.metric,
                score=score,
                n_examples=len(data.examples),
                library_version=self.context.library.library_version(),
                details=details,
            )
        return EvaluationResult(
            task=data.name,
            route=route,
            expert=expert.name if expert else None,
            metric=data.metric,
            score=round(score, 4),
            n_examples=len(data.examples),
            evaluation_id=evaluation_id,
            details=details,
        )

    def _assignment(
        self, data: EvaluationData, route: str, q: int, router_options: Mapping[str, Any] | None
    ) -> tuple[Assignment, dict]:
        """Who answers each example on ``route`` (``base``, ``expert:<id or name>`` or a router), and what the
        evaluation records about it."""
        count = len(data.examples)
        if route == "base":
            return Assignment.fixed(None, count), {}
        if route.startswith("expert:"):
            return Assignment.fixed(self.context.catalogue.get_expert(route.split(":", 1)[1]), count), {}
        if route not in router_names():
            routes = ", ".join(["base", "oracle", "expert:<id or name>", *router_names()])
            raise UserError(f"unknown route '{route}'; use one of {routes}")
        method = make_router(route, router_options)
        assignment = self.router.assign(
            data.examples,
            q=min(q, count),
            router=method,
            task_id=data.task_id,
            # Only experts of the data's backbone: the answers are scored on that backbone.
            backbone_id=data.backbone_id,
            caller_label=f"eval:{data.name}",
        )
        return assignment, {
            "router": method.name,
            "router_options": dict(method.options),
        } | assignment.details()

    def _oracle(self, data: EvaluationData) -> tuple[Expert, float, dict]:
        """The best ready expert of the data's backbone on this data (the paper's upper bound)."""
        candidates = [
            e
            for e in self.context.catalogue.list_experts(status="ready")
            if e.backbone_id == data.backbone_id
        ]
        if not candidates:
            raise UserError("the oracle needs at least one ready expert on the task's backbone")
        count = len(data.examples)
        scores = {e.id: self._score(data, Assignment.fixed(e, count)) for e in candidates}
        best = max(candidates, key=lambda e: (scores[e.id], -e.id))
        return best, scores[best.id], {"scores": {e.name: round(scores[e.id], 3) for e in candidates}}
