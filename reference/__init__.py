"""mta_reference: the plain-PyTorch Multi-Token Attention that keeps the kernels honest."""
from .backward import key_query_conv_backward, mix_heads_backward, mta_attention_backward
from .mta import future_mask, key_query_conv, mix_heads, mta_attention
from .validate import (PAD_KEYS, Problem, conv_row_halo, left_pad, validate, validate_block,
                       validate_packed)
from .weights import (conv_from_official, conv_to_official, identity_conv, identity_mix,
                      mix_from_official_head_kernel, mix_from_official_linear,
                      mix_to_official_head_kernel)

__all__ = [
    "mta_attention", "mta_attention_backward", "key_query_conv_backward", "mix_heads_backward",
    "key_query_conv", "mix_heads", "future_mask", "validate", "validate_block", "validate_packed",
    "conv_row_halo", "left_pad",
    "Problem", "PAD_KEYS", "identity_conv", "identity_mix", "conv_from_official",
    "conv_to_official", "mix_from_official_linear", "mix_from_official_head_kernel",
    "mix_to_official_head_kernel",
]
