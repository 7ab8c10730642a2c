"""Bad input over every verb: one line saying what is wrong, the right exit code, nothing written.

One table, one row per way a new user or an operator gets it wrong: malformed files, templates that try to leave
the sandbox or exhaust memory, numbers out of range, unknown names and ids, names with SQL, unicode and path
separators, outputs that cannot be written, foreign adapters, wrong S3 keys, unreachable servers. Every row runs
against one shared catalogue that holds registered tasks and ready experts (so that verbs get far enough to meet
the bad input) and checks, besides the exit code and the message, that the row count of every table of the
schema, the alembic revision, the bucket's objects and the list of buckets are what they were before.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import lab_environ
from fixtures.bigbench_tree import write_bigbench_cache
from sqlalchemy import text

from elmreg.api import Registry
from elmreg.cli.main import cli
from elmreg.registry.store import schema
from elmreg.runtime.context import RegistryContext

FAST = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}
MB = 1024 * 1024
_MISTYPED_BUCKET = "elmreg-mistypd"


def _write_files(files: Path) -> None:
    """The malformed (and a few well-formed) inputs the rows name as {files}/..."""
    good = {"input": "what colour is the sky ?", "answer_choices": ["blue", "red"]}
    (files / "good.jsonl").write_text(json.dumps(good) + "\n")
    (files / "broken.jsonl").write_text(json.dumps(good) + '\n{"input": "what colour\n')
    (files / "latin1.jsonl").write_bytes(b'{"input": "caf\xe9 au lait"}\n')
    (files / "huge.jsonl").write_text(json.dumps({"input": "a " * (5 * MB // 2)}) + "\n")
    (files / "empty.jsonl").write_text("")
    (files / "array.jsonl").write_text("[1, 2, 3]\n")
    rows = [{"question": f"is {w} a colour ?", "answer": a} for w, a in (("red", "yes"), ("cat", "no"))] * 8
    (files / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (files / "data-latin1.jsonl").write_bytes(b'{"question": "caf\xe9 ?", "answer": "no"}\n' * 8)
    (files / "data-broken.jsonl").write_text(json.dumps(rows[0]) + '\n{"question": \n')
    (files / "data-empty.jsonl").write_text("")
    (files / "data-huge.jsonl").write_text(json.dumps({"question": "x" * 5 * MB, "answer": "no"}) + "\n")
    (files / "templates-latin1.yaml").write_bytes(b"templates:\n  a: {jinja: 'caf\xe9 ||| x'}\n")
    (files / "templates-broken.yaml").write_text("templates: {a: [\n")
    (files / "experiment-broken.yaml").write_text("name: [unclosed\n")
    (files / "a-file").write_text("a file where a folder is expected\n")
    # Spill files of a server's unwritten routing decisions, as 'audit replay' reads them.
    (files / "spill-broken.jsonl").write_text('{"decision_id": 7, "votes": []}\n{"decision_id": 8, "rec\n')
    (files / "spill-latin1.jsonl").write_bytes(b'{"decision_id": 7, "record": {"caller_label": "caf\xe9"}}\n')
    (files / "not-peft").mkdir()
    (files / "not-peft" / "README.md").write_text("just a folder\n")
    pickled = files / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    # The bytes of a torch.save pickle are never read: the refusal must come from the file's kind alone.
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x02carbitrary\nobject\nq\x00.")
    broken_config = files / "broken-config"
    broken_config.mkdir()
    (broken_config / "adapter_config.json").write_bytes(b'{"peft_type": "LO\xff')
    (broken_config / "adapter_model.safetensors").write_bytes(b"\x00" * 16)


@pytest.fixture(scope="module")
def catalogue(
    registry: RegistryContext, settings, tiny_backbones, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    """A catalogue of its own (database on the session's server, bucket prefix of its own) with three tasks:
    colours and moods with ready experts, echo whose expert is retired; and the files the rows read."""
    database = f"elmreg_badinput_{uuid.uuid4().hex[:8]}"
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE DATABASE {database}"))
    root = tmp_path_factory.mktemp("bad-input")
    cache = root / "cache"
    write_bigbench_cache(cache)
    lab = Registry(
        settings.replace(
            database_url=registry.engine.url.set(database=database).render_as_string(hide_password=False),
            s3_prefix=f"bad-input-{uuid.uuid4().hex[:8]}/",
            cache_dir=cache,
            backbone=tiny_backbones["causal"],
            device="cpu",
        )
    )
    schema.upgrade(lab.context.engine)
    for name in ("colours", "moods"):
        lab.add_task(f"bigbench:{name}", max_examples=8, training=FAST)
    lab.add_task("bigbench:echo", max_examples=8, training=FAST, kind="lora")
    assert all(job.status == "succeeded" for job in lab.train())
    lab.retire("echo")
    files = root / "files"
    files.mkdir()
    _write_files(files)
    lab.export_expert("colours", files / "exported")
    lab.backup(files / "backup")
    endpoints = lab.context.endpoints
    yield {
        "registry": lab,
        "env": lab_environ(lab),
        "files": files,
        "s3": endpoints.s3_endpoint_url,
        "nodb": f"postgresql+psycopg://postgres@/elmreg?host={root}",
        # Rows that must reach S3 use an empty weights cache: a cached copy would answer without asking S3.
        "nocache": str(root / "empty-cache"),
    }
    lab.close()
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
    shutil.rmtree(root, ignore_errors=True)


def _snapshot(lab: Registry) -> dict[str, Any]:
    """Everything a bad input must leave alone: every table's row count, the schema revision, the bucket."""
    with lab.context.engine.connect() as connection:
        tables = connection.scalars(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
        ).all()
        counts = {t: connection.scalar(text(f'SELECT count(*) FROM "{t}"')) for t in tables}
        revision = connection.scalar(text("SELECT version_num FROM alembic_version"))
    client, bucket = lab.context.artifacts.client, lab.context.endpoints.s3_bucket
    keys = sorted(
        (o["Key"], o["Size"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    )
    buckets = sorted(b["Name"] for b in client.list_buckets().get("Buckets", []))
    return {"counts": counts, "revision": revision, "objects": keys, "buckets": buckets}


def _row(verb: str, args: list[str], code: int, phrase: str, env: dict[str, str] | None = None):
    shown = " ".join(args).replace("{files}/", "") + (f" {sorted(env)}" if env else "")
    return pytest.param(
        args, env or {}, code, phrase, id=f"{verb}: {shown.encode('unicode_escape').decode()[:110]}"
    )


TPL = "{{question}} ||| {{answer}}"
DATA = ["add-task", "--dataset", "{files}/data.jsonl", "--answer-choices", "no ||| yes"]
GOOD = "{files}/good.jsonl"  # one instance: routing rows pass --q 1
ROWS = [
    # -- add-task: files, templates, numbers, names --------------------------------------------------------
    _row(
        "add-task", ["add-task", "--dataset", "{files}/data-broken.jsonl", "--prompt", TPL], 2, "cannot read"
    ),
    _row("add-task", ["add-task", "--dataset", "{files}/data-latin1.jsonl", "--prompt", TPL], 2, "UTF-8"),
    _row("add-task", ["add-task", "--dataset", "{files}/data-empty.jsonl", "--prompt", TPL], 2, "empty"),
    _row("add-task", ["add-task", "--dataset", "{files}/data-huge.jsonl", "--prompt", TPL], 2, "too large"),
    _row("add-task", [*DATA, "--prompt", "{{ question ||| {{answer}}"], 2, "not valid Jinja"),
    _row("add-task", [*DATA, "--prompt", "{{ question.__class__.__mro__ }} ||| {{answer}}"], 2, "unsafe"),
    _row("add-task", [*DATA, "--prompt", "{{ cycler.__init__.__globals__ }} ||| {{answer}}"], 2, "unsafe"),
    _row("add-task", [*DATA, "--prompt", "{{ lipsum.__globals__['os'] }} ||| {{answer}}"], 2, "unsafe"),
    _row("add-task", [*DATA, "--prompt", "{{ range(10**9)|list }} ||| {{answer}}"], 2, "too large"),
    _row("add-task", [*DATA, "--prompt", "{{ 'a' * 10**10 }} ||| {{answer}}"], 2, "too large"),
    _row("add-task", [*DATA, "--prompt", "{{ 10 ** (10 ** 10) }} ||| {{answer}}"], 2, "too large"),
    _row(
        "add-task",
        [
            *DATA,
            "--prompt",
            "{% for i in range(9999) %}{% for j in range(9999) %}x{% endfor %}{% endfor %}|||a",
        ],
        2,
        "too large",
    ),
    _row("add-task", [*DATA, "--prompt", "{{ questoin }} ||| {{answer}}"], 2, "uses field 'questoin'"),
    _row(
        "add-task",
        [*DATA, "--template-file", "{files}/templates-latin1.yaml", "--level", "dataset"],
        2,
        "UTF-8",
    ),
    _row("add-task", [*DATA, "--template-file", "{files}/templates-broken.yaml"], 2, "not valid YAML"),
    _row("add-task", [*DATA, "--prompt", TPL, "--max-examples", "0"], 2, "0 is not in the range"),
    _row("add-task", [*DATA, "--prompt", TPL, "--epochs", "-1"], 2, "-1 is not in the range"),
    _row("add-task", [*DATA, "--prompt", TPL, "--learning-rate", "-0.1"], 2, "not in the range"),
    _row("add-task", [*DATA, "--prompt", TPL, "--name", "x'); DROP TABLE tasks;--"], 2, "task name"),
    _row("add-task", [*DATA, "--prompt", TPL, "--name", "../../etc/passwd"], 2, "task name"),
    _row("add-task", [*DATA, "--prompt", TPL, "--name", "tâche"], 2, "task name"),
    _row("add-task", [*DATA, "--prompt", TPL, "--name", "two words"], 2, "task name"),
    _row("add-task", [*DATA, "--prompt", TPL, "--name", "colours"], 2, "already exists"),
    _row("add-task", ["add-task", "--dataset", "bigbench:no_such_task"], 2, "no_such_task"),
    # -- worker ----------------------------------------------------------------------------------------------
    _row("worker", ["worker", "--once", "--lease", "0"], 2, "not in the range"),
    _row("worker", ["worker", "--once", "--poll", "-1"], 2, "not in the range"),
    # -- route ----------------------------------------------------------------------------------------------
    _row("route", ["route", "--input", "{files}/broken.jsonl"], 2, "line 2 is not valid JSON"),
    _row("route", ["route", "--input", "{files}/latin1.jsonl"], 2, "UTF-8"),
    _row("route", ["route", "--input", "{files}/huge.jsonl"], 2, "MB"),
    _row("route", ["route", "--input", "{files}/empty.jsonl"], 2, "holds no instances"),
    _row("route", ["route", "--input", "{files}/array.jsonl"], 2, "not a JSON object"),
    _row("route", ["route", "--input", GOOD, "--q", "0"], 2, "not in the range"),
    _row("route", ["route", "--input", GOOD, "--top-k", "-1"], 2, "not in the range"),
    _row(
        "route", ["route", "--input", GOOD, "--q", "1", "--library-version", "999"], 2, "library version 999"
    ),
    _row("route", ["route", "--input", GOOD, "--q", "1", "--task", "no-such-task"], 2, "no-such-task"),
    # -- predict ---------------------------------------------------------------------------------------------
    _row(
        "predict",
        ["predict", "--input", GOOD, "--route", "roe", "--out", "{files}/a-file/out.jsonl"],
        2,
        "cannot write",
    ),
    _row("predict", ["predict", "--input", GOOD, "--route", "roe", "--out", "{files}"], 2, "is a directory"),
    _row(
        "predict",
        ["predict", "--input", GOOD, "--out", "{files}/no-such-folder/out.jsonl"],
        2,
        "cannot write",
    ),
    _row("predict", ["predict", "--input", "{files}/latin1.jsonl", "--route", "roe"], 2, "UTF-8"),
    _row("predict", ["predict", "--input", GOOD, "--expert", "no-such-expert"], 2, "no-such-expert"),
    _row("predict", ["predict", "--input", GOOD, "--compose", "0"], 2, "not in the range"),
    # -- eval ------------------------------------------------------------------------------------------------
    _row("eval", ["eval", "--task", "colours", "--route", "base", "--limit", "0"], 2, "not in the range"),
    _row("eval", ["eval", "--task", "colours", "--route", "base", "--limit", "-5"], 2, "not in the range"),
    _row("eval", ["eval", "--task", "colours", "--q", "0"], 2, "not in the range"),
    _row("eval", ["eval", "--task", "no-such-task"], 2, "no-such-task"),
    _row("eval", ["eval", "--task", "colours", "--route", "expert:no-such-expert"], 2, "no-such-expert"),
    # -- merge -----------------------------------------------------------------------------------------------
    _row("merge", ["merge", "colours", "moods", "--name", "../evil"], 2, "expert name"),
    _row("merge", ["merge", "colours", "moods", "--name", "m'; DELETE FROM experts;--"], 2, "expert name"),
    _row("merge", ["merge", "colours", "moods", "--name", "bad\x07name"], 2, "expert name"),
    _row("merge", ["merge", "colours", "no-such-expert"], 2, "no-such-expert"),
    _row("merge", ["merge", "colours", "moods", "--density", "2"], 2, "not in the range"),
    _row(
        "merge",
        ["merge", "colours", "moods", "--tune-on", "colours", "--tune-limit", "0"],
        2,
        "not in the range",
    ),
    _row("merge", ["merge", "colours", "echo"], 2, "retired"),
    # -- experts export / import / retire --------------------------------------------------------------------
    _row("experts export", ["experts", "export", "colours", "--out", "{files}/a-file/x"], 2, "cannot write"),
    _row(
        "experts export", ["experts", "export", "no-such-expert", "--out", "{files}/x"], 2, "no-such-expert"
    ),
    _row(
        "experts export",
        ["experts", "export", "colours", "--out", "{files}/x"],
        2,
        _MISTYPED_BUCKET,
        {"ELMREG_S3_BUCKET": _MISTYPED_BUCKET, "ELMREG_CACHE_DIR": "{nocache}"},
    ),
    _row(
        "experts export",
        ["experts", "export", "colours", "--out", "{files}/x"],
        2,
        "rejected the credentials",
        {
            "ELMREG_S3_ENDPOINT_URL": "{s3}",
            "ELMREG_S3_ACCESS_KEY_ID": "nobody",
            "ELMREG_S3_SECRET_ACCESS_KEY": "x",
            "ELMREG_CACHE_DIR": "{nocache}",
        },
    ),
    _row(
        "experts import",
        ["experts", "import", "{files}/not-peft", "--task", "colours"],
        2,
        "not a PEFT adapter",
    ),
    _row("experts import", ["experts", "import", "{files}/pickled", "--task", "colours"], 2, "safetensors"),
    _row(
        "experts import",
        ["experts", "import", "{files}/broken-config", "--task", "colours"],
        2,
        "adapter_config.json",
    ),
    _row(
        "experts import",
        ["experts", "import", "{files}/exported", "--task", "no-such-task"],
        2,
        "no-such-task",
    ),
    _row(
        "experts import",
        ["experts", "import", "{files}/exported", "--task", "colours", "--name", "a/b"],
        2,
        "expert name",
    ),
    _row("experts retire", ["experts", "retire", "echo"], 2, "already retired"),
    _row("experts retire", ["experts", "retire", "999999"], 2, "999999"),
    # -- aliases, tags and search ---------------------------------------------------------------------------
    _row("experts alias", ["experts", "show", "colours@prod"], 2, "task colours has no alias 'prod'"),
    _row("experts alias", ["experts", "export", "nope@prod", "--out", "{files}/x"], 2, "no task 'nope'"),
    _row(
        "experts alias", ["experts", "alias", "set", "colours", "prod", "moods"], 2, "an expert of task moods"
    ),
    _row("experts alias", ["experts", "alias", "set", "colours", "prod'--", "colours"], 2, "alias"),
    _row("experts alias", ["experts", "alias", "unset", "colours", "prod"], 2, "has no alias 'prod'"),
    _row("experts list", ["experts", "list", "--filter", "name = 'x' and"], 2, "end of the filter"),
    _row("experts list", ["experts", "list", "--filter", "nme = 'x'"], 2, "unknown field 'nme'"),
    _row(
        "experts list",
        ["experts", "list", "--filter", "name = x OR 1 = 1"],
        2,
        "'x' at position 8",
    ),
    _row(
        "experts list", ["experts", "list", "--filter", "name = 'x'; DROP TABLE experts"], 2, "character ';'"
    ),
    _row("experts list", ["experts", "list", "--order-by", "tags.owner"], 2, "cannot order by"),
    _row("experts tag", ["experts", "tag", "colours", "owner=" + "x" * 300], 2, "longer than the 256"),
    _row("experts tag", ["experts", "tag", "colours", "bad key=v"], 2, "tag key"),
    _row("experts tag", ["experts", "tag", "colours", "owner"], 2, "not KEY=VALUE"),
    _row("tasks tag", ["tasks", "tag", "colours", "--remove", "owner"], 2, "no tag 'owner'"),
    _row("add-task", [*DATA, "--prompt", TPL, "--tag", "owner=" + "x" * 300], 2, "longer than the 256"),
    # -- audit, db, gc, library, experiment, report ------------------------------------------------------------
    _row("audit", ["audit", "--view", "decisions", "--limit", "0"], 2, "not in the range"),
    _row("audit", ["audit", "prune", "--before", "last tuesday"], 2, "last tuesday"),
    _row("audit", ["audit", "replay", "{files}/spill-broken.jsonl"], 2, "spill-broken.jsonl:2: not JSON"),
    _row("audit", ["audit", "replay", "{files}/spill-broken.jsonl"], 2, "spill-broken.jsonl:1: no 'record'"),
    _row("audit", ["audit", "replay", "{files}/spill-latin1.jsonl"], 2, "spill-latin1.jsonl:1: not UTF-8"),
    _row("audit", ["audit", "replay", "{files}/array.jsonl"], 2, "array.jsonl:1: not a routing decision"),
    _row("audit", ["audit", "replay", "--dry-run", "{files}/empty.jsonl"], 2, "no decisions in it"),
    _row("audit", ["audit", "replay", "{files}/no-such-spill.jsonl"], 2, "no spill file"),
    # -- serve keys, scheduler --------------------------------------------------------------------------------
    _row("serve keys", ["serve", "keys", "create", "limited", "--rate", "0"], 2, "--rate must be between"),
    _row("serve keys", ["serve", "keys", "create", "limited", "--rate", "-5"], 2, "--rate must be between"),
    _row("serve keys", ["serve", "keys", "create", "limited", "--rate", "nan"], 2, "--rate must be between"),
    _row("serve keys", ["serve", "keys", "create", "limited", "--rate", "1e9"], 2, "--rate must be between"),
    _row("serve keys", ["serve", "keys", "create", "limited", "--rate", "fast"], 2, "'fast' is not a valid"),
    _row(
        "serve keys",
        ["serve", "keys", "create", "limited", "--concurrency", "0"],
        2,
        "--concurrency must be between",
    ),
    _row("scheduler", ["scheduler", "--standby-poll", "0"], 2, "not in the range"),
    _row("db", ["db", "upgrade", "no_such_revision"], 2, "no_such_revision"),
    _row("db", ["db", "downgrade", "no_such_revision", "--yes"], 2, "no_such_revision"),
    _row("gc", ["gc", "--min-age-hours", "-1"], 2, "not in the range"),
    _row(
        "library reembed", ["library", "reembed", "--embedder", "{files}/no-such-model"], 2, "no-such-model"
    ),
    _row("experiment", ["experiment", "run", "no-such-preset"], 2, "no-such-preset"),
    _row("experiment", ["experiment", "run", "{files}/experiment-broken.yaml"], 2, "experiment-broken.yaml"),
    _row("report", ["report", "--out", "{files}/a-file/report.html"], 2, "cannot write"),
    _row("report", ["report", "--out", "{files}"], 2, "is a directory"),
    # -- backup and restore ----------------------------------------------------------------------------------
    _row("backup", ["backup", "{files}/a-file/backup"], 2, "cannot write the backup"),
    _row("backup", ["backup", "{files}/backup"], 2, "not an empty folder"),
    _row("restore", ["restore", "{files}/backup"], 2, "catalogue that is not empty"),
    _row("restore", ["restore", "{files}/not-peft"], 2, "no manifest.json"),
    # -- the environment -----------------------------------------------------------------------------------
    _row(
        "env",
        ["tasks", "list"],
        2,
        "ELMREG_DATABASE_URL",
        {"ELMREG_DATABASE_URL": "postgresql+psycopg://u@h:port/db"},
    ),
    _row(
        "env",
        ["tasks", "list"],
        2,
        "ELMREG_DATABASE_URL",
        {"ELMREG_DATABASE_URL": "postgresql+nodriver://u@h/db"},
    ),
    _row("env", ["tasks", "list"], 1, "cannot reach the catalogue", {"ELMREG_DATABASE_URL": "{nodb}"}),
    _row(
        "env",
        ["experts", "export", "colours", "--out", "{files}/x"],
        1,
        "S3",
        {
            "ELMREG_S3_ENDPOINT_URL": "http://127.0.0.1:9",
            "ELMREG_S3_ACCESS_KEY_ID": "a",
            "ELMREG_S3_SECRET_ACCESS_KEY": "b",
            "ELMREG_CACHE_DIR": "{nocache}",
        },
    ),
]


def _fill(value: str, catalogue: dict[str, Any]) -> str:
    # Not str.format: the templates in the rows have braces of their own.
    for key in ("files", "s3", "nodb", "nocache"):
        value = value.replace("{" + key + "}", str(catalogue[key]))
    return value


@pytest.mark.parametrize(("args", "env", "code", "phrase"), ROWS)
def test_bad_input_is_one_line_and_writes_nothing(catalogue, args, env, code, phrase):
    lab = catalogue["registry"]
    before = _snapshot(lab)
    args = ["--quiet", *[_fill(a, catalogue) for a in args]]
    environ = {**catalogue["env"], **{k: _fill(v, catalogue) for k, v in env.items()}}
    result = CliRunner().invoke(cli, args, env=environ)
    output = result.output.strip()
    # No exception escaped click (an escaped one would be a traceback on a terminal).
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, output
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert phrase in output, output
    assert _snapshot(lab) == before
    leftovers = {p.name for p in catalogue["files"].iterdir()} - _INPUT_NAMES
    assert not leftovers, f"written next to the inputs: {leftovers}"


_INPUT_NAMES = {
    "good.jsonl",
    "broken.jsonl",
    "latin1.jsonl",
    "huge.jsonl",
    "empty.jsonl",
    "array.jsonl",
    "data.jsonl",
    "data-latin1.jsonl",
    "data-broken.jsonl",
    "data-empty.jsonl",
    "data-huge.jsonl",
    "templates-latin1.yaml",
    "templates-broken.yaml",
    "experiment-broken.yaml",
    "a-file",
    "spill-broken.jsonl",
    "spill-latin1.jsonl",
    "not-peft",
    "pickled",
    "broken-config",
    "exported",
    "backup",
}


def test_the_table_covers_every_verb_the_issue_names():
    verbs = {p.id.split(":")[0] for p in ROWS}
    named = {"add-task", "worker", "route", "predict", "eval", "merge", "experts export", "experts import"}
    named |= {"experts retire", "audit", "db", "gc", "library reembed", "experiment", "report", "env"}
    named |= {"backup", "restore", "serve keys", "scheduler"}
    assert named <= verbs and len(ROWS) >= 40


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ question * 2 }} ||| {{ answer }}", "qq"),
        ("{% for i in range(3) %}{{ i }}{% endfor %} ||| {{ 2 ** 10 }}", "012"),
        ("{{ '{:>4}'.format(question) }}|{{ '%03d' % 7 }} ||| {{ ([answer] * 3) | join(',') }}", "q|007"),
        (
            "{% set ns = namespace(s='') %}{% for w in ['a', 'b'] %}{% set ns.s = ns.s ~ w %}{% endfor %}{{ ns.s }}|||x",
            "ab",
        ),
        ("{{ question | center(5) | replace(' ', '.') }} ||| {{ answer | upper }}", "..q.."),
    ],
)
def test_the_sandbox_limits_leave_ordinary_templates_alone(template, expected):
    # The limits must only stop templates that build huge values: the operators, calls and filters they watch
    # still work on prompt-sized values.
    from elmreg.data.prompts import PromptTemplate

    example = PromptTemplate.inline(template).render({"question": "q", "answer": "a"})
    assert example is not None and example.input.strip() == expected.strip()


