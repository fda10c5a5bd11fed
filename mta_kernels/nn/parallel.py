"""Data-parallel and fully sharded training of MTATransformer through PyTorch's own engines.

    model = shard(model, "fsdp", param_dtype=torch.bfloat16, checkpoint=True)   # after init_process_group

'ddp' wraps the model in DistributedDataParallel; 'fsdp' applies FSDP2's fully_shard to every
transformer block and then to the model (each block's parameters, the small conv and mix
weights among them, gathered before its forward and backward, their gradients reduce-
scattered after), with a mixed-precision policy; checkpoint=True recomputes each block's
activations in the backward. The MTA op needs nothing special under either: its weights are
ordinary parameters (plain tensors or DTensors gathered by FSDP before the block runs).
"""
import torch
from torch import nn

MODES = ("ddp", "fsdp")


def checkpointed(model: nn.Module) -> nn.Module:
    """Wrap every TransformerBlock of ``model`` so that its activations are recomputed in the backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)
    return model


def shard(model: nn.Module, mode: str, *, param_dtype=None, reduce_dtype=torch.float32, checkpoint=False,
          device_ids=None) -> nn.Module:
    """``model`` (an MTATransformer, already on this rank's device) for data-parallel training
    under the current process group: mode 'ddp' or 'fsdp'. param_dtype: FSDP2's compute dtype
    for parameters (None: theirs); reduce_dtype: its gradient reduction dtype. Returns the
    module to train (DDP's wrapper, or the model itself for FSDP2)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if checkpoint:
        model = checkpointed(model)
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
