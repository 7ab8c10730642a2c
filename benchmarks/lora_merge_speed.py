"""How long merging two LoRA experts takes, elmreg's low-rank SVD paths next to the full SVD PEFT uses.

Merges the adapters of two ready LoRA experts of the registry (fetched and verified from S3, as ``elmreg merge``
does) into a scratch folder, nothing registered, with each method twice in the same run:

- ``elmreg``: the merge as shipped. ``svd`` never forms ΔW (QR of the stacked factors, SVD of the small core);
  TIES / DARE / magnitude pruning form each module's ΔW, prune it, and truncate it through the eigenvectors of
  the smaller Gram matrix.
- ``full SVD``: the same merge with every truncation done by ``torch.linalg.svd`` of the whole ΔW, which is what
  ``LoraModel.add_weighted_adapter`` computes (the baseline).

Printed per method: seconds for each, the speed-up, and the largest difference between the two merged updates
B·A over all modules (relative to the largest entry), which should be at float32 rounding level.

    .venv/bin/python benchmarks/lora_merge_speed.py strategyqa sports_understanding
    .venv/bin/python benchmarks/lora_merge_speed.py strategyqa sports_understanding --methods svd,ties
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file

from elmreg.api import Registry
from elmreg.merging import lora
from elmreg.merging.methods import MergeSpec
from elmreg.merging.task_vectors import open_readers


def _full_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def _full_svd_of_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _full_svd(b @ a, rank)


def _merge(paths, configs, labels, spec: MergeSpec, out: Path) -> float:
    started = time.perf_counter()
    with open_readers(paths, labels) as readers:
        lora.merge_lora(readers, configs, spec, out)
    return time.perf_counter() - started


def _updates(path: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(path))
    return {
        name[: -len(lora._A)]: state[name[: -len(lora._A)] + lora._B].double() @ tensor.double()
        for name, tensor in state.items()
        if name.endswith(lora._A)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experts", nargs=2, help="Two ready LoRA experts (names or ids).")
    parser.add_argument("--methods", default="svd,ties,dare_ties", help="Comma-separated merge methods.")
    parser.add_argument("--density", type=float, default=0.5, help="For TIES / DARE.")
    args = parser.parse_args()

    with Registry() as registry:
        parents = [registry.expert(e) for e in args.experts]
        if any(p.kind != "lora" for p in parents):
            raise SystemExit("both experts must be LoRA experts")
        paths = [registry.context.artifact_cache.fetch(p.artifact) for p in parents]
        configs = [p.config["adapter_config"] for p in parents]
    labels = [p.name for p in parents]
    modules = len(_updates(paths[0]))
    print(
        f"{labels[0]} + {labels[1]}: {modules} LoRA modules, ranks {[c['r'] for c in configs]}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"{'method':<12} {'elmreg s':>9} {'full SVD s':>11} {'speed-up':>9} {'max |ΔW diff| / max |ΔW|':>26}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods.split(","):
            density = (
                args.density if method in ("ties", "dare_ties", "dare_linear", "magnitude_prune") else None
            )
            spec = MergeSpec(method, (0.5, 0.5), density=density)
            ours, baseline = (
                Path(scratch) / f"{method}-ours.safetensors",
                Path(scratch) / f"{method}-full.safetensors",
            )
            fast = _merge(paths, configs, labels, spec, ours)
            with (
                mock.patch.object(lora, "truncated_svd", _full_svd),
                mock.patch.object(lora, "truncated_svd_of_product", _full_svd_of_product),
            ):
                slow = _merge(paths, configs, labels, spec, baseline)
            a, b = _updates(ours), _updates(baseline)
            scale = max(t.abs().max().item() for t in b.values())
            diff = max((a[m] - b[m]).abs().max().item() for m in b)
            print(f"{method:<12} {fast:>9.1f} {slow:>11.1f} {slow / fast:>8.1f}x {diff / scale:>26.1e}")


if __name__ == "__main__":
    main()
