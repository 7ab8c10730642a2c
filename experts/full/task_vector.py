"""Task vectors τ = θ_fine-tuned − θ_pre, written and applied one tensor at a time.

A task vector is as large as the model. It is written in the safetensors format by hand (header, then each
tensor's bytes as it is computed) and θ_pre is read lazily from the backbone's own safetensors files, so
neither writing nor applying one ever holds a second or third copy of the model in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from elmreg.registry.errors import ArtifactError

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}


def write_streaming(
    path: Path,
    entries: Sequence[tuple[str, torch.Size, torch.dtype]],
    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time, in ``entries`` order.

    ``produce(name)`` returns the whole tensor, or an iterable of consecutive slices along its first dimension
    (so that not even one large tensor, such as an embedding, has to be in memory whole).
    """
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name, shape, dtype in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data buffer starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, shape, dtype in entries:
            produced = produce(name)
            whole = isinstance(produced, torch.Tensor)
            rows = 0
            for part in [produced] if whole else produced:
                part = part.detach().to("cpu", dtype).contiguous()
                if (whole and part.shape != torch.Size(shape)) or (not whole and part.shape[1:] != shape[1:]):
                    raise ValueError(f"{name}: produced shape {tuple(part.shape)}, declared {tuple(shape)}")
                rows += part.shape[0] if part.dim() else 1
                out.write(memoryview(part.view(torch.uint8).numpy()))  # no bytes copy of the tensor
            if not whole and rows != (shape[0] if len(shape) else 1):
                raise ValueError(f"{name}: produced {rows} rows, declared {tuple(shape)}")


@contextmanager
def open_weights(folder: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """A reader of the backbone's pre-trained tensors by name, across all its safetensors shards."""
    with ExitStack() as stack:
        handles = {}
        for shard in sorted(folder.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(shard), framework="pt"))
            for key in handle.keys():  # noqa: SIM118 - safe_open objects are not iterable
                handles[key] = handle

        def read(name: str) -> torch.Tensor:
            if name not in handles:
                raise ArtifactError(f"tensor '{name}' is not in the backbone's weights under {folder}")
            return handles[name].get_tensor(name)

        yield read


def trainable_entries(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every parameter once (tied weights such as a shared embedding and LM head appear under one name)."""
    return list(model.named_parameters(remove_duplicate=True))


def write_task_vector(model: torch.nn.Module, backbone_folder: Path, path: Path) -> None:
    """τ = θ_model − θ_pre, tensor by tensor, into ``path``."""
    parameters = dict(trainable_entries(model))
    entries = [(name, p.shape, p.dtype) for name, p in parameters.items()]
    with open_weights(backbone_folder) as pretrained:
        write_streaming(
            path,
            entries,
            lambda name: parameters[name].detach().cpu() - pretrained(name).to(parameters[name].dtype),
            metadata={"format": "elmreg-task-vector"},
        )


def restore_pretrained(model: torch.nn.Module, backbone_folder: Path) -> None:
    """Copy θ_pre back into the model from disk (exact, unlike subtracting τ again)."""
    with open_weights(backbone_folder) as pretrained, torch.no_grad():
        for name, parameter in trainable_entries(model):
            parameter.copy_(pretrained(name).to(parameter.dtype))


def apply_task_vector(model: torch.nn.Module, path: Path, scale: float = 1.0) -> None:
    """θ ← θ + scale·τ in place, one tensor at a time."""
    parameters = dict(trainable_entries(model))
    with safe_open(str(path), framework="pt") as vector, torch.no_grad():
        names = set(vector.keys())
        if names != set(parameters):
            raise ArtifactError(
                f"{path.name} does not fit this backbone ({len(names ^ set(parameters))} tensors differ)"
            )
        for name in names:
            parameter = parameters[name]
            delta = vector.get_tensor(name).to(parameter.device, parameter.dtype)
            parameter.add_(delta if scale == 1.0 else delta * scale)
