"""Writing merged weights: the parents' files, merged into one file in their kind's format, and its config.

Shared by the merge itself and by weight tuning, which merges every candidate into a temporary file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elmreg.merging.lora import merge_lora
from elmreg.merging.methods import MergeSpec
from elmreg.merging.task_vectors import merge_tensor_files, open_readers
from elmreg.registry.entities import Expert
from elmreg.registry.kinds import get_expert_kind
from elmreg.runtime.context import RegistryContext


def write_merged_weights(
    context: RegistryContext, parents: Sequence[Expert], base_kind: str, spec: MergeSpec, out_dir: Path
) -> tuple[Path, dict[str, Any]]:
    """Merge the parents' weights (fetched and verified from the artifact store) into a file in ``out_dir``.

    Returns:
        The file (named as the kind names its weights), and the config the kind's loader loads it with
        (``kind`` is the base kind; the kind's ``merge_config`` fields come from the first parent).

    Raises:
        MergeError: Different tensor names, shapes or ranks.
    """
    kind = get_expert_kind(base_kind)
    paths = [context.artifact_cache.fetch(p.artifact) for p in parents]
    out = out_dir / kind.weights_file
    first = parents[0].config
    config: dict[str, Any] = {"kind": base_kind}
    with open_readers(paths, [p.name for p in parents]) as readers:
        if kind.merge == "lora_factors":
            config["adapter_config"] = merge_lora(
                readers, [p.config["adapter_config"] for p in parents], spec, out
            )
        else:
            merge_tensor_files(readers, spec, out)
    for field in (*kind.merge_config, "backbone", "backbone_fingerprint"):
        if first.get(field) is not None:
            config[field] = first[field]
    return out, config


def scratch_dir(context: RegistryContext) -> Path:
    path = context.settings.cache_path / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path
