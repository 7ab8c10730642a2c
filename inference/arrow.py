"""Arrow routing: a library's LoRA experts mixed token by token inside the model, with no library samples.

Arrow (Ostapenko et al., 2024; PEFT's ``peft.tuners.lora.arrow``) gives every LoRA module of every expert a
prototype: the top right singular vector of its ΔW = BA, the input direction the expert changes most. At each
adapted layer a token goes to the ``top_k`` experts whose prototypes it is most aligned with (|inner product|),
mixed by a softmax of those alignments at ``temperature``. PEFT does the mixing; :meth:`AdapterPool.use_arrow`
puts the library's experts under it. What this module adds is what the audit tables need: how much of the
instances' routing mass each expert received (:func:`routing_mass`), so an Arrow decision is recorded like any
other, with one weighted vote per (instance, expert) and the expert with the most mass as the choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from elmreg.data.prompts import PromptedExample
from elmreg.models.backbones import Backbone
from elmreg.registry.entities import Expert
from elmreg.registry.errors import UserError
from elmreg.registry.kinds import LORA
from elmreg.registry.store.catalogue import CatalogueStore

# PEFT's name for the router adapter whose layers do the mixing (create_arrow_model uses the same).
ARROW_ADAPTER = "arrow_router"


def arrow_experts(
    catalogue: CatalogueStore,
    *,
    library_version: int,
    backbone_id: int,
    kinds: Sequence[str] | None = None,
) -> list[Expert]:
    """The experts Arrow mixes: ready LoRA experts on ``backbone_id``, visible at ``library_version``, by id.

    Raises:
        UserError: ``kinds`` asks for other kinds (Arrow mixes LoRA adapters only), or no expert qualifies.
    """
    if kinds and set(kinds) != {LORA.name}:
        raise UserError(
            f"router arrow mixes LoRA experts only; got kinds {', '.join(kinds)} (use --kind lora or no kind)"
        )
    experts = [
        e
        for e in catalogue.list_experts(status="ready")
        if e.kind == LORA.name
        and e.backbone_id == backbone_id
        and e.library_version is not None
        and e.library_version <= library_version
        and (e.retired_at_version is None or e.retired_at_version > library_version)
    ]
    if not experts:
        raise UserError(
            f"router arrow: no ready LoRA expert on this backbone at library version {library_version}; "
            "train one with 'elmreg add-task' and 'elmreg worker'"
        )
    return sorted(experts, key=lambda e: e.id)


def _layer_mass(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mixing coefficients (tokens, experts) one Arrow layer gives the tokens ``x``, as PEFT computes them."""
    arrow = module.lora_arrow[ARROW_ADAPTER]
    prototypes = arrow.prototypes
    tokens = x.reshape(-1, x.shape[-1]).to(prototypes.dtype)
    similarity = (tokens @ prototypes.T).abs()
    top_values, top_index = similarity.topk(arrow.top_k, dim=1)
    scores = torch.full_like(similarity, float("-inf")).scatter_(1, top_index, top_values)
    return torch.softmax(scores.float() / arrow.temperature, dim=1)


@torch.no_grad()
def routing_mass(
    model, backbone: Backbone, instances: Sequence[PromptedExample], *, batch_size: int = 8
) -> np.ndarray:
    """``(instances, experts)``: each instance's mean mixing coefficient per expert, over its tokens and every
    Arrow layer (rows sum to 1), in the order of the Arrow adapter's experts. ``model`` must be the model
    :meth:`AdapterPool.use_arrow` yields."""
    layers = [m for m in model.modules() if hasattr(m, "lora_arrow") and ARROW_ADAPTER in m.lora_arrow]
    if not layers:
        raise UserError("routing_mass needs the model AdapterPool.use_arrow yields")
    rows = [
        _batch_mass(model, backbone, layers, [i.input for i in instances[start : start + batch_size]])
        for start in range(0, len(instances), batch_size)
    ]
    return np.concatenate(rows)


def _batch_mass(model, backbone: Backbone, layers: list[torch.nn.Module], texts: list[str]) -> np.ndarray:
    encoded = backbone.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
    encoded = encoded.to(backbone.device)
    mask = encoded["attention_mask"]
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        mass = _layer_mass(module, args[0])  # the prototypes exist once the layer has run
        per_token = mass.view(len(texts), -1, mass.shape[-1])
        if per_token.shape[1] == mask.shape[1]:  # encoder or decoder-only tokens: padding left out
            weights = mask.unsqueeze(-1).to(per_token.dtype)
            captured.append((per_token * weights).sum(1) / weights.sum(1))
        else:  # a seq2seq decoder's start token
            captured.append(per_token.mean(1))

    handles = [layer.register_forward_hook(capture) for layer in layers]
    try:
        if backbone.family == "seq2seq":
            start = torch.full((len(texts), 1), model.config.decoder_start_token_id, device=backbone.device)
            model(**encoded, decoder_input_ids=start)
        else:
            model(**encoded)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured).mean(0).cpu().numpy()
