"""promptsource's rendering rules in elmreg, one by one (no download; the whole collection is in
test_promptsource_corpus.py)."""

from __future__ import annotations

import io
import tarfile

import pytest

from elmreg.data.prompts import (
    PROMPTSOURCE_TEXT_VAR_LENGTH,
    PromptTemplate,
    load_promptsource_templates,
    render_examples,
)
from elmreg.data.sources.promptsource import ensure_promptsource, template_files
from elmreg.registry.errors import TaskSpecError

PICK = PromptTemplate.inline("{{question}} ||| {{answer_choices[label]}}", "{{a}} ||| {{b}}")


def test_separator_inside_data_does_not_move_the_split():
    plain = PromptTemplate.inline("Q: {{question}} A: {{options | join(', ')}} ||| {{answer}}")
    example = plain.render({"question": "is a ||| b?", "options": ["x ||| y", "z"], "answer": "no ||| yes"})
    assert example.input == "Q: is a ||| b? A: x ||| y, z" and example.target == "no ||| yes"
    # Inside the data the answer choices read, '|||' separates choices (a column may hold them joined by '|||');
    # the choices then hold no '|||' that could split the template.
    joined = PromptTemplate.inline("{{q}} {{answer_choices | join(' or ')}}? ||| {{target}}", "{{options}}")
    example = joined.render({"q": "colour", "options": "red|||blue ||| green", "target": "blue"})
    assert (
        example.answer_choices == ("red", "blue", "green") and example.input == "colour red or blue or green?"
    )
    assert PICK.render({"question": "which?", "a": "left", "b": "up", "label": 1}).target == "up"


def test_protected_pipes_keep_the_data_s_length_and_case():
    template = PromptTemplate.inline("{{text | length}} {{text | upper}} {{text[:7]}} ||| x")
    assert template.render({"text": "a ||| b"}).input == "7 A ||| B a ||| b"
    # A slice through a separator gives back the pipes it kept, not a marker.
    assert PromptTemplate.inline("{{text[:3]}} ||| x").render({"text": "a ||| b"}).input == "a |"


def test_a_column_named_answer_choices_is_refused():
    with pytest.raises(TaskSpecError, match="column named 'answer_choices'.*rename"):
        PICK.render({"question": "q", "a": "x", "b": "y", "label": 0, "answer_choices": ["x"]})
    with pytest.raises(TaskSpecError, match="column named 'answer_choices'"):
        PICK.validate_against(["question", "a", "b", "label", "answer_choices"])


def test_choice_is_seeded_per_task_seed_and_example():
    template = PromptTemplate.inline(
        "{{ ['Question', 'Problem', 'Query', 'Ask'] | choice }}: {{q}} ||| {{a}}"
    )
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(40)]
    first = render_examples(rows, [template], seed=1)
    assert first == render_examples(rows, [template], seed=1)
    # Per row, not per position: a row renders the same wherever it is and whatever else is rendered.
    assert render_examples(rows[::-1], [template], seed=1) == first[::-1]
    assert template.render(rows[5], seed=1) == first[5]
    # A constant list draws anew for every row (not once when the template is compiled) ...
    assert len({e.input.split(":")[0] for e in first}) == 4
    # ... and another seed draws differently.
    assert [e.input for e in render_examples(rows, [template], seed=2)] != [e.input for e in first]
    # Jinja's own random filter is seeded the same way.
    jinja_random = PromptTemplate.inline("{{ range(100) | random }} ||| x")
    assert jinja_random.render(rows[0], seed=3) == jinja_random.render(dict(rows[0]), seed=3)


def test_most_frequent_and_highlight():
    template = PromptTemplate.inline("{{ votes | most_frequent | join(',') }} {{ word | highlight }} ||| x")
    example = template.render({"votes": ["b", "a", "a", "b", "c"], "word": "hi"})
    assert example.input == "b,a <span style='color: #F08080'>hi</span>"
    assert (
        PromptTemplate.inline("{{ (votes | most_frequent) is none }} ||| x").render({"votes": []}).input
        == "True"
    )


def test_unknown_filters_are_refused_when_the_template_is_given():
    with pytest.raises(TaskSpecError, match="No filter named 'shout'"):
        PromptTemplate.inline("{{ q | shout }} ||| x")


def test_rows_a_template_skips_and_templates_without_separator():
    conditional = PromptTemplate.inline("{% if label == 1 %}{{q}} ||| yes{% endif %}")
    assert conditional.render({"q": "q", "label": 0}) is None  # renders nothing: no example, as in T0's data
    assert conditional.render({"q": "q", "label": 1}).target == "yes"
    with pytest.raises(TaskSpecError, match="has no '\\|\\|\\|'"):
        PromptTemplate(jinja="{{q}} -> {{a}}").render({"q": "q", "a": "a"})


TEMPLATES_YAML = """\
dataset: demo
templates:
  0: !Template
    answer_choices: null
    id: 0
    jinja: '{{text}} ||| {{summary}}'
    metadata: !TemplateMetadata
      original_task: true
    name: summarise
"""


def test_promptsource_templates_cut_fields_to_text_var_length(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(TEMPLATES_YAML)
    (template,) = load_promptsource_templates(path)
    assert template.text_var_length == PROMPTSOURCE_TEXT_VAR_LENGTH == 2048
    row = {"text": "word " * 1000, "summary": "short"}
    example = template.render(row)
    assert len(example.input) <= 2048 and example.input.endswith("...") and example.target == "short"
    # Inline prompts, and tasks stored before templates carried the field, render whole as they always did.
    stored = {k: v for k, v in template.to_dict().items() if k != "text_var_length"}
    assert PromptTemplate.from_dict(stored).render(row).input == ("word " * 1000).strip()
    assert PromptTemplate.from_dict(template.to_dict()) == template


def test_sdist_templates_are_extracted_into_the_cache(tmp_path):
    downloads = tmp_path / "promptsource" / "downloads"
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "promptsource-0.2.3.tar.gz", "w:gz") as tar:
        for name in ("super_glue/boolq/templates.yaml", "cosmos_qa/templates.yaml", "../evil/templates.yaml"):
            data = TEMPLATES_YAML.encode()
            info = tarfile.TarInfo(f"promptsource-0.2.3/promptsource/templates/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = template_files(ensure_promptsource(tmp_path))
    assert sorted(files) == ["cosmos_qa", "super_glue/boolq"]
    assert load_promptsource_templates(files["super_glue/boolq"])[0].name == "summarise"
