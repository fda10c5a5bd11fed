"""The numerics rule every kernel answers to (docs/spec.md section 4).

With ``ref`` the reference in fp64 (or fp32) on the same inputs and ``low`` the reference run
in the input dtype, a result ``out`` passes when

    max|out - ref| <= 2 * max|low - ref| + atol,

atol covering only what any correct result carries beyond the reference's own error: its
rounding to its dtype (half an ulp at the scale of ref's largest entry) and the noise of
fp32 accumulation (four fp32 ulps at the scale of max(|ref|, 1)), which shows where the true
value cancels to about zero and ``low`` happens to cancel exactly. In 16 bits that floor is
half an ulp of the output, far below the same-dtype reference's own error (several ulps), so
that the 2x rule is what decides.
"""
import torch


def ulp_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Half an ulp of ``dtype`` at the scale of ref's largest entry, plus four ulps of the
    accumulator (fp32; fp64 for fp64) at the scale of max(|ref|, 1)."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return 0.5 * torch.finfo(dtype).eps * scale + 4 * torch.finfo(acc).eps * max(scale, 1.0)


def rule_check(out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, dtype: torch.dtype):
    """(passes, error, bound, same-dtype error) of ``out`` under the rule; non-finite fails."""
    out64, ref64, low64 = out.double(), ref.double(), low.double()
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    base = (low64 - ref64).abs().max().item() if out.numel() else 0.0
    bound = 2 * base + ulp_floor(ref64, dtype)
    ok = bool(torch.isfinite(out64).all()) and err <= bound
    return ok, err, bound, base
