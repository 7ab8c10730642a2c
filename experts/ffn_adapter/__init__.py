"""The paper's parallel FFN adapter experts: h = FFN_e(u) + FFN_d(u) + u, only FFN_e trained."""

from elmreg.experts.ffn_adapter.loader import FfnAdapterLoader

__all__ = ["FfnAdapterLoader"]
