"""Plain attention (no MTA part): Triton flash attention, and torch SDPA on CUDA."""
from .attention import flash_bwd, flash_fwd, lse_dtype, sdpa, sdpa_block, sdpa_varlen

__all__ = ["flash_fwd", "flash_bwd", "lse_dtype", "sdpa", "sdpa_block", "sdpa_varlen"]
