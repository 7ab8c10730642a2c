"""The paper's adapter: a small FFN in parallel with each layer's FFN, h = FFN_e(u) + FFN_d(u) + u.

Each transformer layer's feed-forward block (``mlp`` in Llama/Gemma, ``DenseReluDense`` in T5) is wrapped so
that it returns its own output plus the adapter's; the residual connection around it adds ``u``. Only FFN_e is
trained. Its up-projection starts at zero, so an untrained adapter leaves the backbone's outputs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

# Attribute names of the feed-forward block in the supported families (Llama/Gemma/Mistral/Qwen, T5).
FFN_ATTRIBUTES = ("mlp", "DenseReluDense")


class ParallelAdapter(nn.Module):
    """``ffn(u) + up(relu(down(u)))``, wrapping a frozen ``ffn``."""

    def __init__(self, ffn: nn.Module, model_dim: int, hidden_size: int):
        super().__init__()
        self.ffn = ffn
        reference = next(ffn.parameters())
        self.adapter_down = nn.Linear(model_dim, hidden_size, device=reference.device, dtype=reference.dtype)
        self.adapter_up = nn.Linear(hidden_size, model_dim, device=reference.device, dtype=reference.dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.ffn(hidden, *args, **kwargs) + self.adapter_up(torch.relu(self.adapter_down(hidden)))


def model_dimension(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "d_model", None) or config.hidden_size)


def feed_forward_blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, block) of every transformer layer's feed-forward block."""
    found = []
    for _, parent in model.named_modules():
        for attribute in FFN_ATTRIBUTES:
            block = getattr(parent, attribute, None)
            if (
                isinstance(block, nn.Module)
                and not isinstance(block, ParallelAdapter)
                and not isinstance(parent, ParallelAdapter)
            ):
                found.append((parent, attribute, block))
    return found


def add_adapters(model: nn.Module, hidden_size: int) -> dict[str, ParallelAdapter]:
    """Wrap every feed-forward block; returns the wrappers by their module path."""
    names = {id(module): name for name, module in model.named_modules()}
    dim = model_dimension(model)
    adapters = {}
    for parent, attribute, block in feed_forward_blocks(model):
        wrapper = ParallelAdapter(block, dim, hidden_size)
        setattr(parent, attribute, wrapper)
        adapters[f"{names[id(parent)]}.{attribute}".lstrip(".")] = wrapper
    if not adapters:
        raise ValueError(
            f"found no feed-forward blocks ({', '.join(FFN_ATTRIBUTES)}) in {type(model).__name__}"
        )
    return adapters


def remove_adapters(model: nn.Module) -> None:
    """Put every wrapped block back exactly as it was."""
    for _, parent in list(model.named_modules()):
        for attribute in FFN_ATTRIBUTES:
            wrapper = getattr(parent, attribute, None)
            if isinstance(wrapper, ParallelAdapter):
                setattr(parent, attribute, wrapper.ffn)


def adapter_state(adapters: dict[str, ParallelAdapter]) -> dict[str, torch.Tensor]:
    """The trainable tensors, named ``<block path>.adapter_{down,up}.{weight,bias}``."""
    state = {}
    for path, wrapper in adapters.items():
        for name, tensor in wrapper.state_dict().items():
            if name.startswith("adapter_"):
                state[f"{path}.{name}"] = tensor.detach().contiguous().cpu()
    return state
