"""The ``trained`` router: a retriever fine-tuned on the library, published to S3, re-embedded side by side, routed.

Three experts whose tasks share their subjects and differ only in the question asked about them (is the writer
happy / is it about sports / is it grammatical), so the base MiniLM, which embeds by subject, confuses them on
held-out sentences: a held-out sentence of one task is closest to the same subject in another task's library. The
library labels each sample with its expert; one epoch of contrastive training on it must separate the tasks.
Everything runs on the real embedded PostgreSQL and S3; the retriever is the bundled all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import lab_environ
from sqlalchemy import text

from elmreg.cli.main import cli
from elmreg.data.prompts import PromptedExample, library_text
from elmreg.models.embedder import forget_loaded_embedders, load_embedder
from elmreg.registry.entities import StoredArtifact
from elmreg.registry.errors import ArtifactIntegrityError, UserError
from elmreg.runtime.library_embedding import embed_entries, register_embedder
from elmreg.runtime.retrievers import load_catalogued_embedder, unpacked_folder
from elmreg.trainers.retriever import expert_batches, library_pairs

SENTENCES = [
    "The team won the final match after extra time.",
    "Parliament voted on the new budget last night.",
    "The chef added too much salt to the soup.",
    "Astronomers found a new planet around a nearby star.",
    "The striker missed a penalty in the last minute.",
    "The senator gave a long speech about taxes.",
    "This bakery makes the best bread in town.",
    "The vaccine trial showed strong results.",
    "Our coach was fired after five straight losses.",
    "The election results were announced on Sunday.",
    "The pizza arrived cold and soggy.",
    "Scientists measured the speed of the glacier.",
    "The tennis player broke her racket in anger.",
    "The minister resigned over the scandal.",
    "We cooked pasta with fresh tomatoes from the garden.",
    "The telescope captured images of a distant galaxy.",
    "The marathon runners crossed the bridge at dawn.",
    "Voters waited for hours at the polling station.",
    "The restaurant's dessert menu was disappointing.",
    "The experiment was repeated three times to be sure.",
    "The goalkeeper made an incredible save.",
    "The president signed the trade agreement.",
    "The coffee at that cafe is bitter and weak.",
    "Researchers discovered a new species of frog.",
    "The basketball game went into overtime.",
    "Protesters gathered outside the city hall.",
    "Grandma's apple pie is always delicious.",
    "The rocket launch was delayed by bad weather.",
    "The cyclist crashed on the steep descent.",
    "The court ruled against the new voting law.",
]
QUESTIONS = {
    "happiness": "{s} Is the writer happy about it?",
    "sports": "{s} Is this text about sports?",
    "grammar": "Is the following sentence grammatical? {s}",
}
LIBRARY_SIZE = 12  # samples per expert; the other sentences are each task's held-out instances


def _example(task: str, sentence: str) -> PromptedExample:
    return PromptedExample(QUESTIONS[task].format(s=sentence), "yes", ("yes", "no"))


def _split() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each task's library sentences and held-out sentences; each task draws its own, so a held-out sentence of
    one task is often in another task's library (the confusion a subject-minded retriever makes)."""
    rng = random.Random(3)
    library, held_out = {}, {}
    for task in QUESTIONS:
        order = rng.sample(SENTENCES, len(SENTENCES))
        library[task], held_out[task] = order[:LIBRARY_SIZE], order[LIBRARY_SIZE:]
    return library, held_out


@pytest.fixture
def shared_subjects(lab):
    """Three ready experts whose library samples are real texts embedded by the configured MiniLM."""
    context = lab.context
    embedder = load_embedder(lab.settings.embedder)
    record = register_embedder(context.catalogue, embedder)
    backbone = context.catalogue.get_or_create_backbone("bb-shared", "causal")
    library, held_out = _split()
    experts = {}
    for task, sentences in library.items():
        expert = context.catalogue.create_expert(name=task, backbone_id=backbone.id, kind="lora")
        experts[task] = context.catalogue.publish_expert(
            expert.id,
            # The experts' weights are not what this test is about: a reference is enough for 'ready'.
            artifact=StoredArtifact(f"s3://elmreg/test/{task}", "a" * 64, 1),
            embedder_id=record.id,
            entries=embed_entries(embedder, [library_text(_example(task, s)) for s in sentences]),
        )
    return experts, held_out


