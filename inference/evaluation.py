"""Evaluating a route on a task's labelled data: accuracy, ROUGE-L, BLEU; results stored in ``evaluations``.

Routes: ``base`` (the backbone alone), ``expert:<id or name>``, ``roe`` (the expert RoE chooses from Q unlabeled
instances of the evaluation data) and ``oracle`` (the best ready expert on this data: the paper's upper bound).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from elmreg.inference.pool import AdapterPool
from elmreg.inference.router import Router
from elmreg.inference.scoring import answer
from elmreg.registry.context import RegistryContext
from elmreg.registry.errors import UserError
from elmreg.registry.examples import task_examples
from elmreg.registry.prompts import PromptedExample
from elmreg.registry.store.entities import Expert, Task

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
            self._router = Router(self.context)
        return self._router

    def _score(
        self,
        task: Task,
        examples: Sequence[PromptedExample],
        expert: Expert | None,
        sample: tuple[str, int | None],
    ) -> float:
        key = (task.id, *sample, expert.id if expert else None)
        if key not in self._scores:
            description = f"{task.name} with {expert.name if expert else 'the base backbone'}"
            tick = None
            if self.progress is not None:
                progress = self.progress
                progress(description, 0, len(examples))

                def tick(done: int) -> None:
                    progress(description, done, len(examples))

            with self.pool.use(expert) as model:
                predictions = answer(
                    model, self.pool.backbone, examples, task_type=task.task_type, progress=tick
                )
            self._scores[key] = metric_score(task.metric, predictions, [e.target for e in examples])
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
    ) -> EvaluationResult:
        """Evaluate ``route`` on ``task`` and store the result.

        Raises:
            UserError: Unknown route or expert, or no examples.
        """
        examples = task_examples(task, cache_dir=self.context.settings.cache_path, split=split, limit=limit)
        sample = (split, limit)
        if not examples:
            raise UserError(f"task {task.name} has no examples in split '{split}'")
        details: dict = {}
        expert: Expert | None = None
        if route == "base":
            score = self._score(task, examples, None, sample)
        elif route.startswith("expert:"):
            expert = self.context.catalogue.get_expert(route.split(":", 1)[1])
            score = self._score(task, examples, expert, sample)
        elif route == "roe":
            # Only experts of the task's backbone: the answer is scored on that backbone.
            decision = self.router.route(
                examples,
                q=min(q, len(examples)),
                task_id=task.id,
                backbone_id=task.backbone_id,
                caller_label=f"eval:{task.name}",
            )
            expert = self.context.catalogue.get_expert(decision.chosen_expert_id)
            details = {"decision_id": decision.decision_id, "votes": decision.tallies[0].votes}
            score = self._score(task, examples, expert, sample)
        elif route == "oracle":
            candidates = [
                e
                for e in self.context.catalogue.list_experts(status="ready")
                if e.backbone_id == task.backbone_id
            ]
            if not candidates:
                raise UserError("the oracle needs at least one ready expert on the task's backbone")
            scores = {e.id: self._score(task, examples, e, sample) for e in candidates}
            best = max(candidates, key=lambda e: (scores[e.id], -e.id))
            expert, score = best, scores[best.id]
            details = {"scores": {e.name: round(scores[e.id], 3) for e in candidates}}
        else:
            raise UserError(f"unknown route '{route}'; use roe, oracle, base or expert:<id or name>")
        evaluation_id = None
        if record:
            evaluation_id = self.context.evaluations.record_evaluation(
                task_id=task.id,
                expert_id=expert.id if expert else None,
                route=route.split(":", 1)[0],
                split=split,
                metric=task.metric,
                score=score,
                n_examples=len(examples),
                library_version=self.context.library.library_version(),
                details=details,
            )
        return EvaluationResult(
            task=task.name,
            route=route,
            expert=expert.name if expert else None,
            metric=task.metric,
            score=round(score, 4),
            n_examples=len(examples),
            evaluation_id=evaluation_id,
            details=details,
        )
