"""Answering instances that each name their own expert, with one loaded backbone.

Experts of mixable kinds (LoRA, merged LoRA included) and the plain backbone share work: for generation, batches
mix adapters through PEFT's ``adapter_names`` (each row runs its own adapter in the same forward pass), and so
do rank classification's (instance, choice) pairs: all instances' choices share forward passes. Experts of the
other kinds change the backbone itself and are answered group by group.
"""

from __future__ import annotations

from collections.abc import Sequence

from elmreg.data.prompts import PromptedExample
from elmreg.inference.pool import BASE_ADAPTER, AdapterPool
from elmreg.inference.scoring import best_choice, choice_log_likelihoods_batch, generate, rank_classify
from elmreg.registry.entities import Expert
from elmreg.registry.kinds import get_expert_kind, weights_kind


def answer_each(
    pool: AdapterPool,
    examples: Sequence[PromptedExample],
    experts: Sequence[Expert | None],
    *,
    task_type: str | None = None,
) -> list[str]:
    """The answer to ``examples[i]`` by ``experts[i]`` (None: the backbone alone), in input order."""
    classify = task_type == "classification" or (
        task_type is None and all(e.answer_choices for e in examples)
    )
    answers: list[str | None] = [None] * len(examples)
    mixable = [i for i, e in enumerate(experts) if e is None or get_expert_kind(weights_kind(e)).mixable]
    for group in _mixable_groups([experts[i] for i in mixable if experts[i] is not None], pool.capacity):
        ids = {e.id for e in group}
        rows = [i for i in mixable if experts[i] is None or experts[i].id in ids]
        if not ids:
            break
        with pool.use_mixed(group) as (model, names):
            adapters = [names[experts[i].id] if experts[i] else BASE_ADAPTER for i in rows]
            if classify:
                subset = [examples[i] for i in rows]
                scores = choice_log_likelihoods_batch(model, pool.backbone, subset, adapter_names=adapters)
                results = [best_choice(e, s) for e, s in zip(subset, scores, strict=True)]
            else:
                results = generate(model, pool.backbone, [examples[i] for i in rows], adapter_names=adapters)
        for row, result in zip(rows, results, strict=True):
            answers[row] = result
        mixable = [i for i in mixable if answers[i] is None]
    others: dict[int | None, list[int]] = {}
    for i, expert in enumerate(experts):
        if answers[i] is None:
            others.setdefault(expert.id if expert else None, []).append(i)
    for rows in others.values():
        with pool.use(experts[rows[0]]) as model:
            subset = [examples[i] for i in rows]
            results = (
                rank_classify(model, pool.backbone, subset)
                if classify
                else generate(model, pool.backbone, subset)
            )
        for row, result in zip(rows, results, strict=True):
            answers[row] = result
    return [a if a is not None else "" for a in answers]


def _mixable_groups(experts: Sequence[Expert], capacity: int) -> list[list[Expert]]:
    """Distinct mixable experts in groups that fit the pool at once (a first empty group answers base-only rows)."""
    distinct = list({e.id: e for e in experts}.values())
    if not distinct:
        return [[]]
    return [distinct[start : start + capacity] for start in range(0, len(distinct), capacity)]
