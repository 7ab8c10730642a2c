"""Experts on a backbone: each kind's stored weight format and loader, and the one loader every caller uses.

Below both ``trainers`` (which writes these formats) and ``inference`` (which serves them); the list of kinds
itself is in ``registry.kinds``.
"""

from elmreg.experts.base import AdapterLoader, KindLoader
from elmreg.experts.loader import get_loader, load_adapter, load_expert, unload_expert

__all__ = [
    "AdapterLoader",
    "KindLoader",
    "get_loader",
    "load_adapter",
    "load_expert",
    "unload_expert",
]
