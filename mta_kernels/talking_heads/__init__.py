"""Talking heads (both head mixes of one group size, no conv): row-chunked forward and backward."""
from .backward import talking_heads_chunked_bwd
from .forward import talking_heads_chunked_fwd

__all__ = ["talking_heads_chunked_fwd", "talking_heads_chunked_bwd"]
