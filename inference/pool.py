"""Experts on one loaded backbone: fetched from S3 (verified), cached on disk, switched without reloading.

LoRA experts stay resident side by side as named PEFT adapters (up to ``capacity``, least recently used evicted)
and switching is ``set_adapter``. ``ffn_adapter`` and ``full`` experts change the backbone's modules or weights,
so one of them at a time is attached, and detached (exactly: full experts restore θ_pre from disk) before
another expert is used. The backbone itself is loaded once per pool.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from elmreg.registry.backbones import Backbone, load_backbone
from elmreg.registry.context import RegistryContext
from elmreg.registry.errors import UserError
from elmreg.registry.store.entities import Expert
from elmreg.trainers import get_trainer
from elmreg.trainers.lora import export_peft_folder
from elmreg.trainers.merge import weights_kind

# The expert kinds define how their weights go onto a backbone (trainers/<kind>); the pool only schedules them.

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
        self.backbone: Backbone = load_backbone(
            backbone_name, cache_dir=context.settings.cache_path, device=device or context.settings.device
        )
        self.backbone_loads = 1
        self._lora: OrderedDict[int, str] = OrderedDict()  # expert id -> adapter name, least recent first
        self._peft: PeftModel | None = None
        self._exclusive: tuple[Expert, Any] | None = None  # an attached ffn_adapter/full expert and its model

    def _weights(self, expert: Expert) -> Path:
        if expert.artifact is None:
            raise UserError(f"expert {expert.name} has no weights (status {expert.status})")
        return self.context.artifact_cache.fetch(expert.artifact)  # verified against the catalogue's sha256

    def _drop_exclusive(self) -> None:
        if self._exclusive is not None:
            expert, model = self._exclusive
            get_trainer(weights_kind(expert)).detach(self.backbone, model)
            self._exclusive = None

    def _drop_lora(self) -> None:
        if self._peft is not None:
            self.backbone.model = self._peft.unload()
            self._peft = None
            self._lora.clear()

    def _lora_model(self, expert: Expert) -> torch.nn.Module:
        self._drop_exclusive()
        name = f"expert_{expert.id}"
        if expert.id not in self._lora:
            folder = self.context.settings.cache_path / "peft" / f"{expert.artifact.sha256}"
            export_peft_folder(self._weights(expert), expert.config, folder)
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self.backbone.model, folder, adapter_name=name, is_trainable=False
                )
            else:
                self._peft.load_adapter(folder, adapter_name=name, is_trainable=False)
            self._lora[expert.id] = name
        self._lora.move_to_end(expert.id)
        self._peft.set_adapter(name)  # before evicting, so PEFT never deletes the active adapter
        while len(self._lora) > self.capacity:
            _, evicted = self._lora.popitem(last=False)
            self._peft.delete_adapter(evicted)
        self._peft.eval()
        return self._peft

    @contextmanager
    def use(self, expert: Expert | None) -> Iterator[torch.nn.Module]:
        """The model to run for ``expert`` (None: the plain backbone)."""
        # A merged expert is loaded as the kind its weights are in (its parents' kind).
        if expert is not None and weights_kind(expert) == "lora":
            yield self._lora_model(expert)
            return
        if expert is None:
            self._drop_exclusive()
            if self._peft is not None:
                with self._peft.disable_adapter():
                    yield self._peft
                return
            yield self.backbone.model
            return
        if weights_kind(expert) not in ("ffn_adapter", "full"):
            raise UserError(f"expert {expert.name} is of kind {expert.kind}, which cannot be loaded yet")
        if self._exclusive is None or self._exclusive[0].id != expert.id:
            self._drop_exclusive()
            self._drop_lora()
            model = get_trainer(weights_kind(expert)).attach(
                self.backbone, self._weights(expert), expert.config
            )
            self._exclusive = (expert, model)
        yield self._exclusive[1]

    @contextmanager
    def use_mixed(self, experts: Sequence[Expert]) -> Iterator[tuple[PeftModel, dict[int, str]]]:
        """Several LoRA experts resident at once, for batches that mix them (PEFT's ``adapter_names``).

        Yields the PEFT model and each expert's adapter name (``BASE_ADAPTER`` selects the plain backbone).

        Raises:
            UserError: An expert is not LoRA, or more distinct experts than the pool's capacity.
        """
        distinct = list({e.id: e for e in experts}.values())
        if len(distinct) > self.capacity:
            raise UserError(
                f"{len(distinct)} experts in one mixed batch, but the adapter pool holds {self.capacity}; "
                "split the batch or raise the capacity"
            )
        for expert in distinct:
            if expert.kind != "lora":
                raise UserError(
                    f"expert {expert.name} is of kind {expert.kind}: only LoRA experts mix in a batch"
                )
        for expert in distinct:
            self._lora_model(expert)  # loads it (verified) and marks it most recently used
        yield self._peft, {e.id: self._lora[e.id] for e in distinct}

    @property
    def resident(self) -> list[int]:
        """Expert ids currently on the backbone, least recently used first."""
        exclusive = [self._exclusive[0].id] if self._exclusive else []
        return list(self._lora) + exclusive
