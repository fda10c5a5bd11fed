"""mta_kernels: fused Triton kernels for Multi-Token Attention (Golovneva et al., 2025)."""
from . import models
from .api import INTERPRETER, mta_attention
from .layer import MTAConfig, MultiTokenAttention

__all__ = ["mta_attention", "MultiTokenAttention", "MTAConfig", "models", "INTERPRETER"]
