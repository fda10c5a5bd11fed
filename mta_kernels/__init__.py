"""mta_kernels: fused Triton kernels for Multi-Token Attention (Golovneva et al., 2025)."""
from .api import INTERPRETER, mta_attention

__all__ = ["mta_attention", "INTERPRETER"]
