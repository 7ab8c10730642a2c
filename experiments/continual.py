"""The continual-learning check: old tasks' predictions before and after new experts joined the library."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PredictionCheck:
    """Whether every old prediction is unchanged; ``changed`` counts differing predictions per task."""

    identical: bool
    compared: int
    changed: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.identical:
            return f"identical: all {self.compared} predictions unchanged"
        parts = [f"{task}: {n} changed" for task, n in self.changed.items() if n]
        parts += [f"{task}: missing" for task in self.missing]
        return "CHANGED: " + "; ".join(parts)


def compare_predictions(
    before: Mapping[str, Sequence[str]], after: Mapping[str, Sequence[str]]
) -> PredictionCheck:
    """Compare predictions per task exactly (string equality, position by position).

    A task missing after, or with a different number of predictions, counts as changed: the claim is that the
    library answers every old instance exactly as before, so anything less fails.
    """
    changed: dict[str, int] = {}
    missing: list[str] = []
    compared = 0
    for task, old in before.items():
        new = after.get(task)
        if new is None:
            missing.append(task)
            continue
        differing = sum(a != b for a, b in zip(old, new, strict=False)) + abs(len(old) - len(new))
        changed[task] = differing
        compared += len(old)
    return PredictionCheck(
        identical=not missing and not any(changed.values()),
        compared=compared,
        changed=changed,
        missing=missing,
    )
