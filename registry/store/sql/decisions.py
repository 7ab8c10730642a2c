"""Routing decisions in batches on PostgreSQL: ids from the table's sequence, rows in multi-row inserts."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, insert, select

from elmreg.registry.errors import UserError
from elmreg.registry.store.decisions import DecisionLogStore
from elmreg.registry.store.entities import PendingDecision
from elmreg.registry.store.models import RoutingDecisionRow, RoutingVoteRow
from elmreg.registry.store.session import ManagedSessions

# The BIGSERIAL behind routing_decisions.id: nextval() hands each id out once, whoever asks, so ids reserved here
# never collide with those the library store's inserts take.
_SEQUENCE = "routing_decisions_id_seq"


class SqlDecisionLogStore(DecisionLogStore):
    """:class:`DecisionLogStore` on PostgreSQL."""

    def __init__(self, sessions: ManagedSessions):
        self.sessions = sessions

    def reserve_decision_ids(self, count: int) -> list[int]:
        if count < 1:
            raise UserError(f"reserve at least one decision id, not {count}")
        with self.sessions() as session:
            return list(
                session.scalars(select(func.nextval(_SEQUENCE)).select_from(func.generate_series(1, count)))
            )

    def record_decisions(self, decisions: Sequence[PendingDecision]) -> None:
        if not decisions:
            return
        decision_rows = [
            {
                "id": d.decision_id,
                "caller_label": d.record.caller_label,
                "task_id": d.record.task_id,
                "embedder_id": d.record.embedder_id,
                "backbone_id": d.record.backbone_id,
                "library_version": d.record.library_version,
                "q": d.record.q,
                "top_k": d.record.top_k,
                "kinds": list(d.record.kinds) if d.record.kinds else None,
                "chosen_expert_id": d.record.chosen_expert_id,
                "latency_ms": d.record.latency_ms,
                "details": d.record.details,
            }
            for d in decisions
        ]
        vote_rows = [
            {
                "decision_id": d.decision_id,
                "query_index": v.query_index,
                "rank": v.rank,
                "library_entry_id": v.entry_id,
                "expert_id": v.expert_id,
                "score": v.score,
            }
            for d in decisions
            for v in d.votes
        ]
        with self.sessions() as session:
            session.execute(insert(RoutingDecisionRow), decision_rows)
            if vote_rows:
                session.execute(insert(RoutingVoteRow), vote_rows)
