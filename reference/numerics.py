"""The numerics rule every kernel answers to (docs/spec.md section 4).

With ``ref`` the reference in fp64 (or fp32) on the same inputs and ``low`` the reference run
in the input dtype, a result ``out`` passes when

    max|out - ref| <= 2 * max|low - ref| + atol,

atol being one ulp of the input dtype at the scale of ref's largest entry: the result's own
rounding to its dtype, which the rule must allow where ``low`` happens to be exact (a gradient
that is 0 everywhere, say), and far below the same-dtype reference's own error otherwise, so
that the 2x rule is what decides.
"""
import torch


def ulp_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """One ulp of ``dtype`` at the scale of ref's largest entry (plus the dtype's tiny)."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return torch.finfo(dtype).eps * scale + torch.finfo(dtype).tiny


def rule_check(out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, dtype: torch.dtype):
    """(passes, error, bound, same-dtype error) of ``out`` under the rule; non-finite fails."""
    out64, ref64, low64 = out.double(), ref.double(), low.double()
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    base = (low64 - ref64).abs().max().item() if out.numel() else 0.0
    bound = 2 * base + ulp_floor(ref64, dtype)
    ok = bool(torch.isfinite(out64).all()) and err <= bound
    return ok, err, bound, base
