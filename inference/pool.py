"""Experts on one loaded backbone: fetched from S3 (verified), cached on disk, switched without reloading.

Experts of mixable kinds (LoRA) stay resident side by side as named PEFT adapters (up to ``capacity``, least
recently used evicted) and switching is ``set_adapter``. Other kinds (``ffn_adapter``, ``full``) change the
backbone's modules or weights, so one of them at a time is attached, and detached (exactly: full experts restore
θ_pre from disk) before another expert is used. Every expert goes on through ``experts.loader`` (kind and
fingerprint checks). The backbone is the context's shared copy; the pool holds it while its experts are on it,
so training or another pool that needs it next has them taken off first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from elmreg.experts import get_loader, load_adapter, load_expert, unload_expert
from elmreg.models.backbones import Backbone
from elmreg.registry.entities import Expert
from elmreg.registry.errors import UserError
from elmreg.registry.kinds import LORA, get_expert_kind, weights_kind
from elmreg.runtime.context import RegistryContext

# PEFT's adapter name for "no adapter" in a mixed batch.
BASE_ADAPTER = "__base__"


class AdapterPool:
    """Serves models for experts of one backbone."""

    def __init__(
        self, context: RegistryContext, backbone_name: str, *, capacity: int = 4, device: str | None = None
    ):
        if capacity < 1:
            raise UserError(f"the adapter pool needs a capacity of at least 1, got {capacity}")
        self.context = context
        self.capacity = capacity
        self._device = device
        self.backbone: Backbone = context.backbones.get(backbone_name, device=device)
        self._adapters: OrderedDict[int, str] = OrderedDict()  # expert id -> adapter name, least recent first
        self._adapter_kind: str | None = None  # the mixable kind whose loader put the adapters on
        self._peft: PeftModel | None = None
        self._exclusive: tuple[Expert, Any] | None = None  # an attached expert of another kind, and its model

    @property
    def backbone_loads(self) -> int:
        """How many times this process loaded the pool's backbone (once: switching experts never reloads it)."""
        return self.context.backbones.loads(self.backbone.name, device=self._device)

    def _weights(self, expert: Expert) -> Path:
        if expert.artifact is None:
            raise UserError(f"expert {expert.name} has no weights (status {expert.status})")
        return self.context.artifact_cache.fetch(expert.artifact)  # verified against the catalogue's sha256

    def _drop_exclusive(self) -> None:
        if self._exclusive is not None:
            _, model = self._exclusive
            self._exclusive = None
            unload_expert(self.backbone, model)

    def _drop_adapters(self) -> None:
        if self._peft is not None:
            peft, self._peft = self._peft, None
            self._adapters.clear()
            get_loader(self._adapter_kind).detach(self.backbone, peft)

    def release(self) -> None:
        """Take every expert of this pool off the backbone (the next use puts them back on)."""
        self._drop_exclusive()
        self._drop_adapters()

    def _adapter_model(self, expert: Expert) -> torch.nn.Module:
        self._drop_exclusive()
        kind = weights_kind(expert)
        if self._peft is not None and kind != self._adapter_kind:
            self._drop_adapters()  # adapters of one kind's loader at a time
        name = f"expert_{expert.id}"
        if expert.id not in self._adapters:
            self._peft = load_adapter(
                self._peft,
                self.backbone,
                self._weights(expert),
                expert.config,
                adapter_name=name,
                kind=kind,
                label=expert.name,
            )
            self._adapter_kind = kind
            self._adapters[expert.id] = name
        self._adapters.move_to_end(expert.id)
        self._peft.set_adapter(name)  # before evicting, so PEFT never deletes the active adapter
        while len(self._adapters) > self.capacity:
            _, evicted = self._adapters.popitem(last=False)
            self._peft.delete_adapter(evicted)
        self._peft.eval()
        return self._peft

    @contextmanager
    def use(self, expert: Expert | None) -> Iterator[torch.nn.Module]:
        """The model to run for ``expert`` (None: the plain backbone)."""
        self.backbone.hold(self.release)  # whoever else had experts on the backbone takes them off
        if expert is None:
            self._drop_exclusive()
            if self._peft is not None:
                with self._peft.disable_adapter():
                    yield self._peft
                return
            yield self.backbone.model
            return
        # A merged expert is loaded as the kind its weights are in (its parents' kind).
        if get_expert_kind(weights_kind(expert)).mixable:
            yield self._adapter_model(expert)
            return
        if self._exclusive is None or self._exclusive[0].id != expert.id:
            self.release()
            model = load_expert(
                self.backbone,
                self._weights(expert),
                expert.config,
                kind=weights_kind(expert),
                label=expert.name,
            )
            self._exclusive = (expert, model)
            self.backbone.hold(self.release)  # load_expert released the backbone before loading
        yield self._exclusive[1]

    @contextmanager
    def use_mixed(self, experts: Sequence[Expert]) -> Iterator[tuple[PeftModel, dict[int, str]]]:
        """Several LoRA experts resident at once, for batches that mix them (PEFT's ``adapter_names``).

        Yields the PEFT model and each expert's adapter name (``BASE_ADAPTER`` selects the plain backbone).

        Raises:
            UserError: An expert of a kind that does not mix (``ExpertKind.mixable``), or more distinct experts
                than the pool's capacity.
        """
        distinct = list({e.id: e for e in experts}.values())
        if len(distinct) > self.capacity:
            raise UserError(
                f"{len(distinct)} experts in one mixed batch, but the adapter pool holds {self.capacity}; "
                "split the batch or raise the capacity"
            )
        kinds = {weights_kind(e) for e in distinct}
        for expert in distinct:
            if not get_expert_kind(weights_kind(expert)).mixable:
                raise UserError(
                    f"expert {expert.name} is of kind {expert.kind}: only LoRA experts mix in a batch"
                )
        if len(kinds) > 1:
            raise UserError(f"experts of kinds {', '.join(sorted(kinds))} cannot mix in one batch")
        self.backbone.hold(self.release)
        for expert in distinct:
            self._adapter_model(expert)  # loads it (verified) and marks it most recently used
        yield self._peft, {e.id: self._adapters[e.id] for e in distinct}

    @contextmanager
    def use_arrow(self, experts: Sequence[Expert], *, top_k: int, temperature: float) -> Iterator[PeftModel]:
        """The backbone with exactly ``experts`` (LoRA, one rank and one set of target modules) under PEFT's Arrow
        router (``inference.arrow``): every token mixes its ``top_k`` best-aligned experts. Afterwards the pool
        is empty again: an Arrow layer mixes every adapter resident in it, so nothing else may be."""
        from peft import ArrowConfig, LoraConfig
        from peft.tuners.lora.arrow import check_loaded_lora_compatibility_arrow

        from elmreg.inference.arrow import ARROW_ADAPTER

        for expert in experts:
            if weights_kind(expert) != LORA.name:
                raise UserError(
                    f"router arrow mixes LoRA experts only; {expert.name} is of kind {expert.kind}"
                )
        self.release()
        self.backbone.hold(self.release)
        capacity, self.capacity = self.capacity, max(self.capacity, len(experts))
        try:
            for expert in experts:
                self._adapter_model(expert)
            names = [self._adapters[e.id] for e in experts]
            try:
                target_modules, rank = check_loaded_lora_compatibility_arrow(self._peft, adapter_names=names)
            except ValueError as error:
                raise UserError(f"router arrow needs LoRA experts of one shape: {error}") from None
            config = ArrowConfig(
                top_k=min(top_k, len(experts)),
                router_temperature=temperature,
                rng_seed=0,  # the prototypes' power iteration starts from a seeded vector: decisions repeat
            )
            config.task_adapter_names, config.gks_adapter_names = names, []  # not init fields in PEFT
            self._peft.add_adapter(
                ARROW_ADAPTER, LoraConfig(arrow_config=config, target_modules=target_modules, r=rank)
            )
            self._peft.set_adapter(ARROW_ADAPTER)
            self._peft.eval()
            yield self._peft
        finally:
            self.capacity = capacity
            self.release()

    @property
    def resident(self) -> list[int]:
        """Expert ids currently on the backbone, least recently used first."""
        exclusive = [self._exclusive[0].id] if self._exclusive else []
        return list(self._adapters) + exclusive
