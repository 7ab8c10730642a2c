"""From ready experts to a ready merged expert: check, (tune,) merge, upload (verified), publish in one transaction.

The order keeps the catalogue and the bucket honest. Everything that can be refused is refused before anything
is written: fewer than two experts, unknown ids, experts that are not ready, different backbones or kinds,
weights that do not match, methods that do not fit the kind, different shapes or ranks (read from the weight
files' headers while merging into a local temporary file). Only then is the merged file uploaded (verified,
content-addressed), and the catalogue records the expert, its lineage, its library entries and a new library
version in one transaction. A crash in between leaves at most an unreferenced object that ``elmreg gc`` removes.

The same merge (same parents, weights, method and parameters) is made once: its signature is stored in
``merge_params`` and a lock on it serialises concurrent requests, so the second caller finds the first one's expert.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from elmreg.merging.lora import check_lora_configs, peft_combination
from elmreg.merging.methods import LORA_METHODS, MergeError, MergeSpec
from elmreg.merging.tuning import tune_weights
from elmreg.merging.weights import scratch_dir, write_merged_weights
from elmreg.registry.entities import Expert, LibraryEntry
from elmreg.registry.errors import NotFoundError
from elmreg.registry.gc import publishing_artifacts
from elmreg.registry.kinds import get_expert_kind, weights_kind
from elmreg.registry.names import EXPERT_NAME_LENGTH, check_expert_name, derived_expert_name
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.context import RegistryContext

LIBRARY_MODES = ("union", "none")
_NAME_LENGTH = EXPERT_NAME_LENGTH


@dataclass(frozen=True)
class MergeResult:
    """A merged expert, whether it already existed, and how the merge went.

    Attributes:
        expert: The ready merged expert.
        reused: True when an identical merge was already in the catalogue (nothing new was written).
        seconds: Wall time of the whole call.
        merge_seconds: Time spent writing the merged weights (0 when reused).
        tuning: The weight search's table and choice, with ``tune_on``.
    """

    expert: Expert
    reused: bool
    seconds: float
    merge_seconds: float = 0.0
    tuning: dict[str, Any] | None = None


def resolve_parents(context: RegistryContext, keys: Sequence[int | str]) -> tuple[list[Expert], str]:
    """The experts to merge and their common weights kind.

    Raises:
        MergeError: Fewer than two, the same one twice, not ready, different backbones or kinds.
        NotFoundError: An unknown id or name.
    """
    if len(keys) < 2:
        raise MergeError(f"merging needs at least 2 experts, got {len(keys)}")
    parents = [context.catalogue.get_expert(key) for key in keys]
    if len({p.id for p in parents}) != len(parents):
        raise MergeError(f"an expert is named twice in {', '.join(map(str, keys))}; give each one once")
    for parent in parents:
        if parent.status != "ready" or parent.artifact is None:
            raise MergeError(f"expert {parent.name} is {parent.status}; only ready experts can be merged")
    if len({p.backbone_id for p in parents}) > 1:
        names = {context.catalogue.get_backbone(p.backbone_id).name for p in parents}
        raise MergeError(
            f"the experts are on different backbones ({', '.join(sorted(names))}); merge experts of one"
        )
    kinds = [weights_kind(p) for p in parents]
    if len(set(kinds)) > 1:
        listed = ", ".join(f"{p.name}: {k}" for p, k in zip(parents, kinds, strict=True))
        raise MergeError(
            f"the experts are of different kinds ({listed}); only experts of one kind can be merged"
        )
    if get_expert_kind(kinds[0]).merge is None:
        raise MergeError(f"{kinds[0]} experts cannot be merged")
    fingerprints = {p.config.get("backbone_fingerprint") for p in parents} - {None}
    if len(fingerprints) > 1:
        raise MergeError(
            "the experts were trained on different versions of their backbone (fingerprints differ)"
        )
    return parents, kinds[0]


def make_spec(
    parents: Sequence[Expert],
    base_kind: str,
    *,
    weights: Sequence[float] | None,
    method: str,
    density: float | None,
    seed: int,
) -> MergeSpec:
    """The merge's parameters, checked against the parents (default weights: 1/N each, as in the paper).

    Raises:
        MergeError: A weight count that differs from the expert count, a method for another kind, or bad values.
    """
    if weights is None:
        weights = [1.0 / len(parents)] * len(parents)
    if len(weights) != len(parents):
        raise MergeError(f"{len(weights)} weight(s) for {len(parents)} experts; give one weight per expert")
    kind = get_expert_kind(base_kind)
    if method in LORA_METHODS and kind.merge != "lora_factors":
        raise MergeError(f"method {method} merges LoRA factors; these are {base_kind} experts")
    spec = MergeSpec(method=method, weights=tuple(weights), density=density, seed=seed)
    if kind.merge == "lora_factors":
        check_lora_configs(
            [p.config.get("adapter_config") or {} for p in parents], [p.name for p in parents], method
        )
    for field in kind.merge_config:
        if len({json.dumps(p.config.get(field)) for p in parents}) > 1:
            values = ", ".join(f"{p.name}: {p.config.get(field)}" for p in parents)
            raise MergeError(f"{base_kind} experts with different {field} cannot be merged ({values})")
    return spec


def merge_signature(parents: Sequence[Expert], base_kind: str, spec: MergeSpec) -> str:
    """What identifies a merge: parents in order with their weights, the method and its parameters."""
    key = {
        "parents": [p.id for p in parents],
        "base_kind": base_kind,
        "method": spec.method,
        # Rounded so that 1/3 computed twice, or parsed from "0.3333333333", is the same merge.
        "params": {k: ([round(w, 9) for w in v] if k == "weights" else v) for k, v in spec.params().items()},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _default_name(
    context: RegistryContext, parents: Sequence[Expert], spec: MergeSpec, signature: str
) -> str:
    name = "+".join(p.name for p in parents)
    if spec.method != "task_arithmetic":
        name += f"-{spec.method}"
    if len({round(w, 9) for w in spec.weights}) > 1:
        name += "-" + ",".join(f"{w:g}" for w in spec.weights)
    name = derived_expert_name(name)[: _NAME_LENGTH - 9]
    try:
        context.catalogue.get_expert(name)
    except NotFoundError:
        return name
    return f"{name}-{signature[:8]}"


def _check_name_free(context: RegistryContext, name: str) -> None:
    check_expert_name(name)
    try:
        existing = context.catalogue.get_expert(name)
    except NotFoundError:
        return
    raise MergeError(f"an expert named '{name}' already exists (id {existing.id}); choose another --name")


def _union_entries(
    context: RegistryContext, parents: Sequence[Expert], embedder_id: int
) -> list[LibraryEntry]:
    """The parents' library entries (texts and vectors as stored, nothing re-embedded), renumbered."""
    entries: list[LibraryEntry] = []
    for parent in parents:
        for entry in context.library.entries(parent.id, embedder_id):
            entries.append(LibraryEntry(len(entries), entry.text, entry.embedding))
    return entries


