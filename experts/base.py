"""The interface of a kind's loader: how a saved expert of that kind goes on a loaded backbone and comes off.

Callers use :mod:`elmreg.experts.loader` (which checks the backbone and the kind first), not loaders directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from elmreg.models.backbones import Backbone


class KindLoader(ABC):
    """Puts saved experts of one kind on a backbone and takes them off, leaving it exactly as it was."""

    kind: ClassVar[str]

    @abstractmethod
    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> Any:
        """Put a saved expert on the backbone; return the model to run."""

    @abstractmethod
    def detach(self, backbone: Backbone, model: Any) -> None:
        """Take what :meth:`attach` (or :meth:`AdapterLoader.add_adapter`) put on the backbone off again."""


class AdapterLoader(KindLoader):
    """A loader of a mixable kind (see ``ExpertKind.mixable``): experts become named PEFT adapters side by side."""

    @abstractmethod
    def add_adapter(
        self,
        model: Any | None,
        backbone: Backbone,
        weights_path: Path,
        config: dict[str, Any],
        adapter_name: str,
    ) -> Any:
        """Load an expert as the adapter ``adapter_name`` next to those already on ``model``.

        Args:
            model: The PEFT model holding the adapters loaded so far, or ``None`` for the first one.

        Returns:
            The PEFT model (``model`` itself after the first adapter); :meth:`detach` removes them all.
        """
