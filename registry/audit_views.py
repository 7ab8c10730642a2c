"""The audit trail as users read it: the SQL views over routing decisions, and ready-to-run queries on them.

The views themselves are created by migration 0002 (and readable by the ``elmreg_auditor`` role); this module
names them for the Python API (``Registry.audit``) and for ``elmreg audit``, which prints the queries below.
"""

from __future__ import annotations

from elmreg.registry.errors import UserError

# Short names -> view, with the column a view is newest-first by (None: no natural order).
AUDIT_VIEWS = {
    "decisions": ("audit_decisions", "decision_id"),
    "choices": ("audit_choices_by_task", "day"),
    "never_chosen": ("audit_experts_never_chosen", None),
    "votes": ("audit_votes", "decision_id"),
}

AUDIT_QUERIES = {
    "latest decisions, with vote margins": "SELECT * FROM audit_decisions ORDER BY created_at DESC LIMIT 20;",
    "which expert was chosen for each task, by day (last week)": (
        "SELECT * FROM audit_choices_by_task WHERE day > now() - interval '7 days' ORDER BY day DESC, task;"
    ),
    "experts never chosen": "SELECT * FROM audit_experts_never_chosen;",
    "the votes of one decision, with the samples they matched": (
        "SELECT * FROM audit_votes WHERE decision_id = 1 ORDER BY query_index, rank;"
    ),
    "close calls (margin of at most 2 votes)": (
        "SELECT decision_id, task, chosen_expert, runner_up_expert, vote_margin FROM audit_decisions "
        "WHERE vote_margin <= 2;"
    ),
}


def audit_view(name: str) -> tuple[str, str | None]:
    """The view (and its newest-first column) for a short name such as ``decisions``.

    Raises:
        UserError: An unknown name; the message lists the known ones.
    """
    try:
        return AUDIT_VIEWS[name]
    except KeyError:
        raise UserError(f"unknown audit view '{name}'; choose one of {', '.join(AUDIT_VIEWS)}") from None
