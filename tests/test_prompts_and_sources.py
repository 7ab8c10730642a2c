"""Prompt templates (promptsource format) and task sources (BIG-bench files, local files), without a database."""

from __future__ import annotations

import json

import pytest
from fixtures.bigbench_tree import write_bigbench_cache

from elmreg.data.prompts import (
    PromptTemplate,
    infer_task_type,
    library_text,
    load_promptsource_templates,
    render_examples,
    select_template,
)
from elmreg.data.sources import DatasetSpec, default_template, load_dataset_rows
from elmreg.data.sources.bigbench import BigBenchTasks
from elmreg.registry.errors import TaskSpecError

TEMPLATES_YAML = """\
dataset: super_glue
subset: boolq
templates:
  3e386463-1715-4578-9cba-07d11a0d3b61: !Template
    answer_choices: False ||| True
    id: 3e386463-1715-4578-9cba-07d11a0d3b61
    jinja: 'Passage: {{passage}}


      After reading this passage, I have a question: {{question}}? True or False?
      |||

      {% if label != -1 %}

      {{answer_choices[label]}}

      {% endif %}'
    metadata: !TemplateMetadata
      choices_in_prompt: true
      languages:
      - en
      metrics:
      - Accuracy
      original_task: true
    name: after_reading
    reference: ''
  9f4c6b0a-437b-40c0-b467-db4b7218d38d: !Template
    answer_choices: '{{choice1}} ||| {{choice2}}'
    id: 9f4c6b0a-437b-40c0-b467-db4b7218d38d
    jinja: '{{question}} ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: false
    name: pick
    reference: ''
"""


@pytest.fixture
def templates(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(TEMPLATES_YAML)
    return load_promptsource_templates(path)


def test_promptsource_yaml_is_read_natively(templates):
    assert [t.name for t in templates] == ["after_reading", "pick"]
    first = templates[0]
    assert first.original_task is True and first.choices_in_prompt is True and first.metrics == ("Accuracy",)
    assert first.required_fields() == {"passage", "question", "label"}


def test_render_matches_promptsource(templates):
    row = {"passage": "Paris is the capital of France.", "question": "is paris in france", "label": 1}
    example = templates[0].render(row)
    # YAML turns the two blank lines into "\n\n"; promptsource strips each side of '|||' and keeps the rest.
    assert example.input == (
        "Passage: Paris is the capital of France.\n\nAfter reading this passage, I have a question: "
        "is paris in france? True or False?"
    )
    assert example.target == "True" and example.answer_choices == ("False", "True")
    assert library_text(example).startswith("Answer Choices: False | True, Instance: Passage: Paris")
    # Answer choices that are themselves templates over the row.
    pick = select_template(templates, "pick").render(
        {"question": "q", "choice1": "tea", "choice2": "milk", "label": 0}
    )
    assert (pick.target, pick.answer_choices) == ("tea", ("tea", "milk"))
    # A row the template skips (label -1: no target) is left out, not trained on an empty target.
    assert templates[0].render({**row, "label": -1}) is None


def test_template_errors_name_the_problem(templates):
    with pytest.raises(TaskSpecError, match="no template 'nope'.*after_reading, pick"):
        select_template(templates, "nope")
    with pytest.raises(TaskSpecError, match="uses field 'passage'"):
        templates[0].validate_against(["question", "label"])
    with pytest.raises(TaskSpecError, match="not valid Jinja"):
        PromptTemplate.inline("{{ unclosed ||| x")
    assert library_text(PromptTemplate.inline("{{a}} ||| {{b}}").render({"a": "x", "b": "y"})) == (
        "Answer Choices: None, Instance: x"
    )


def test_dataset_level_mixes_templates_reproducibly(templates):
    rows = [
        {"passage": f"p{i}", "question": "q", "label": i % 2, "choice1": "a", "choice2": "b"}
        for i in range(40)
    ]
    first = render_examples(rows, templates, seed=3)
    assert first == render_examples(rows, templates, seed=3)
    assert {e.input.startswith("Passage:") for e in first} == {True, False}
    assert infer_task_type(first) == "classification"


@pytest.fixture
def bigbench(tmp_path):
    return BigBenchTasks(write_bigbench_cache(tmp_path) / "tasks")


def test_bigbench_multiple_choice_generative_and_subtasks(bigbench, tmp_path):
    rows = bigbench.load("colours", split="all")
    assert len(rows) == 48 and rows[0]["choices"] == ["black", "blue", "green", "red", "white", "yellow"]
    assert rows[0]["target"] == "blue" and rows[0]["input"] == "what colour is the sky ?"
    echo = bigbench.load("echo", split="all")
    assert echo[0]["choices"] is None and echo[0]["target"] == "cat one"
    both = bigbench.load("sizes", split="all")
    assert {r["subtask"] for r in both} == {"small_things", "big_things"} and len(both) == 32
    assert {r["subtask"] for r in bigbench.load("sizes", "big_things", split="all")} == {"big_things"}


def test_bigbench_splits_are_disjoint_and_stable(bigbench):
    train, validation = bigbench.load("colours", split="train"), bigbench.load("colours", split="validation")
    assert {r["idx"] for r in train}.isdisjoint({r["idx"] for r in validation})
    assert len(train) + len(validation) == 48 and validation
    assert [r["idx"] for r in bigbench.load("colours", split="validation")] == [r["idx"] for r in validation]


def test_sampling_is_seeded(tmp_path):
    write_bigbench_cache(tmp_path)
    spec = DatasetSpec("bigbench:colours", split="all")
    a = load_dataset_rows(spec, cache_dir=tmp_path, max_rows=10, seed=1)
    assert a.total == 48 and len(a.rows) == 10
    assert a.rows == load_dataset_rows(spec, cache_dir=tmp_path, max_rows=10, seed=1).rows
    assert a.rows != load_dataset_rows(spec, cache_dir=tmp_path, max_rows=10, seed=2).rows
    template = default_template(spec, a.rows)
    assert template.answer_choices and render_examples(a.rows, [template])[0].answer_choices


def test_local_jsonl_and_csv_folders(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) for i in range(6)))
    (folder / "validation.csv").write_text("q,a\nx,y\n")
    train = load_dataset_rows(DatasetSpec(str(folder)), cache_dir=tmp_path / "c")
    assert train.total == 6 and train.columns == ["a", "q"]
    assert load_dataset_rows(DatasetSpec(str(folder), split="validation"), cache_dir=tmp_path / "c").rows == [
        {"q": "x", "a": "y"}
    ]
    with pytest.raises(TaskSpecError, match="no split 'test'; available: train, validation"):
        load_dataset_rows(DatasetSpec(str(folder), split="test"), cache_dir=tmp_path / "c")
    with pytest.raises(TaskSpecError, match="needs a prompt"):
        default_template(DatasetSpec(str(folder)), train.rows)