def test_names_and_limits_are_checked_on_every_path_not_only_the_cli(catalogue, tmp_path):
    # The CLI is one way in; the Python API, manifests (the scheduler's nightly ingestion) and the store itself
    # must refuse the same names and numbers, writing nothing.
    from elmreg.registry.errors import UserError
    from elmreg.registry.names import InvalidNameError

    lab = catalogue["registry"]
    before = _snapshot(lab)
    data = str(catalogue["files"] / "data.jsonl")
    with pytest.raises(InvalidNameError, match="task name"):
        lab.add_task(data, prompt=TPL, answer_choices="no ||| yes", name="reviews; DROP TABLE tasks")
    with pytest.raises(InvalidNameError, match="task name"):
        lab.context.catalogue.create_task(enqueue_training=False, name="a/b", **{"dataset": data})
    with pytest.raises(InvalidNameError, match="expert name"):
        lab.merge(["colours", "moods"], name="colours moods")
    with pytest.raises(UserError, match="limit must be at least 1"):
        lab.evaluate("colours", "base", limit=0)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "nightly.yaml").write_text(
        f"- {{dataset: '{data}', prompt: '{TPL}', answer_choices: 'no ||| yes', name: '../escape'}}\n"
    )
    report = lab.ingest(manifests)
    assert report.added == [] and len(report.failed) == 1 and "task name" in report.failed[0][1]
    assert _snapshot(lab) == before