def merge_experts(
    context: RegistryContext,
    keys: Sequence[int | str],
    *,
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    density: float | None = None,
    seed: int = 0,
    name: str | None = None,
    library: str = "union",
    tune_on: Sequence[str] = (),
    grid: Sequence[float] | None = None,
    tune_limit: int | None = 32,
    tune_split: str = "validation",
    reporter: Reporter = SILENT,
) -> MergeResult:
    """Merge ready experts of one kind and backbone into a new ready expert of kind ``merged``.

    See ``Registry.merge`` for the arguments. Returns the existing expert (``reused``) when the same merge was
    made before.

    Raises:
        MergeError, NotFoundError: The merge makes no sense; nothing is written to the catalogue or the bucket.
    """
    started = time.perf_counter()
    if library not in LIBRARY_MODES:
        raise MergeError(f"library must be one of {', '.join(LIBRARY_MODES)}, got '{library}'")
    parents, base_kind = resolve_parents(context, keys)
    spec = make_spec(parents, base_kind, weights=weights, method=method, density=density, seed=seed)
    if name is not None:
        _check_name_free(context, name)
    embedder_id = context.catalogue.get_embedder(context.settings.embedder).id if library == "union" else None
    tuning = None
    if tune_on:
        tasks = [context.catalogue.get_task(t) for t in tune_on]
        tuning = tune_weights(
            context,
            parents,
            base_kind,
            spec,
            tasks,
            grid=grid,
            limit=tune_limit,
            split=tune_split,
            reporter=reporter,
        )
        spec = replace(spec, weights=tuple(tuning["chosen"]))
        reporter.stage(f"chosen weights {tuning['chosen']} (mean score {tuning['chosen_score']:.2f})")

    signature = merge_signature(parents, base_kind, spec)
    with context.jobs.exclusive(f"elmreg-merge:{signature}"):
        existing = context.catalogue.find_merged_expert(signature)
        if existing is not None:
            reporter.stage(f"the same merge exists already: expert {existing.name} (id {existing.id})")
            return MergeResult(existing, True, time.perf_counter() - started, tuning=tuning)
        with tempfile.TemporaryDirectory(prefix="merge-", dir=scratch_dir(context)) as scratch:
            reporter.stage(
                f"merging {len(parents)} {base_kind} experts with {spec.method}, weights {list(spec.weights)}"
            )
            merge_started = time.perf_counter()
            path, config = write_merged_weights(context, parents, base_kind, spec, Path(scratch))
            merge_seconds = time.perf_counter() - merge_started
            params = _merge_params(spec, base_kind, signature, library, merge_seconds, tuning)
            expert = _publish_merged(
                context,
                path,
                name=name or _default_name(context, parents, spec, signature),
                parents=parents,
                base_kind=base_kind,
                spec=spec,
                config=config,
                params=params,
                embedder_id=embedder_id,
                reporter=reporter,
            )
    reporter.stage(
        f"merged expert {expert.name} (id {expert.id}) is ready at library version {expert.library_version}"
    )
    return MergeResult(expert, False, time.perf_counter() - started, merge_seconds, tuning)