def _held_out_accuracy(context, embedder, embedder_id, experts, held_out) -> float:
    """Top-1 retrieval accuracy of the held-out instances against the library, by exact search."""
    vectors, owners = [], []
    for expert in experts.values():
        for entry in context.library.entries(expert.id, embedder_id):
            vectors.append(np.asarray(entry.embedding, dtype=np.float32))
            owners.append(expert.id)
    entries, owners = np.stack(vectors), np.asarray(owners)
    correct = total = 0
    for task, sentences in held_out.items():
        queries = embedder.embed([library_text(_example(task, s)) for s in sentences])
        correct += int((owners[np.argmax(queries @ entries.T, axis=1)] == experts[task].id).sum())
        total += len(sentences)
    return correct / total


def _embedder_count(context) -> int:
    with context.engine.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM embedders")).scalar_one()


def test_trained_router_end_to_end(lab, shared_subjects, tmp_path):
    experts, held_out = shared_subjects
    context, env, runner = lab.context, lab_environ(lab), CliRunner()
    base = load_embedder(lab.settings.embedder)
    base_id = context.catalogue.get_embedder(base.name).id

    # Before any retriever exists, the router says how to get one.
    with pytest.raises(UserError, match="train one with 'elmreg library train-retriever'"):
        lab.route(["Answer Choices: yes | no, Instance: hello"], router="trained", q=None)

    # Bad input: one line, exit 2, nothing written.
    before = _embedder_count(context)
    for args, phrase in [
        (["--library-version", "1"], "at least 2 experts with library samples at library version 1, found 1"),
        (["--library-version", "9"], "library version 9 does not exist"),
        (["--name", base.name], f"an embedder named '{base.name}' exists"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
    ]:
        bad = runner.invoke(cli, ["library", "train-retriever", "-q", *args], env=env)
        assert bad.exit_code == 2, bad.output
        assert (
            phrase in bad.output
            and "Traceback" not in bad.output
            and len(bad.output.strip().splitlines()) == 1
        )
    assert _embedder_count(context) == before

    trained_run = runner.invoke(
        cli,
        ["library", "train-retriever", "--name", "retriever-1", "--epochs", "1", "--learning-rate", "1e-4"],
        env=env,
        catch_exceptions=False,
    )
    assert trained_run.exit_code == 0, trained_run.output
    pairs = len(QUESTIONS) * LIBRARY_SIZE
    assert "retriever retriever-1 (embedder id" in trained_run.stdout
    assert (
        f"{pairs} pairs of 3 experts at library version 3, 1 epoch(s), {LIBRARY_SIZE} steps"
        in trained_run.stdout
    )
    assert f"{pairs} entries re-embedded" in trained_run.stdout

    # The catalogue knows the retriever, where its weights are, what it was trained from and on.
    record = context.catalogue.get_embedder("retriever-1")
    assert record.trained and record.trained_from_id == base_id and record.dimension == base.dimension
    assert record.training["library_version"] == 3 and record.training["pairs"] == pairs
    assert sorted(record.training["experts"]) == sorted(e.id for e in experts.values())
    stored = context.artifacts.stat(record.artifact.uri)
    assert stored is not None and stored.size == record.artifact.size
    assert context.catalogue.latest_trained_embedder().id == record.id
    # gc must keep it: the retriever's archive counts as referenced.
    assert record.artifact.uri in context.catalogue.referenced_artifact_uris()

    # Every ready expert has entries for it, of the same texts as the base embedder's.
    for expert in experts.values():
        assert context.library.texts(expert.id, record.id) == context.library.texts(expert.id, base_id)

    # It separates the tasks on instances it never saw, where the base retriever confuses them.
    trained = load_catalogued_embedder(context, "retriever-1")
    before_accuracy = _held_out_accuracy(context, base, base_id, experts, held_out)
    after_accuracy = _held_out_accuracy(context, trained, record.id, experts, held_out)
    print(f"held-out top-1 retrieval accuracy: base {before_accuracy:.3f}, trained {after_accuracy:.3f}")
    assert before_accuracy < 0.8, "the base retriever should confuse these tasks, or the test proves nothing"
    assert after_accuracy >= before_accuracy + 0.15

    # route --router trained embeds with the retriever, searches its entries and records it.
    queries = tmp_path / "sports.jsonl"
    queries.write_text(
        "\n".join(
            json.dumps({"input": _example("sports", s).input, "answer_choices": ["yes", "no"]})
            for s in held_out["sports"]
        )
    )
    routed = runner.invoke(
        cli, ["route", "--input", str(queries), "--q", "16", "--router", "trained"], env=env
    )
    assert routed.exit_code == 0, routed.output
    assert (
        "chosen expert: sports" in routed.output and "router trained (embedder retriever-1)" in routed.output
    )
    with context.engine.connect() as connection:
        router, params, embedder_id = connection.execute(
            text("SELECT router, router_params, embedder_id FROM routing_decisions ORDER BY id DESC LIMIT 1")
        ).one()
    assert (router, params, embedder_id) == ("trained", {"top_k": 1, "embedder": "retriever-1"}, record.id)
    with pytest.raises(UserError, match="is not a trained retriever"):
        lab.route(
            ["Answer Choices: yes | no, Instance: hi"],
            router="trained",
            q=None,
            router_options={"embedder": base.name},
        )

    # Another machine (a clean cache) fetches the archive from S3, verifies it and gets the same retriever.
    probe = [library_text(_example("grammar", held_out["grammar"][0]))]
    expected = trained.embed(probe)
    folder = unpacked_folder(context, record)
    shutil.rmtree(folder)
    forget_loaded_embedders()
    fetched = load_catalogued_embedder(context, "retriever-1")
    assert fetched is not trained and fetched.path == str(folder) and folder.is_dir()
    np.testing.assert_allclose(fetched.embed(probe), expected, atol=1e-5)

    # An object altered in the store is refused on download, and nothing is left to load from.
    shutil.rmtree(folder)
    forget_loaded_embedders()
    bucket, key = record.artifact.uri.removeprefix("s3://").split("/", 1)
    context.artifacts.client.put_object(
        Bucket=bucket, Key=key, Body=b"not the weights", Metadata={"sha256": record.artifact.sha256}
    )
    with pytest.raises(ArtifactIntegrityError, match="does not match the catalogue"):
        load_catalogued_embedder(context, "retriever-1")
    assert not folder.exists()


def test_batches_never_hold_two_pairs_of_one_expert():
    # In-batch negatives must be other experts' samples: a second pair of the same expert would be a positive
    # the loss pushes away. Uneven experts, a batch size below the expert count, and a lone expert at the end.
    samples = {1: [f"a{i}" for i in range(9)], 2: [f"b{i}" for i in range(5)], 3: [f"c{i}" for i in range(2)]}
    samples[4] = ["only one"]  # no positive for it: no pair
    pairs = library_pairs(samples, seed=0)
    assert len(pairs) == 16 and {e for e, _, _ in pairs} == {1, 2, 3}
    assert all(a != p and a[0] == p[0] for _, a, p in pairs)  # a positive is another sample of its expert
    batches = expert_batches(pairs, batch_size=2, seed=0)
    for batch in batches:
        assert 2 <= len(batch) <= 2 and len({e for e, _, _ in batch}) == len(batch)
    used = [pair for batch in batches for pair in batch]
    assert len(used) == len(set(used))
    # Only pairs that would have been alone are left out (here: expert 1 outlasts the others).
    assert {e for e, _, _ in set(pairs) - set(used)} <= {1}
    assert expert_batches(pairs, 2, seed=0) == batches  # seeded
