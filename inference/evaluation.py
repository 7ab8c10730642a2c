"""Evaluating a route on labelled data: accuracy, ROUGE-L, BLEU; results on registered tasks stored in
``evaluations``.

Routes: ``base`` (the backbone alone), ``expert:<id or name>``, ``oracle`` (the best ready expert on this data:
the paper's upper bound), and every registered router (``inference.routers``): ``roe`` (the expert RoE chooses from
Q unlabeled instances of the evaluation data), ``roe-knn``, ``centroid``, ... and ``per-instance`` (each example
answered by the expert chosen for it alone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from elmreg.data.examples import task_examples
from elmreg.data.prompts import PromptedExample
from elmreg.inference.pool import AdapterPool
from elmreg.inference.router import Router
from elmreg.inference.routers import make_router, router_names
from elmreg.inference.scoring import answer
from elmreg.registry.entities import Expert, Task
from elmreg.registry.errors import UserError
from elmreg.runtime.context import RegistryContext

# progress(description, done, total): examples answered so far for one (task, expert) pass.
EvaluationProgress = Callable[[str, int, int], None]


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
        progress: EvaluationProgress | None = None,
    ):
        """Args:
        progress: Called as ``progress(description, done, total)`` while examples are answered.
        """
        self.context = context
        self.progress = progress
        self.pool = pool or AdapterPool(context, backbone_name)
        self._router: Router | None = None
        # (task, split, limit, expert) -> score: a benchmark run asks for the same expert on the same examples
        # for its matrix, the oracle and RoE; each is computed once per evaluator.
        self._scores: dict[tuple[int, str, int | None, int | None], float] = {}

    def remember(self, task: Task, expert: Expert, score: float, *, split: str, limit: int | None) -> None:
        """Take ``expert``'s score on this sample of ``task`` as measured earlier, instead of answering again
        (an expert's weights and a seeded sample never change)."""
        self._scores[(task.id, split, limit, expert.id)] = score

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self.context, pool_for=lambda backbone_id: self.pool)
        return self._router

    def _predictions(
        self, data: EvaluationData, examples: Sequence[PromptedExample], expert: Expert | None
    ) -> list[str]:
        description = f"{data.name} with {expert.name if expert else 'the base backbone'}"
        tick = None
        if self.progress is not None:
            progress = self.progress
            progress(description, 0, len(examples))

            def tick(done: int) -> None:
                progress(description, done, len(examples))

        with self.pool.use(expert) as model:
            return answer(model, self.pool.backbone, examples, task_type=data.task_type, progress=tick)

    def _score(self, data: EvaluationData, expert: Expert | None) -> float:
        key = (*data.key, expert.id if expert else None)
        if key not in self._scores:
            predictions = self._predictions(data, data.examples, expert)
            self._scores[key] = metric_score(data.metric, predictions, [e.target for e in data.examples])
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
        details: dict = {}
        expert: Expert | None = None
        label = f"eval:{data.name}"
        if route == "base":
            score = self._score(data, None)
        elif route.startswith("expert:"):
            expert = self.context.catalogue.get_expert(route.split(":", 1)[1])
            score = self._score(data, expert)
        elif route == "oracle":
            candidates = [
                e
                for e in self.context.catalogue.list_experts(status="ready")
                if e.backbone_id == data.backbone_id
            ]
            if not candidates:
                raise UserError("the oracle needs at least one ready expert on the task's backbone")
            scores = {e.id: self._score(data, e) for e in candidates}
            best = max(candidates, key=lambda e: (scores[e.id], -e.id))
            expert, score = best, scores[best.id]
            details = {"scores": {e.name: round(scores[e.id], 3) for e in candidates}}
        elif route in router_names():
            method = make_router(route, router_options)
            details = {"router": method.name, "router_options": dict(method.options)}
            # Only experts of the data's backbone: the answers are scored on that backbone.
            if method.per_instance:
                score, per_instance = self._score_per_instance(data, method, label)
                details |= per_instance
            else:
                decision = self.router.route(
                    data.examples,
                    q=min(q, len(data.examples)),
                    router=method,
                    task_id=data.task_id,
                    backbone_id=data.backbone_id,
                    caller_label=label,
                )
            if method.in_model:
                score, mixed = self._score_mixture(data, decision)
                details |= mixed
            elif not method.per_instance:
                expert = self.context.catalogue.get_expert(decision.chosen_expert_id)
                details |= {"decision_id": decision.decision_id, "votes": decision.tallies[0].votes}
                score = self._score(data, expert)
        else:
            routes = ", ".join(["base", "oracle", "expert:<id or name>", *router_names()])
            raise UserError(f"unknown route '{route}'; use one of {routes}")
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

    def _score_mixture(self, data: EvaluationData, decision) -> tuple[float, dict]:
        """Every example answered by the mixture an in-model router's (Arrow's) ``decision`` routed Q of them
        to."""
        from elmreg.inference.arrow import answer_mixture

        predictions = answer_mixture(
            self.pool, self.context.catalogue, decision, data.examples, task_type=data.task_type
        )
        score = metric_score(data.metric, predictions, [e.target for e in data.examples])
        mass = {t.expert_name: round(t.strength, 3) for t in decision.tallies}
        return score, {"decision_id": decision.decision_id, "mass": mass}

    def _score_per_instance(self, data: EvaluationData, method, label: str) -> tuple[float, dict]:
        """Each example answered by the expert routed for it alone; one metric over all the answers."""
        decisions = self.router.route_each(
            data.examples,
            router=method,
            task_id=data.task_id,
            backbone_id=data.backbone_id,
            caller_label=label,
        )
        groups: dict[int, list[int]] = {}
        for index, decision in enumerate(decisions):
            groups.setdefault(decision.chosen_expert_id, []).append(index)
        predictions: list[str] = [""] * len(data.examples)
        chosen: dict[str, int] = {}
        for expert_id, indexes in groups.items():
            expert = self.context.catalogue.get_expert(expert_id)
            chosen[expert.name] = len(indexes)
            answers = self._predictions(data, [data.examples[i] for i in indexes], expert)
            for i, prediction in zip(indexes, answers, strict=True):
                predictions[i] = prediction
        score = metric_score(data.metric, predictions, [e.target for e in data.examples])
        ids = [d.decision_id for d in decisions if d.decision_id is not None]
        return score, {"experts": chosen, "decision_ids": [min(ids), max(ids)] if ids else []}
