"""Merging experts stored as named tensors in safetensors files (task vectors, FFN adapters), tensor by tensor.

A task vector is as large as the model, so N of them never fit in memory at once on the machines that trained
them. The merge opens every parent's file lazily and walks the tensor names: it reads tensor ``t`` of each
parent, merges those N tensors, writes the result into the output file (in safetensors layout, header first,
see ``experts.full.task_vector.write_streaming``) and lets them go before reading the next name. Peak memory
is one tensor per parent plus the merged tensor and PEFT's temporaries.

Task arithmetic and DARE are element-wise, so large tensors (a 262k-token embedding is 63% of gemma-3-270m) are
merged in blocks of rows of at most :data:`BLOCK_ELEMENTS` elements, which bounds memory by the block rather than
by the largest tensor. For task arithmetic the result is bit-identical to merging whole tensors; DARE draws each
block's random mask under its own seed (``tensor_seed(seed, "name[start:stop]")``), which depends only on the
tensor's shape, so a merge is reproducible anywhere. TIES and magnitude pruning keep the top values of a whole
tensor, so they take each tensor whole (several copies of the largest tensor at the peak, inside PEFT).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from elmreg.experts.full.task_vector import write_streaming
from elmreg.merging.methods import BLOCK_ELEMENTS, MergeError, MergeSpec, merge_tensors

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]
# Methods whose result for an element depends on that element of each parent only (DARE: and a random mask).
ELEMENTWISE = ("task_arithmetic", "dare_linear", "dare_ties")


class TensorReader:
    """Reads one expert's tensors by name from a safetensors file, one at a time (nothing is preloaded)."""

    def __init__(self, handle, label: str):
        self.handle = handle
        self.label = label

    def layout(self) -> Layout:
        """Name -> (shape, dtype) of every tensor, from the file header only."""
        layout: Layout = {}
        for name in self.handle.keys():  # noqa: SIM118 - safe_open objects are not iterable
            view = self.handle.get_slice(name)
            dtype = view.get_dtype()
            if dtype not in _DTYPES:
                raise MergeError(f"{self.label}: tensor {name} is stored as {dtype}, which cannot be merged")
            layout[name] = (tuple(view.get_shape()), _DTYPES[dtype])
        return layout

    def metadata(self) -> dict[str, str]:
        return dict(self.handle.metadata() or {})

    def read(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, reading only those from the file."""
        return self.handle.get_slice(name)[start:stop]


@contextmanager
def open_readers(paths: Sequence[Path], labels: Sequence[str]) -> Iterator[list[TensorReader]]:
    """A :class:`TensorReader` per file, closed on exit."""
    with ExitStack() as stack:
        yield [
            TensorReader(stack.enter_context(safe_open(str(path), framework="pt")), label)
            for path, label in zip(paths, labels, strict=True)
        ]


def check_same_layout(layouts: Sequence[Layout], labels: Sequence[str]) -> None:
    """Refuse parents whose tensors differ in names or shapes (they were not trained on the same modules).

    Raises:
        MergeError: Naming the first difference found.
    """
    first, first_label = layouts[0], labels[0]
    for layout, label in zip(layouts[1:], labels[1:], strict=True):
        missing, extra = sorted(set(first) - set(layout)), sorted(set(layout) - set(first))
        if missing or extra:
            example = (missing or extra)[0]
            raise MergeError(
                f"experts {first_label} and {label} have different tensors ({len(missing) + len(extra)} differ, "
                f"e.g. {example}); only experts of the same architecture can be merged"
            )
        for name, (shape, _) in first.items():
            if layout[name][0] != shape:
                raise MergeError(
                    f"tensor {name} has shape {list(shape)} in {first_label} but {list(layout[name][0])} in "
                    f"{label}; experts with different shapes (e.g. adapter sizes) cannot be merged"
                )


def merge_tensor_files(
    readers: Sequence[TensorReader], spec: MergeSpec, out_path: Path, *, block_elements: int = BLOCK_ELEMENTS
) -> Layout:
    """Merge the parents' files tensor by tensor into ``out_path``; returns the merged file's layout.

    The output keeps the first parent's tensor order, dtypes and safetensors metadata (e.g. the task-vector
    format marker), so the kind's trainer loads it like any expert of that kind.

    Args:
        block_elements: For element-wise methods, tensors with more elements are merged in blocks of rows of at
            most this many elements (at least one row). Part of what a DARE merge computes: keep the default.

    Raises:
        MergeError: Different tensor names or shapes, or the wrong number of weights.
    """
    labels = [r.label for r in readers]
    layouts = [r.layout() for r in readers]
    check_same_layout(layouts, labels)
    entries = [(name, torch.Size(shape), dtype) for name, (shape, dtype) in layouts[0].items()]

    def produce(name: str) -> torch.Tensor | Iterable[torch.Tensor]:
        shape = layouts[0][name][0]
        row_elements = torch.Size(shape[1:]).numel()
        if spec.method in ELEMENTWISE and len(shape) > 1 and shape[0] * row_elements > block_elements:
            return _merge_rows(readers, spec, name, shape[0], max(1, block_elements // row_elements))
        # The parents' tensors live only inside this call: one of each at a time.
        return merge_tensors([reader.read(name) for reader in readers], spec, name)

    write_streaming(out_path, entries, produce, metadata=readers[0].metadata())
    return layouts[0]


def _merge_rows(
    readers: Sequence[TensorReader], spec: MergeSpec, name: str, rows: int, step: int
) -> Iterator[torch.Tensor]:
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        parts = [reader.read_rows(name, start, stop) for reader in readers]
        merged = merge_tensors(parts, spec, f"{name}[{start}:{stop}]")
        del parts  # not kept alive across the yield, while the next block is read
        yield merged
