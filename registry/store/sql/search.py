"""The filter tree of ``registry.search`` compiled into SQLAlchemy expressions over ``experts``.

Every value becomes a bound parameter and every field maps to a fixed column or JSON operator, so a filter can
select rows but never change the statement's shape beyond the grammar.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, and_, case, cast, exists, func, not_, or_, select, true
from sqlalchemy.sql import ColumnElement

from elmreg.registry.search import And, Comparison, ExpertQuery, Filter, Not, Or
from elmreg.registry.store.models import BackboneRow, ExpertAliasRow, ExpertRow, TaskRow

_COLUMNS = {
    "id": ExpertRow.id,
    "name": ExpertRow.name,
    "kind": ExpertRow.kind,
    "status": ExpertRow.status,
    "description": ExpertRow.description,
    "library_version": ExpertRow.library_version,
    "created_at": ExpertRow.created_at,
    "ready_at": ExpertRow.ready_at,
    "retired_at": ExpertRow.retired_at,
}


def _metric(path: tuple[str, ...], numeric: bool) -> ColumnElement[Any]:
    keys = path[1:]
    value = ExpertRow.metrics[keys if len(keys) > 1 else keys[0]]
    if not numeric:
        return value.astext
    # CASE, not AND: PostgreSQL may evaluate AND's operands in any order, and a text metric must not be cast.
    return case((func.jsonb_typeof(value) == "number", cast(value.astext, Float)))


def _compare(column: ColumnElement[Any], op: str, value: Any) -> ColumnElement[bool]:
    if op == "is null":
        return column.is_(None)
    if op == "is not null":
        return column.is_not(None)
    if op == "in":
        return column.in_(list(value))
    if op == "like":
        return column.like(value)
    return {
        "=": column.__eq__,
        "!=": column.__ne__,
        "<": column.__lt__,
        "<=": column.__le__,
        ">": column.__gt__,
        ">=": column.__ge__,
    }[op](value)


def _comparison(node: Comparison) -> ColumnElement[bool]:
    field = node.path[0]
    if field == "alias":
        if node.op in ("is null", "is not null"):
            any_alias = exists().where(ExpertAliasRow.expert_id == ExpertRow.id)
            return any_alias if node.op == "is not null" else not_(any_alias)
        if node.op == "!=":
            return not_(_alias_matches("=", node.value))
        return _alias_matches(node.op, node.value)
    if field == "task":
        column = select(TaskRow.name).where(TaskRow.id == ExpertRow.task_id).scalar_subquery()
    elif field == "backbone":
        column = select(BackboneRow.name).where(BackboneRow.id == ExpertRow.backbone_id).scalar_subquery()
    elif field == "tags":
        column = ExpertRow.tags[node.path[1]].astext
    elif field == "metrics":
        values = node.value if isinstance(node.value, tuple) else (node.value,)
        column = _metric(node.path, numeric=any(isinstance(v, float) for v in values))
    else:
        column = _COLUMNS[field]
    return _compare(column, node.op, node.value)


def _alias_matches(op: str, value: Any) -> ColumnElement[bool]:
    return exists().where(ExpertAliasRow.expert_id == ExpertRow.id, _compare(ExpertAliasRow.alias, op, value))


def compile_filter(node: Filter | None) -> ColumnElement[bool]:
    """The WHERE condition on ``experts`` for a parsed filter (true for None)."""
    if node is None:
        return true()
    if isinstance(node, Comparison):
        return _comparison(node)
    if isinstance(node, And):
        return and_(*(compile_filter(item) for item in node.items))
    if isinstance(node, Or):
        return or_(*(compile_filter(item) for item in node.items))
    if isinstance(node, Not):
        return not_(compile_filter(node.item))
    raise TypeError(f"not a filter node: {node!r}")


def search_statement(query: ExpertQuery):
    """SELECT of the experts ``query`` asks for, in its order (ties by id), at most ``query.limit``."""
    if query.order_by[0] == "metrics":
        key: ColumnElement[Any] = _metric(query.order_by, numeric=True)
    else:
        key = _COLUMNS[query.order_by[0]]
    key = key.desc().nulls_last() if query.descending else key.asc().nulls_last()
    statement = select(ExpertRow).where(compile_filter(query.where)).order_by(key, ExpertRow.id)
    return statement.limit(query.limit) if query.limit is not None else statement
