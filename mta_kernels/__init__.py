"""mta_kernels: fused Triton kernels for Multi-Token Attention (Golovneva et al., 2025)."""
from . import nn
from .api import mta_attention
from .nn import MTAConfig, MTATransformer, MTATransformerConfig, MultiTokenAttention
from .options import KernelOptions

__all__ = ["mta_attention", "KernelOptions", "MultiTokenAttention", "MTAConfig", "MTATransformer",
           "MTATransformerConfig", "nn"]
