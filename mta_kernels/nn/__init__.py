"""Modules built on the op: the MTA attention layer and a decoder-only model."""
from .layer import PAPER_CONV, PAPER_MODELS, MTAConfig, MultiTokenAttention, apply_rope, rope_angles, with_backend
from .model import FeedForward, MTATransformer, MTATransformerConfig, RMSNorm, TransformerBlock, train_step
from .official import (OfficialTransformerConfig, load_official_checkpoint, load_official_state_dict,
                       official_state_dict, official_transformer_config)

__all__ = ["MultiTokenAttention", "MTAConfig", "MTATransformer", "MTATransformerConfig", "TransformerBlock",
           "FeedForward", "RMSNorm", "train_step", "PAPER_MODELS", "PAPER_CONV", "apply_rope", "rope_angles",
           "with_backend", "OfficialTransformerConfig", "official_transformer_config", "load_official_checkpoint",
           "load_official_state_dict", "official_state_dict"]
