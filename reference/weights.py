"""Identity weights and converters from the authors' parameter layouts (docs/spec.md, section 7)."""
import torch

from .validate import left_pad


def identity_conv(H: int, cq: int, ck: int, pad_key: str = "both", dtype=torch.float32, device=None):
    """(H, cq, ck) kernel that leaves the scores unchanged: 1 at [h, cq-1, pL]."""
    w = torch.zeros(H, cq, ck, dtype=dtype, device=device)
    w[:, cq - 1, left_pad(ck, pad_key)] = 1.0
    return w


def identity_mix(H: int, ch: int, dtype=torch.float32, device=None):
    """(H // ch, ch, ch) mixing weight that leaves every head unchanged."""
    if H % ch != 0:
        raise ValueError(f"ch={ch} must divide H={H}")
    return torch.eye(ch, dtype=dtype, device=device).repeat(H // ch, 1, 1)


def conv_from_official(mta_kernel: torch.Tensor) -> torch.Tensor:
    """Authors' ``mta_kernel`` / ``mta_kernel_after_sm`` (H, 1, cq, ck) -> ours (H, cq, ck)."""
    if mta_kernel.dim() != 4 or mta_kernel.shape[1] != 1:
        raise ValueError(f"mta_kernel must have shape (H, 1, cq, ck), got {tuple(mta_kernel.shape)}")
    return mta_kernel[:, 0]


def conv_to_official(conv: torch.Tensor) -> torch.Tensor:
    """Ours (H, cq, ck) -> the authors' (H, 1, cq, ck)."""
    return conv[:, None]


def mix_from_official_linear(weight: torch.Tensor) -> torch.Tensor:
    """Authors' ``wpsm.weight`` / ``wposm.weight`` (H, H), nn.Linear -> ours (1, H, H)."""
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"weight must have shape (H, H), got {tuple(weight.shape)}")
    return weight[None]


def mix_from_official_head_kernel(head_kernel: torch.Tensor) -> torch.Tensor:
    """Authors' ``head_kernel`` (G, ch, ch) indexed [group, in, out] -> ours [group, out, in]."""
    if head_kernel.dim() != 3 or head_kernel.shape[1] != head_kernel.shape[2]:
        raise ValueError(f"head_kernel must have shape (G, ch, ch), got {tuple(head_kernel.shape)}")
    return head_kernel.transpose(1, 2)


def mix_to_official_head_kernel(mix: torch.Tensor) -> torch.Tensor:
    """Ours (G, ch, ch) [group, out, in] -> the authors' head_kernel [group, in, out]."""
    return mix.transpose(1, 2)
