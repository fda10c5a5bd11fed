"""Plain attention (no MTA part): Triton flash attention, and torch SDPA on CUDA."""
from .attention import flash_bwd, flash_fwd, sdpa

__all__ = ["flash_fwd", "flash_bwd", "sdpa"]
