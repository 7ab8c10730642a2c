"""A supervised retriever (the ``trained`` router): the sentence encoder fine-tuned on the library itself.

RoE's retriever was trained for general sentence similarity, so two tasks about the same subject look alike to it
even when their instructions differ. The library already labels every sample with its expert, which is exactly
the supervision a retriever needs: pairs of samples of one expert are positives, and with
MultipleNegativesRankingLoss the other pairs of the batch are the negatives. Batches hold at most one pair per
expert, so no negative is in truth a positive. Only library samples are used (never evaluation data), so the
held-out tasks of an evaluation stay unseen by the retriever too.

The trained encoder is saved as a sentence-transformers folder, uploaded to the artifact store and registered as
a new embedder (``runtime.retrievers``), and the library is re-embedded with it side by side; the ``trained``
router then runs RoE over those entries.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elmreg.registry.entities import Expert
from elmreg.registry.errors import AlreadyExistsError, NotFoundError, UserError
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.context import RegistryContext
from elmreg.runtime.library_embedding import reembed_library
from elmreg.runtime.retrievers import adopt_folder, load_catalogued_embedder, publish_retriever

# (expert id, anchor text, positive text)
Pair = tuple[int, str, str]


@dataclass(frozen=True)
class RetrieverConfig:
    """How a retriever is fine-tuned."""

    epochs: int = field(default=2, metadata={"help": "Passes over the library's pairs."})
    batch_size: int = field(
        default=16,
        metadata={
            "help": "Pairs per step, at most one per expert (fewer when the library has fewer experts)."
        },
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    seed: int = field(
        default=0, metadata={"help": "Seeds the pairs, the batches, dropout and the optimiser."}
    )

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            # One pair has no other pair to serve as its negative.
            raise UserError(f"--batch-size must be at least 2, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True)
class RetrieverReport:
    """What ``elmreg library train-retriever`` prints."""

    embedder: str
    embedder_id: int
    source: str
    library_version: int
    experts: int
    pairs: int
    epochs: int
    steps: int
    final_loss: float
    seconds: float
    entries: int


def library_pairs(samples: Mapping[int, Sequence[str]], seed: int) -> list[Pair]:
    """Every sample once as an anchor, with another sample of the same expert (chosen by a seeded draw) as its
    positive. Experts with fewer than two samples give no pair."""
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for expert_id in sorted(samples):
        texts = list(samples[expert_id])
        if len(texts) < 2:
            continue
        for i, anchor in enumerate(texts):
            j = rng.randrange(len(texts) - 1)
            pairs.append((expert_id, anchor, texts[j + 1 if j >= i else j]))
    return pairs


def expert_batches(pairs: Sequence[Pair], batch_size: int, seed: int) -> list[list[Pair]]:
    """The pairs in batches with at most one pair per expert, so every in-batch negative is another expert's.

    Each batch takes one pair from each of the ``batch_size`` experts with the most pairs left (ties in a seeded
    order), which spreads every expert over the whole epoch. Pairs that would end up alone in a batch are left
    out: with no other pair, there is nothing to contrast them with.
    """
    rng = random.Random(seed)
    left: dict[int, list[Pair]] = {}
    for pair in pairs:
        left.setdefault(pair[0], []).append(pair)
    for own in left.values():
        rng.shuffle(own)
    batches: list[list[Pair]] = []
    while sum(1 for own in left.values() if own) >= 2:
        ready = [e for e, own in left.items() if own]
        tiebreak = {e: rng.random() for e in ready}
        chosen = sorted(ready, key=lambda e: (-len(left[e]), tiebreak[e]))[:batch_size]
        batches.append([left[e].pop() for e in chosen])
    return batches


def fine_tune(
    base_path: str,
    batches_per_epoch: Sequence[Sequence[list[Pair]]],
    config: RetrieverConfig,
    out_dir: Path,
    reporter: Reporter,
) -> tuple[int, float]:
    """Fine-tune a fresh copy of the encoder at ``base_path`` with MultipleNegativesRankingLoss and save it to
    ``out_dir`` as a sentence-transformers folder. Returns the steps taken and the last step's loss."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(config.seed)
    # A fresh copy: the process-wide embedder that routes with the base weights must not change under anyone.
    model = SentenceTransformer(base_path, device="cpu")
    for name, parameter in model.named_parameters():
        # The token embedding table is half of MiniLM's weights, and a step touches only its batch's rows:
        # training it costs as much optimiser work as the rest together and moves words the library never shows.
        parameter.requires_grad = "embeddings" not in name
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    total = sum(len(batches) for batches in batches_per_epoch)
    step, loss_value = 0, float("nan")
    model.train()
    reporter.start("training", total)
    for batches in batches_per_epoch:
        for batch in batches:
            anchors = model.preprocess([anchor for _, anchor, _ in batch])
            positives = model.preprocess([positive for _, _, positive in batch])
            loss = loss_fn([anchors, positives], None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, loss_value = step + 1, float(loss.detach())
            reporter.advance(step, detail=f"loss {loss_value:.4f}")
    reporter.finish()
    model.eval()
    model.save_pretrained(str(out_dir))
    return step, loss_value


def _visible_experts(experts: Sequence[Expert], version: int) -> list[Expert]:
    """Experts routable at library version ``version`` (added by then and not retired by then)."""
    return [
        e
        for e in experts
        if e.status in ("ready", "retired")
        and e.library_version is not None
        and e.library_version <= version
        and (e.retired_at_version is None or e.retired_at_version > version)
    ]


def _embedder_exists(context: RegistryContext, name: str) -> bool:
    try:
        context.catalogue.get_embedder(name)
    except NotFoundError:
        return False
    return True


def train_retriever(
    context: RegistryContext,
    *,
    name: str | None = None,
    config: RetrieverConfig | None = None,
    library_version: int | None = None,
    source: str | None = None,
    reporter: Reporter = SILENT,
) -> RetrieverReport:
    """Fine-tune ``source`` (default: the configured embedder) on its library entries at ``library_version``,
    publish it as the embedder ``name`` and give every ready or retired expert entries for it.

    Raises:
        UserError: An existing name, a library version that does not exist, no entries for ``source``, or fewer
            than two experts with at least two library samples; nothing is written.
    """
    config = config or RetrieverConfig()
    started = time.perf_counter()
    current = context.library.library_version()
    version = current if library_version is None else library_version
    if version < 0 or version > current:
        raise UserError(f"library version {version} does not exist (current: {current})")
    name = name or f"retriever-v{version}-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}"
    if _embedder_exists(context, name):
        raise AlreadyExistsError(f"an embedder named '{name}' exists; choose another --name")
    source_name = source or context.settings.embedder
    try:
        source_record = context.catalogue.get_embedder(source_name)
    except NotFoundError:
        raise UserError(
            f"the library has no entries for embedder '{source_name}'; train experts first ('elmreg worker')"
        ) from None

    samples = {
        expert.id: [text for _, text in context.library.texts(expert.id, source_record.id)]
        for expert in _visible_experts(context.catalogue.list_experts(), version)
    }
    samples = {expert_id: texts for expert_id, texts in samples.items() if len(texts) >= 2}
    if len(samples) < 2:
        raise UserError(
            f"training a retriever needs at least 2 experts with library samples at library version {version}, "
            f"found {len(samples)}; train more experts first"
        )
    pairs = library_pairs(samples, config.seed)
    batches = [
        expert_batches(pairs, config.batch_size, config.seed + epoch) for epoch in range(config.epochs)
    ]

    base = load_catalogued_embedder(context, source_name)
    context.settings.cache_path.mkdir(parents=True, exist_ok=True)
    reporter.stage(
        f"fine-tuning {source_name} on {len(pairs)} pairs of {len(samples)} experts' library samples "
        f"(library version {version}), {config.epochs} epoch(s)"
    )
    with tempfile.TemporaryDirectory(dir=context.settings.cache_path) as scratch:
        folder = Path(scratch) / "retriever"
        steps, final_loss = fine_tune(base.path, batches, config, folder, reporter)
        reporter.stage(f"uploading retriever {name}")
        record = publish_retriever(
            context,
            folder,
            name=name,
            dimension=base.dimension,
            trained_from_id=source_record.id,
            training={
                **dataclasses.asdict(config),
                "library_version": version,
                "experts": sorted(samples),
                "pairs": len(pairs),
                "steps": steps,
                "final_loss": final_loss,
                "loss": "MultipleNegativesRankingLoss",
            },
        )
        adopt_folder(context, record, folder)
    trained = load_catalogued_embedder(context, name)
    reporter.stage(f"re-embedding the library with {name}")
    reembedded = reembed_library(context.catalogue, context.library, trained, source_embedder=source_name)
    return RetrieverReport(
        embedder=name,
        embedder_id=record.id,
        source=source_name,
        library_version=version,
        experts=len(samples),
        pairs=len(pairs),
        epochs=config.epochs,
        steps=steps,
        final_loss=final_loss,
        seconds=time.perf_counter() - started,
        entries=reembedded.entries,
    )