def _merge_params(
    spec: MergeSpec,
    base_kind: str,
    signature: str,
    library: str,
    merge_seconds: float,
    tuning: dict[str, Any] | None,
) -> dict[str, Any]:
    """What the catalogue records as the merged expert's ``merge_params``."""
    params: dict[str, Any] = {
        **spec.params(),
        "signature": signature,
        "library": library,
        "merge_seconds": round(merge_seconds, 3),
    }
    if get_expert_kind(base_kind).merge == "lora_factors":
        params["peft_combination"] = peft_combination(spec.method)
    if tuning is not None:
        params["tuning"] = tuning
    return params


def _publish_merged(
    context: RegistryContext,
    path: Path,
    *,
    name: str,
    parents: Sequence[Expert],
    base_kind: str,
    spec: MergeSpec,
    config: dict[str, Any],
    params: dict[str, Any],
    embedder_id: int | None,
    reporter: Reporter,
) -> Expert:
    """Upload the merged weights and create the merged expert, ready, with its lineage (and the parents'
    library entries when ``embedder_id`` is given)."""
    # From the upload until the merged expert references it, GC must not delete it: see registry/gc.py.
    with publishing_artifacts(context.jobs):
        reporter.stage("uploading the merged weights")
        artifact = context.artifacts.put_file(path)
        entries = _union_entries(context, parents, embedder_id) if embedder_id is not None else []
        return context.catalogue.create_merged_expert(
            name=name,
            backbone_id=parents[0].backbone_id,
            config={**config, "base_kind": base_kind, "parents": [p.name for p in parents]},
            merge_method=spec.method,
            merge_params=params,
            parents=[(p.id, w) for p, w in zip(parents, spec.weights, strict=True)],
            artifact=artifact,
            embedder_id=embedder_id,
            entries=entries,
        )


__all__ = [
    "LIBRARY_MODES",
    "MergeResult",
    "make_spec",
    "merge_experts",
    "merge_signature",
    "resolve_parents",
]
