"""Tensor merges: PEFT's ``merge_utils`` (task arithmetic, TIES, DARE, magnitude pruning), one tensor at a time.

The merge functions themselves are PEFT's; this module only says which one a method name means, checks the
parameters, computes in float32 whatever the stored dtype, and makes the random ones (DARE) reproducible: each
tensor is pruned under its own seed, derived from the merge seed and the tensor's name, so the result does not
depend on the order tensors are visited in or on anything else that drew random numbers.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils import merge_utils

from elmreg.registry.errors import UserError

# Methods for every kind. For LoRA experts they apply to the full update ΔW = s·B·A of each module (see lora.py).
METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# PEFT's own LoRA combinations on the low-rank factors, for LoRA experts only.
LORA_METHODS = ("linear", "cat", "svd")
ALL_METHODS = METHODS + LORA_METHODS
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
RANDOM_METHODS = ("dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5
# Large task-vector tensors are merged in blocks of rows of at most this many elements (64 MB in float32); DARE
# seeds each block's mask separately, so the block size is part of what a DARE merge computes (see params()).
BLOCK_ELEMENTS = 2**24


class MergeError(UserError):
    """A merge that makes no sense (kinds, backbones, shapes, ranks, weights); nothing is written."""


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: the method, one weight λ_i per parent, and the method's parameters.

    Attributes:
        method: One of :data:`ALL_METHODS`.
        weights: λ_i per parent, in parent order (negative values subtract a task, as in task arithmetic).
        density: Fraction of each task tensor kept by TIES / DARE / magnitude pruning (default 0.5 for those).
        seed: Seeds DARE's random pruning; the same seed gives the same merged weights.
        majority_sign_method: TIES sign election: 'total' (sum of values) or 'frequency' (count of signs).
    """

    method: str
    weights: tuple[float, ...]
    density: float | None = None
    seed: int = 0
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        if self.method not in ALL_METHODS:
            raise MergeError(f"unknown merge method '{self.method}'; choose one of {', '.join(ALL_METHODS)}")
        weights = tuple(float(w) for w in self.weights)
        if not all(math.isfinite(w) for w in weights):
            raise MergeError(f"merge weights must be finite numbers, got {list(self.weights)}")
        object.__setattr__(self, "weights", weights)
        if self.method in NEEDS_DENSITY:
            density = DEFAULT_DENSITY if self.density is None else float(self.density)
            if not 0 < density <= 1:
                raise MergeError(f"--density must be in (0, 1], got {density}")
            object.__setattr__(self, "density", density)
        elif self.density is not None:
            raise MergeError(
                f"--density applies to {', '.join(NEEDS_DENSITY)}, not to {self.method}; leave it out"
            )
        if self.majority_sign_method not in ("total", "frequency"):
            raise MergeError(
                f"majority_sign_method must be 'total' or 'frequency', got '{self.majority_sign_method}'"
            )

    def params(self) -> dict[str, Any]:
        """The parameters as stored in ``experts.merge_params`` (only those the method uses)."""
        params: dict[str, Any] = {"weights": list(self.weights)}
        if self.method in NEEDS_DENSITY:
            params["density"] = self.density
        if self.method in ("ties", "dare_ties"):
            params["majority_sign_method"] = self.majority_sign_method
        if self.method in RANDOM_METHODS:
            params["seed"] = self.seed
            params["block_elements"] = BLOCK_ELEMENTS
        return params


def tensor_seed(seed: int, name: str) -> int:
    """The seed that DARE's pruning of tensor ``name`` runs under (stable across processes and Python runs)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run under ``seed`` without disturbing torch's global (CPU) random state for anyone else."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def merge_tensors(
    tensors: Sequence[torch.Tensor], spec: MergeSpec, name: str, *, method: str | None = None
) -> torch.Tensor:
    """Merge the same tensor of every parent with PEFT's function for ``method`` (default ``spec.method``).

    Computes in float32 (or float64 if given), returns the first tensor's dtype.

    Raises:
        MergeError: The tensors differ in shape, or the weights are not one per tensor.
    """
    method = method or spec.method
    if len(tensors) != len(spec.weights):
        raise MergeError(f"{len(tensors)} tensors to merge but {len(spec.weights)} weights")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise MergeError(f"tensor {name} has different shapes in the experts: {sorted(shapes)}")
    out_dtype = tensors[0].dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    work = [t.to(compute) for t in tensors]
    weights = torch.tensor(spec.weights, dtype=compute)
    with warnings.catch_warnings():
        # prune() warns for density 1 ("no pruning will be performed"), which is what the user asked for.
        warnings.filterwarnings("ignore", message=".*no pruning will be performed.*")
        if method in ("task_arithmetic", "linear", "svd", "cat"):
            merged = merge_utils.task_arithmetic(work, weights)
        elif method == "ties":
            merged = merge_utils.ties(work, weights, spec.density, spec.majority_sign_method)
        elif method == "magnitude_prune":
            merged = merge_utils.magnitude_prune(work, weights, spec.density)
        elif method in RANDOM_METHODS:
            function = merge_utils.dare_linear if method == "dare_linear" else merge_utils.dare_ties
            extra = () if method == "dare_linear" else (spec.majority_sign_method,)
            with seeded(tensor_seed(spec.seed, name)):
                merged = function(work, weights, spec.density, *extra)
        else:
            raise MergeError(f"merge method '{method}' does not apply to single tensors")
    return merged.to(out_dtype)
