"""The one way a stored expert goes on a loaded backbone: training, merge tuning, the adapter pool, mixed batches.

Before a kind's loader runs, this checks what every path needs checked: the weights' kind (a merged expert's is
its ``base_kind``, see ``registry.kinds.weights_kind``), that the expert was trained on this backbone (the
fingerprint recorded in its config), and that nothing else is on the backbone (an adapter pool holding it is
asked to take its experts off first).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from elmreg.experts.base import AdapterLoader, KindLoader
from elmreg.models.backbones import Backbone
from elmreg.registry.errors import ArtifactError, ConfigurationError, UserError
from elmreg.registry.kinds import get_expert_kind
from elmreg.registry.kinds.kind import import_object

_loaders: dict[str, KindLoader] = {}
_loaders_lock = threading.Lock()


def get_loader(kind: str) -> KindLoader:
    """The loader of a kind, imported from its declaration on first use.

    Raises:
        ConfigurationError: Unknown kind, or a declaration that names no loader of that kind.
    """
    with _loaders_lock:
        if kind not in _loaders:
            loader_class = import_object(get_expert_kind(kind).loader)
            if not (isinstance(loader_class, type) and issubclass(loader_class, KindLoader)):
                raise ConfigurationError(f"kind {kind}: {loader_class!r} is not a KindLoader")
            if loader_class.kind != kind:
                raise ConfigurationError(f"kind {kind}: its loader is declared for kind {loader_class.kind}")
            _loaders[kind] = loader_class()
        return _loaders[kind]


def _checked_kind(config: dict[str, Any], kind: str | None = None) -> str:
    """The kind of the weights ``config`` describes, which must be ``kind`` when one is expected.

    Raises:
        ConfigurationError: The config is of another kind, or of none that is registered.
    """
    stored = config.get("kind")
    if kind is not None and stored != kind:
        raise ConfigurationError(f"expert config is of kind '{stored}', not '{kind}'")
    get_expert_kind(stored)
    return stored


def _check_backbone(backbone: Backbone, config: dict[str, Any], label: str) -> None:
    """Refuse an expert trained on another backbone (one without a recorded fingerprint, e.g. imported, passes:
    its loader still checks that its shapes fit).

    Raises:
        ArtifactError: The fingerprints differ.
    """
    trained_on = config.get("backbone_fingerprint")
    if trained_on is not None and trained_on != backbone.fingerprint:
        raise ArtifactError(
            f"expert {label} was trained on backbone {config.get('backbone')} ({trained_on}), "
            f"not on {backbone.name} ({backbone.fingerprint})"
        )


def load_expert(
    backbone: Backbone,
    weights_path: Path,
    config: dict[str, Any],
    *,
    kind: str | None = None,
    label: str | None = None,
) -> Any:
    """Put a saved expert on an already loaded backbone (no reload); undo with :func:`unload_expert`.

    Args:
        backbone: The backbone the expert was trained on.
        weights_path: The expert's safetensors file.
        config: The expert's config as saved (``kind``, the kind's own fields, the backbone's fingerprint).
        kind: The kind the caller expects (``weights_kind(expert)`` for a catalogue expert).
        label: How messages name the expert (default: the weights file's name).

    Returns:
        The model to run (for ``lora`` a ``PeftModel`` around ``backbone.model``; otherwise ``backbone.model``
        itself, changed in place).

    Raises:
        UserError: Another expert is loaded on the backbone.
        ConfigurationError: The config is of another kind.
        ArtifactError: The expert was trained on another backbone, or its weights do not fit this one.
    """
    backbone.release()
    if backbone.active_expert is not None:
        raise UserError(
            f"a {backbone.active_expert} expert is already loaded on backbone {backbone.name}; unload it first"
        )
    kind = _checked_kind(config, kind)
    _check_backbone(backbone, config, label or weights_path.name)
    model = get_loader(kind).attach(backbone, weights_path, config)
    backbone.active_expert = kind
    return model


def unload_expert(backbone: Backbone, model: Any) -> None:
    """Take the expert that :func:`load_expert` returned as ``model`` off the backbone.

    Afterwards the backbone computes exactly what it computed before the expert was loaded.
    """
    if backbone.active_expert is None:
        return
    get_loader(backbone.active_expert).detach(backbone, model)
    backbone.active_expert = None


def load_adapter(
    model: Any | None,
    backbone: Backbone,
    weights_path: Path,
    config: dict[str, Any],
    *,
    adapter_name: str,
    kind: str | None = None,
    label: str | None = None,
) -> Any:
    """Load an expert of a mixable kind as one more named adapter on ``model`` (``None``: the first adapter).

    The caller (an adapter pool) owns the adapters and removes them with ``get_loader(kind).detach``.

    Raises:
        UserError: The kind does not mix (its experts change the backbone itself).
        ConfigurationError, ArtifactError: As for :func:`load_expert`.
    """
    kind = _checked_kind(config, kind)
    loader = get_loader(kind)
    if not (get_expert_kind(kind).mixable and isinstance(loader, AdapterLoader)):
        raise UserError(f"{kind} experts cannot sit side by side as adapters; load them one at a time")
    _check_backbone(backbone, config, label or weights_path.name)
    return loader.add_adapter(model, backbone, weights_path, config, adapter_name)
