"""The spec's numerics rule (section 4), the one place tests compare to the reference.

With ``ref`` the reference in fp64 (or fp32) on the same inputs and ``low`` the reference
run in the input dtype, a result passes when

    max|out - ref| <= 2 * max|low - ref| + atol,

atol being a few ulps of the input dtype at the scale of ``ref``: the floor needed when
``low`` happens to be exact (for example a gradient that is 0 everywhere).
"""
import torch

ULPS = 4


def ulp_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    return ULPS * torch.finfo(dtype).eps * scale


def check_rule(name: str, out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, dtype=None):
    """Assert the rule for one tensor; ``dtype`` is the input dtype (defaults to out's)."""
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64, low64 = out.double(), ref.double(), low.double()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values in the result"
    err = (out64 - ref64).abs().max().item()
    base = (low64 - ref64).abs().max().item()
    bound = 2 * base + ulp_floor(ref64, dtype)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (same-dtype reference error {base:.3e})"
    return err, bound
