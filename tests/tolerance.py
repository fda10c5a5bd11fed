"""The numerics rule (mta_reference.numerics), as test assertions."""
import torch

from mta_reference.numerics import rule_check


def check_rule(name: str, out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, dtype=None):
    """Assert the rule for one tensor; ``dtype`` is the input dtype (defaults to out's)."""
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values in the result"
    ok, err, bound, base = rule_check(out, ref, low, dtype)
    assert ok, f"{name}: max error {err:.3e} > bound {bound:.3e} (same-dtype reference error {base:.3e})"
    return err, bound
