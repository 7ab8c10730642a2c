"""Routing decisions written in batches, for callers that must answer before the decision is stored."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from elmreg.registry.store.entities import PendingDecision


class DecisionLogStore(ABC):
    """The batch path into ``routing_decisions`` / ``routing_votes`` (the library store writes one at a time).

    A server tells its client the decision id in the response, but writes the decision afterwards with others;
    so ids are reserved first, from the table's own sequence, and the rows are inserted with them later.
    """

    @abstractmethod
    def reserve_decision_ids(self, count: int) -> list[int]:
        """``count`` unused decision ids (never handed out twice, even across processes)."""

    @abstractmethod
    def record_decisions(self, decisions: Sequence[PendingDecision]) -> None:
        """Insert decisions with their reserved ids and all their votes, in one transaction."""
