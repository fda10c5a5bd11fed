"""What is benchmarked: the ops (which MTA parts are on), the shapes, the modes, the
inputs and weights of one case, its FLOP count and the naive path's memory estimate.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from mta_reference import identity_conv, identity_mix

PARTS = ("pre_conv", "pre_mix", "post_conv", "post_mix")

# op name -> the MTA parts it switches on. Mixing is always over all H heads (ch = H).
OPS: Dict[str, tuple] = {
    "full": PARTS,
    "talking_heads": ("pre_mix", "post_mix"),
    "pre_conv": ("pre_conv",),
    "pre_mix": ("pre_mix",),
    "post_conv": ("post_conv",),
    "post_mix": ("post_mix",),
    "none": (),
}
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

PAPER_L = 2048
PAPER_TOKENS = 16384  # B * L per layer call: B = 8 at L = 2048
SWEEP_L = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclass(frozen=True)
class Shape:
    """q is (B, H, L, D); k and v are (B, Hkv, L, D)."""

    B: int
    H: int
    Hkv: int
    L: int
    D: int


# The attention layers of the paper's released models (spec section 6): name -> (H, D).
PAPER_LAYERS = {"300M": (16, 64), "550M": (10, 128), "830M": (16, 96), "1B": (16, 128)}


def paper_shapes():
    B = PAPER_TOKENS // PAPER_L
    return [Shape(B, H, H, PAPER_L, D) for H, D in PAPER_LAYERS.values()]


def sweep_shapes(lengths=SWEEP_L):
    return [Shape(1, 16, 16, L, 128) for L in lengths]


def cpu_shapes():
    """The tiny shape for the Triton interpreter on CPU (correctness of the harness, not speed)."""
    return [Shape(1, 4, 4, 32, 32)]


# The GPU gate: (B, H, L, D), Hkv = H, with its ops, modes and providers.
GRID = ((1, 16, 4096, 128), (4, 16, 2048, 96), (8, 16, 2048, 64), (8, 16, 2048, 128), (8, 16, 1024, 64),
        (2, 16, 8192, 128), (1, 16, 16384, 128), (1, 16, 32768, 128), (1, 16, 131072, 128))
GRID_OPS = ("none", "talking_heads", "full", "pre_conv", "post_conv")
GRID_MODES = ("fwd", "fwd+bwd")
GRID_PROVIDERS = ("fused", "sdpa")


def grid_shapes():
    return [Shape(B, H, H, L, D) for B, H, L, D in GRID]


SHAPE_SETS = ("paper", "sweep", "all", "grid", "tiny")


def shape_set(name: str, lengths=None, max_l=None):
    """The shapes of a named set. ``lengths``: the sweep's L values (default SWEEP_L); for the
    other sets, keep only shapes with these L. ``max_l``: keep only shapes with L <= max_l."""
    shapes = {
        "paper": paper_shapes,
        "sweep": lambda: sweep_shapes(lengths or SWEEP_L),
        "all": lambda: paper_shapes() + sweep_shapes(lengths or SWEEP_L),
        "grid": grid_shapes,
        "tiny": cpu_shapes,
    }[name]()
    if lengths and name not in ("sweep", "all"):
        shapes = [s for s in shapes if s.L in lengths]
    if max_l:
        shapes = [s for s in shapes if s.L <= max_l]
    return shapes


def shape_label(B: int, H: int, Hkv: int, L: int, D: int) -> str:
    """'1B layer B8 H16 L2048 D128' for a paper layer, else 'B1 H16 L4096 D128' (+ 'Hkv4')."""
    dims = f"B{B} H{H}" + (f" Hkv{Hkv}" if Hkv != H else "") + f" L{L} D{D}"
    for name, (h, d) in PAPER_LAYERS.items():
        if (H, Hkv, D, L, B) == (h, h, d, PAPER_L, PAPER_TOKENS // PAPER_L):
            return f"{name} layer {dims}"
    return dims


def make_inputs(shape: Shape, dtype, device, requires_grad: bool):
    """q, k, v drawn from N(0, 1) in ``dtype``."""
    q = torch.randn(shape.B, shape.H, shape.L, shape.D, dtype=dtype, device=device)
    k = torch.randn(shape.B, shape.Hkv, shape.L, shape.D, dtype=dtype, device=device)
    v = torch.randn(shape.B, shape.Hkv, shape.L, shape.D, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def make_weights(op: str, H: int, conv: tuple, device, requires_grad: bool,
                 noise: float = 0.01) -> Dict[str, Optional[torch.Tensor]]:
    """Identity init plus ``noise * randn``, fp32, for the parts ``op`` switches on.

    conv is (cq, ck); the mixes are over all H heads, as in the released models.
    Returns {part: tensor or None} for every part in PARTS.
    """
    cq, ck = conv
    builders = {
        "pre_conv": lambda: identity_conv(H, cq, ck, device=device),
        "post_conv": lambda: identity_conv(H, cq, ck, device=device),
        "pre_mix": lambda: identity_mix(H, H, device=device),
        "post_mix": lambda: identity_mix(H, H, device=device),
    }
    weights = {}
    for part in PARTS:
        if part in OPS[op]:
            w = builders[part]()
            w = w + noise * torch.randn_like(w)
            weights[part] = w.requires_grad_(requires_grad)
        else:
            weights[part] = None
    return weights


# The FLOP convention for TFLOP/s: the standard attention count, whatever the op. MTA's
# extra work (convs, mixes) is not counted, so TFLOP/s compares directly with SDPA's.
FLOP_FORMULA = ("fwd = 4*B*H*L*L*D (halved when causal); bwd = 2.5 * fwd; fwd+bwd = 3.5 * fwd. "
                "Standard attention FLOPs for every op: the MTA convs and mixes are not counted.")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(shape: Shape, mode: str, causal: bool = True) -> float:
    fwd = 4.0 * shape.B * shape.H * shape.L * shape.L * shape.D
    if causal:
        fwd /= 2
    return fwd * MODE_FLOP_FACTOR[mode]


def naive_memory_estimate_gib(shape: Shape, op: str, mode: str, dtype) -> float:
    """Rough peak of the materialized reference, in GiB, to skip sizes that cannot fit.

    Per (B, H, L, L) score: forward holds the scores in the input dtype plus the fp32
    softmax input and output; with a backward, about one saved tensor per stage in the
    input dtype (matmul, mask, each part, probabilities) plus the fp32 softmax output.
    Checked against the H200 anchors (full MTA fwd+bwd, bf16: ~14 bytes/score measured,
    16 estimated; talking heads ~10 measured, 12 estimated).
    """
    scores = shape.B * shape.H * shape.L * shape.L
    elt = torch.finfo(dtype).bits // 8
    if mode == "fwd":
        per_score = 2 * elt + 8
    else:
        per_score = elt * (2 + len(OPS[op])) + 4
    return scores * per_score / 2**30
