"""Aliases, tags and search on the real PostgreSQL: moves kept and serialised, task@alias lookups, the
prefer-alias routing filter, tag limits, and the filter grammar compiled into parameterised SQL."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from elmreg.api import Registry
from elmreg.cli.main import cli
from elmreg.inference.routers import NearestCentroid, Retrieval, RetrievalOfExperts
from elmreg.registry.entities import LibraryEntry, StoredArtifact
from elmreg.registry.errors import InvalidStateError, NotFoundError, UserError
from elmreg.registry.names import InvalidNameError
from elmreg.registry.search import FilterError, expert_query
from elmreg.registry.tags import MAX_TAGS, TAG_VALUE_LENGTH

DIM = 384


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def _axis(i: int, j: int | None = None, mix: float = 0.0) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[i] = 1.0
    if j is not None:
        vector[j] = mix
    return _unit(vector)


class Lib:
    """Tasks and published experts on one catalogue, without training anything."""

    def __init__(self, context, unique: str):
        self.context, self.unique = context, unique
        self.backbone = context.catalogue.get_or_create_backbone(f"tiny-{unique}", "causal")
        self.embedder = context.catalogue.get_or_create_embedder("test-embedder-384", DIM)

    def task(self, name: str, **fields):
        task, _ = self.context.catalogue.create_task(
            enqueue_training=False,
            name=f"{name}-{self.unique}",
            dataset="bigbench:toy",
            subset=None,
            split="train",
            level="prompt",
            task_type="classification",
            metric="accuracy",
            templates=[{"name": "inline", "jinja": "{{input}} ||| {{target}}", "answer_choices": "a ||| b"}],
            max_examples=8,
            expert_kind="lora",
            backbone_id=self.backbone.id,
            **fields,
        )
        return task

    def expert(self, name: str, task, vectors=(), *, metrics=None, publish=True):
        expert = self.context.catalogue.create_expert(
            name=f"{name}-{self.unique}", backbone_id=self.backbone.id, kind="lora", task_id=task.id
        )
        if not publish:
            return expert
        vectors = list(vectors) or [_axis(0)]
        return self.context.catalogue.publish_expert(
            expert.id,
            artifact=StoredArtifact(f"s3://elmreg/blobs/sha256/aa/{expert.name}", "a" * 64, 1),
            embedder_id=self.embedder.id,
            entries=[LibraryEntry(i, f"{expert.name} {i}", v) for i, v in enumerate(vectors)],
            metrics=metrics,
        )


@pytest.fixture
def lib(registry, unique):
    return Lib(registry, unique)


@pytest.fixture
def facade(settings):
    with Registry(settings) as api:
        yield api


# -- aliases -------------------------------------------------------------------------------------------------
def test_alias_moves_atomically_and_keeps_every_move(lib, facade):
    task = lib.task("qa")
    first, second = lib.expert("qa-v1", task), lib.expert("qa-v2", task)
    ref = f"{task.name}@prod"

    created = facade.set_alias(task.name, "prod", first.name, by="alice")
    assert (created.from_expert, created.to_expert, created.moved_by) == (None, first.name, "alice")
    assert facade.expert(ref).id == first.id and facade.expert(ref).aliases == (ref,)
    moved = facade.set_alias(task.name, "prod", second.name, by="bob")
    assert (moved.from_expert, moved.to_expert) == (first.name, second.name)
    assert facade.expert(ref).id == second.id and facade.expert(first.id).aliases == ()
    # The same target again is no move, and no history row.
    assert facade.set_alias(task.name, "prod", second.name, by="bob") is None
    assert [(a.ref, a.expert_name) for a in facade.aliases(task.name)] == [(ref, second.name)]

    removed = facade.unset_alias(task.name, "prod", by="carol")
    assert (removed.from_expert, removed.to_expert) == (second.name, None)
    history = facade.alias_history(task.name)
    assert [(m.from_expert, m.to_expert, m.moved_by) for m in history] == [
        (None, first.name, "alice"),
        (first.name, second.name, "bob"),
        (second.name, None, "carol"),
    ]
    assert history[0].moved_at <= history[1].moved_at <= history[2].moved_at
    with pytest.raises(NotFoundError, match=f"task {task.name} has no alias 'prod'"):
        facade.expert(ref)
    with pytest.raises(NotFoundError, match="has no alias 'prod'"):
        facade.unset_alias(task.name, "prod")


def test_an_alias_names_only_a_ready_expert_of_its_own_task(lib, facade):
    task, other = lib.task("own"), lib.task("other")
    mine, theirs = lib.expert("own-v1", task), lib.expert("other-v1", other)
    pending = lib.expert("own-v2", task, publish=False)
    with pytest.raises(InvalidStateError, match=f"expert {theirs.name} is an expert of task {other.name}"):
        facade.set_alias(task.name, "prod", theirs.name)
    with pytest.raises(InvalidStateError, match="only ready experts are aliased"):
        facade.set_alias(task.name, "prod", pending.name)
    with pytest.raises(InvalidNameError, match="alias"):
        facade.set_alias(task.name, "prod'; drop table experts; --", mine.name)
    with pytest.raises(NotFoundError, match="no task"):
        facade.expert(f"nope-{lib.unique}@prod")
    assert facade.aliases(task.name) == [] and facade.alias_history(task.name) == []


def test_retiring_an_aliased_expert_is_refused_unless_forced(lib, facade):
    task = lib.task("retire")
    expert = lib.expert("retire-v1", task)
    facade.set_alias(task.name, "prod", expert.name, by="alice")
    facade.set_alias(task.name, "canary", expert.name, by="alice")
    version = facade.context.library.library_version()
    with pytest.raises(InvalidStateError, match=f"aliased as {task.name}@canary, {task.name}@prod"):
        facade.retire(expert.name)
    assert facade.expert(expert.id).status == "ready"
    assert facade.context.library.library_version() == version

    retired = facade.retire(expert.name, force=True, by="ops")
    assert retired.status == "retired" and facade.aliases(task.name) == []
    assert [(m.alias, m.to_expert, m.moved_by) for m in facade.alias_history(task.name)][-2:] == [
        ("canary", None, "ops"),
        ("prod", None, "ops"),
    ]


def test_concurrent_moves_apply_one_after_the_other(lib, facade):
    task = lib.task("race")
    experts = [lib.expert(f"race-v{i}", task) for i in range(3)]
    errors: list[BaseException] = []

    def mover(offset: int) -> None:
        try:
            for step in range(6):
                facade.set_alias(task.name, "prod", experts[(offset + step) % 3].id, by=f"m{offset}")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    history = facade.alias_history(task.name, "prod")
    # Serialised moves form one chain: each starts where the previous one ended.
    assert history[0].from_expert is None
    assert all(a.to_expert == b.from_expert for a, b in zip(history, history[1:], strict=False))
    assert facade.expert(f"{task.name}@prod").name == history[-1].to_expert


def test_prefer_alias_votes_only_for_each_tasks_aliased_expert(fresh_registry, unique):
    lib = Lib(fresh_registry, unique)
    task, other = lib.task("pin"), lib.task("free")
    query = _axis(0)
    pinned = lib.expert("pin-v1", task, [_axis(0, 1, 0.5)])
    newest = lib.expert("pin-v2", task, [_axis(0)])  # nearest to the query
    lib.expert("free-v1", other, [_axis(0, 1, 2.0)])
    fresh_registry.catalogue.set_alias(task.id, "prod", pinned.id, moved_by="test")
    library, version = fresh_registry.library, fresh_registry.library.library_version()
    queries = np.stack([query, query])

    for method in (RetrievalOfExperts(), NearestCentroid()):
        unpinned = Retrieval(library, lib.embedder.id, version, None, None, 100)
        assert method.tally(method.retrieve(unpinned, queries))[1][0].expert_id == newest.id
        pinned_run = Retrieval(library, lib.embedder.id, version, None, None, 100, prefer_alias="prod")
        tallies = method.tally(method.retrieve(pinned_run, queries))[1]
        # The aliased expert wins although another of its task is nearer; the task without the alias keeps
        # its expert in the vote.
        assert tallies[0].expert_id == pinned.id
        assert newest.id not in {t.expert_id for t in tallies}
    unknown = Retrieval(library, lib.embedder.id, version, None, None, 100, prefer_alias="nope")
    assert RetrievalOfExperts().retrieve(unknown, queries).tallies[0].expert_id == newest.id


# -- tags and descriptions -----------------------------------------------------------------------------------
def test_tags_and_descriptions_within_their_limits(lib, facade):
    task = lib.task("tagged", tags={"owner": "nlp"}, description="# QA")
    assert facade.task(task.name).tags == {"owner": "nlp"}
    expert = lib.expert("tagged-v1", task)
    tagged = facade.tag_expert(expert.name, {"owner": "nlp", "stage": "beta"}, description="**beta**")
    assert tagged.tags == {"owner": "nlp", "stage": "beta"} and tagged.description == "**beta**"
    assert facade.tag_expert(expert.id, remove=["stage"], description="").tags == {"owner": "nlp"}
    assert facade.expert(expert.id).description is None

    with pytest.raises(UserError, match=f"longer than the {TAG_VALUE_LENGTH} allowed"):
        facade.tag_expert(expert.id, {"notes": "x" * (TAG_VALUE_LENGTH + 1)})
    with pytest.raises(UserError, match=f"more than the {MAX_TAGS} allowed"):
        facade.tag_expert(expert.id, {f"k{i}": "v" for i in range(MAX_TAGS)})
    with pytest.raises(UserError, match="tag key"):
        facade.tag_task(task.name, {"bad key": "v"})
    with pytest.raises(UserError, match="no tag 'missing'"):
        facade.tag_task(task.name, remove=["missing"])
    assert facade.expert(expert.id).tags == {"owner": "nlp"}  # the refused changes wrote nothing
    with pytest.raises(UserError, match="longer than the"):
        lib.task("oversized", tags={"owner": "y" * 1000})


# -- search ----------------------------------------------------------------------------------------------------
def test_search_compiles_the_filter_into_sql(lib, facade):
    task, other = lib.task("search"), lib.task("elsewhere")
    low = lib.expert("s-low", task, metrics={"accuracy": 0.4, "note": "text"})
    high = lib.expert("s-high", task, metrics={"accuracy": 0.9, "eval": {"f1": 0.7}})
    mid = lib.expert("s-mid", other, metrics={"accuracy": 0.7})
    for expert in (low, high, mid):
        facade.tag_expert(expert.id, {"run": lib.unique, "owner": "nlp" if expert is not mid else "cv"})
    facade.set_alias(task.name, "prod", high.id)
    run = f"tags.run = '{lib.unique}'"

    def names(filter_text, **options):
        return [e.name for e in facade.search_experts(f"{run} and ({filter_text})", **options)]

    wanted = f"task = '{task.name}' and tags.owner = 'nlp' and metrics.accuracy > 0.6"
    assert names(wanted) == [high.name]
    assert names("metrics.accuracy > 0.5", order_by="metrics.accuracy desc") == [high.name, mid.name]
    assert names("metrics.accuracy >= 0", order_by="created_at desc", limit=2) == [mid.name, high.name]
    assert names("alias = 'prod'") == [high.name] and names("alias is null") == [low.name, mid.name]
    assert names("not (tags.owner = 'cv')") == [low.name, high.name]
    assert names("metrics.eval.f1 > 0.5 or name like '%s-mid%'") == [high.name, mid.name]
    # A text metric is never cast to a number: it just does not compare.
    assert names("metrics.note > 0.1") == [] and names("metrics.note = 'text'") == [low.name]
    assert names(f"task in ('{other.name}', 'x') and status = 'ready'") == [mid.name]
    [first] = facade.search_experts(run, order_by="name", limit=1)
    assert first.name == high.name and first.aliases == (f"{task.name}@prod",)


def test_sql_in_a_filter_value_is_only_a_value(lib, facade, registry):
    task = lib.task("inject")
    lib.expert("inject-v1", task)
    with registry.engine.connect() as connection:
        before = connection.scalar(text("SELECT count(*) FROM experts"))
    for value in ("x' OR '1'='1", "x''; DROP TABLE experts; --", "%' OR name LIKE '%"):
        quoted = value.replace("'", "''")
        assert facade.search_experts(f"name = '{quoted}'") == []
        assert facade.search_experts(f"tags.owner = '{quoted}' or metrics.x = '{quoted}'") == []
    with registry.engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM experts")) == before


@pytest.mark.parametrize(
    ("filter_text", "message"),
    [
        ("name = 'x' and", "unexpected end of the filter; expected a field"),
        ("name = x", "unexpected 'x' at position 8"),
        ("name = 'x'; DROP TABLE experts", "unexpected character ';' at position 11"),
        ("nme = 'x'", "unknown field 'nme' at position 1"),
        ("tags = 'x'", "needs a key"),
        ("id = 'one'", "id is a number"),
        ("created_at > 'yesterday'", "needs an ISO date"),
        ("name = 'unterminated", "unterminated string starting at position 8"),
        ("(name = 'x'", "expected ')'"),
        ("name == 'x'", "unexpected '=' at position 7"),
        ("name = 'x' name = 'y'", "unexpected 'name' at position 12; expected 'and', 'or'"),
    ],
)
def test_bad_filters_name_the_token(filter_text, message):
    with pytest.raises(FilterError) as raised:
        expert_query(filter_text)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_bad_orders_and_limits():
    with pytest.raises(FilterError, match="cannot order by 'tags.owner'"):
        expert_query(order_by="tags.owner")
    with pytest.raises(FilterError, match="FIELD \\[asc\\|desc\\]"):
        expert_query(order_by="name sideways")
    with pytest.raises(FilterError, match="limit must be at least 1"):
        expert_query(limit=0)


# -- the CLI ---------------------------------------------------------------------------------------------------
def test_cli_aliases_tags_and_filtered_list(lib, test_environ):
    task = lib.task("cli")
    first, second = lib.expert("cli-v1", task), lib.expert("cli-v2", task)

    def run(*args):
        result = CliRunner().invoke(cli, ["--quiet", *args], env=test_environ)
        assert result.exit_code == 0, result.output
        return result.output

    assert "-> " + first.name in run("experts", "alias", "set", task.name, "prod", first.name)
    assert f"moved from {first.name} to {second.name}" in run(
        "experts", "alias", "set", task.name, "prod", second.name
    )
    history = json.loads(run("experts", "alias", "list", task.name, "--history", "--json"))
    assert [(m["from_expert"], m["to_expert"]) for m in history] == [
        (None, first.name),
        (first.name, second.name),
    ]
    assert "owner=nlp" in run("experts", "tag", f"{task.name}@prod", "owner=nlp")
    assert "stage=beta" in run("tasks", "tag", task.name, "stage=beta", "--description", "# CLI task")
    shown = run("tasks", "show", task.name)
    assert "# CLI task" in shown and f"{task.name}@prod" in shown
    listed = json.loads(
        run(
            "experts",
            "list",
            "--status",
            "ready",
            "--filter",
            f"task = '{task.name}' and tags.owner = 'nlp'",
            "--order-by",
            "created_at desc",
            "--limit",
            "5",
            "--json",
        )
    )
    assert [(e["name"], e["aliases"]) for e in listed] == [(second.name, [f"{task.name}@prod"])]

    refused = CliRunner().invoke(cli, ["--quiet", "experts", "retire", second.name], env=test_environ)
    assert refused.exit_code == 2 and f"aliased as {task.name}@prod" in refused.output
    assert "retired" in run("experts", "retire", second.name, "--force")
