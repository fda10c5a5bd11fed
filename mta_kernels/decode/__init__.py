"""The fused decode step: a few query rows at the end of long sequences, keys split across programs."""
from .forward import decode_applies, mta_decode_fwd

__all__ = ["mta_decode_fwd", "decode_applies"]
