"""Shared builders for kernel tests: random inputs, random or paper-style weights."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

import mta_reference


@dataclass(frozen=True)
class Case:
    """One MTA configuration. Conv sizes are (cq, ck); mixes are group sizes ch (None: absent)."""

    B: int = 1
    H: int = 4
    Hkv: Optional[int] = None
    L: int = 37
    D: int = 32
    pre_conv: Optional[Tuple[int, int]] = None
    pre_mix: Optional[int] = None
    post_conv: Optional[Tuple[int, int]] = None
    post_mix: Optional[int] = None
    causal: bool = True
    pad_key: str = "both"
    layout: str = "bhld"  # or "blhd": q, k, v are (B, L, H, D) tensors transposed (non-contiguous)

    @property
    def id(self) -> str:
        parts = [f"B{self.B}-H{self.H}" + (f"kv{self.Hkv}" if self.Hkv else "") + f"-L{self.L}-D{self.D}"]
        for name in ("pre_conv", "pre_mix", "post_conv", "post_mix"):
            val = getattr(self, name)
            if val is not None:
                parts.append(f"{name}{'x'.join(map(str, val)) if isinstance(val, tuple) else val}")
        if not self.causal:
            parts.append("noncausal")
        if self.pad_key != "both":
            parts.append(self.pad_key)
        if self.layout != "bhld":
            parts.append(self.layout)
        return "-".join(parts)


def make_inputs(case: Case, dtype, device, seed=0, requires_grad=False):
    """q, k, v (in the case's layout) and the four weights (fp32; random, not identity)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Hkv = case.Hkv or case.H

    def qkv(heads):
        shape = (case.B, heads, case.L, case.D) if case.layout == "bhld" else (case.B, case.L, heads, case.D)
        x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        x = x if case.layout == "bhld" else x.transpose(1, 2)
        return x.requires_grad_(requires_grad)

    q, k, v = qkv(case.H), qkv(Hkv), qkv(Hkv)

    def conv(size):
        if size is None:
            return None
        cq, ck = size
        w = mta_reference.identity_conv(case.H, cq, ck, case.pad_key) + 0.3 * torch.randn(case.H, cq, ck, generator=g)
        return w.to(device).requires_grad_(requires_grad)

    def mix(ch):
        if ch is None:
            return None
        w = mta_reference.identity_mix(case.H, ch) + 0.3 * torch.randn(case.H // ch, ch, ch, generator=g)
        return w.to(device).requires_grad_(requires_grad)

    return q, k, v, conv(case.pre_conv), mix(case.pre_mix), conv(case.post_conv), mix(case.post_mix)
