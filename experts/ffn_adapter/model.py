"""The paper's adapter: a small FFN in parallel with each layer's FFN, h = FFN_e(u) + FFN_d(u) + u.

Each transformer layer's feed-forward block (``mlp`` in Llama/Gemma/Mistral/Qwen, ``DenseReluDense`` in T5) is
wrapped so that it returns its own output plus the adapter's; the residual connection around the block adds
``u``. (In Gemma 3 the block's output then goes through the layer's post-feed-forward norm, so there the sum is
normalised before the residual.) Only FFN_e is trained. Its up-projection starts at zero, so an untrained
adapter leaves the backbone's outputs unchanged, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from elmreg.registry.errors import ConfigurationError

# Attribute names of the feed-forward block in the supported families (Llama/Gemma/Mistral/Qwen, T5).
FFN_ATTRIBUTES = ("mlp", "DenseReluDense")
ADAPTER_PREFIX = "adapter_"


class ParallelAdapter(nn.Module):
    """``ffn(u) + up(relu(down(u)))``, wrapping a frozen ``ffn`` (kept as the very same module object).

    The adapter's own weights are float32 whatever the backbone's dtype: AdamW updates at a learning rate of
    1e-4 would mostly vanish in bfloat16.
    """

    def __init__(self, ffn: nn.Module, model_dim: int, hidden_size: int):
        super().__init__()
        self.ffn = ffn
        device = next(ffn.parameters()).device
        self.adapter_down = nn.Linear(model_dim, hidden_size, device=device, dtype=torch.float32)
        self.adapter_up = nn.Linear(hidden_size, model_dim, device=device, dtype=torch.float32)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        extra = self.adapter_up(torch.relu(self.adapter_down(hidden.float())))
        return self.ffn(hidden, *args, **kwargs) + extra.to(hidden.dtype)


def model_dimension(model: nn.Module) -> int:
    """Width of the residual stream (``d_model`` in T5, ``hidden_size`` elsewhere)."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "d_model", None) or config.hidden_size)


def feed_forward_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(parent path, parent, attribute, block) of every unwrapped feed-forward block, in module order."""
    found = []
    for path, parent in model.named_modules():
        if isinstance(parent, ParallelAdapter):
            continue
        for attribute in FFN_ATTRIBUTES:
            block = getattr(parent, attribute, None)
            if isinstance(block, nn.Module) and not isinstance(block, ParallelAdapter):
                found.append((path, parent, attribute, block))
    return found


def find_adapters(model: nn.Module) -> dict[str, ParallelAdapter]:
    """The adapters on ``model``, by the module path of the block they wrap."""
    return {path: module for path, module in model.named_modules() if isinstance(module, ParallelAdapter)}


def add_adapters(model: nn.Module, hidden_size: int) -> dict[str, ParallelAdapter]:
    """Wrap every feed-forward block of ``model``; returns the wrappers by their module path.

    Raises:
        ConfigurationError: The model already has adapters, or no recognisable feed-forward blocks.
    """
    if find_adapters(model):
        raise ConfigurationError("the model already carries ffn adapters; remove them first")
    blocks = feed_forward_blocks(model)
    if not blocks:
        raise ConfigurationError(
            f"found no feed-forward blocks (attributes {', '.join(FFN_ATTRIBUTES)}) in {type(model).__name__}; "
            "the ffn_adapter kind does not support this architecture"
        )
    dim = model_dimension(model)
    for _, parent, attribute, block in blocks:
        setattr(parent, attribute, ParallelAdapter(block, dim, hidden_size))
    return find_adapters(model)


def remove_adapters(model: nn.Module) -> None:
    """Put every wrapped block back: the original module objects, unchanged."""
    for _, parent in list(model.named_modules()):
        for attribute in FFN_ATTRIBUTES:
            wrapper = getattr(parent, attribute, None)
            if isinstance(wrapper, ParallelAdapter):
                setattr(parent, attribute, wrapper.ffn)


def adapter_parameters(adapters: dict[str, ParallelAdapter]) -> list[nn.Parameter]:
    """FFN_e's parameters (never the wrapped block's)."""
    return [
        parameter
        for wrapper in adapters.values()
        for name, parameter in wrapper.named_parameters()
        if name.startswith(ADAPTER_PREFIX)
    ]


def adapter_state(adapters: dict[str, ParallelAdapter]) -> dict[str, torch.Tensor]:
    """The trainable tensors on the CPU, named ``<block path>.adapter_{down,up}.{weight,bias}``."""
    state = {}
    for path, wrapper in adapters.items():
        for name, tensor in wrapper.state_dict().items():
            if name.startswith(ADAPTER_PREFIX):
                state[f"{path}.{name}"] = tensor.detach().contiguous().cpu()
    return state


def load_adapter_state(adapters: dict[str, ParallelAdapter], state: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors (named as by :func:`adapter_state`) into the adapters.

    Raises:
        ValueError: The names or shapes do not match the adapters.
    """
    expected = {name: tensor.shape for name, tensor in adapter_state(adapters).items()}
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name]:
            raise ValueError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}"
            )
    with torch.no_grad():
        for path, wrapper in adapters.items():
            for name, parameter in wrapper.named_parameters():
                if name.startswith(ADAPTER_PREFIX):
                    parameter.copy_(state[f"{path}.{name}"])
