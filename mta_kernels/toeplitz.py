"""Toeplitz matrices of the key-direction convolution, built on the host once per call, so
that kernels read them with plain loads instead of gathering taps (index math and masks
that had cost up to 90 registers per thread)."""
import torch


def toeplitz_matrices(w: torch.Tensor, pl: int, halo: int, width: int, transpose: bool,
                      dtype: torch.dtype) -> torch.Tensor:
    """(H, cq, 2 * halo + width, width) matrices T[h, a, u, m] = w[h, a, tap] for w (H, cq, ck),
    with tap = pl + (u - halo - m), or pl - (u - halo - m) when ``transpose``, and zero where
    the tap leaves [0, ck): input column c0 - halo + u times T gives output column c0 + m of
    the conv (or of its adjoint) along keys, for any tile start c0."""
    H, cq, ck = w.shape
    u = torch.arange(2 * halo + width, device=w.device)[:, None] - halo
    m = torch.arange(width, device=w.device)[None, :]
    tap = pl - (u - m) if transpose else pl + (u - m)
    inside = (tap >= 0) & (tap < ck)
    t = w.to(dtype)[:, :, tap.clamp(0, ck - 1)]
    return torch.where(inside, t, torch.zeros((), dtype=dtype, device=w.device)).contiguous()
