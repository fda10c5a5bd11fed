"""The fused forward against the reference, under the spec's tolerance rule."""
import pytest
import torch
import torch.nn.functional as F

import mta_kernels
import mta_reference
from cases import Case, make_inputs
from mta_reference.mta import forward_intermediates
from tolerance import check_rule

FULL = dict(pre_conv=(3, 5), pre_mix=4, post_conv=(2, 3), post_mix=4)

CPU_CASES = [
    Case(),
    Case(causal=False),
    Case(L=1, **FULL),
    Case(L=2, pre_conv=(3, 5), post_conv=(4, 3)),               # L < cq and L < ck
    Case(pre_conv=(3, 5)),
    Case(pre_conv=(4, 4), pad_key="left"),
    Case(pre_conv=(2, 4), pad_key="right"),
    Case(pre_mix=2),
    Case(post_conv=(3, 5)),
    Case(post_conv=(2, 4), pad_key="left"),
    Case(post_conv=(3, 2), pad_key="right"),
    Case(post_mix=4),
    Case(pre_mix=4, post_mix=4),                                 # talking heads
    Case(L=70, **FULL),                                         # L crosses a tile edge
    Case(L=70, causal=False, **FULL),
    Case(L=70, pad_key="left", pre_conv=(3, 4), pre_mix=2, post_conv=(2, 6), post_mix=4),
    Case(L=70, pad_key="right", causal=False, pre_conv=(3, 4), post_conv=(2, 6), post_mix=2),
    Case(B=2, H=4, Hkv=2, L=45, **FULL),                         # GQA, batch > 1
    Case(H=4, Hkv=1, L=45, pre_conv=(3, 5), post_mix=2),       # MQA
    Case(H=10, L=40, D=16, pre_mix=10, post_mix=10),             # H = 10, full mixing
    Case(H=10, L=40, D=16, pre_conv=(2, 3), pre_mix=10, post_conv=(2, 3), post_mix=5),
    Case(H=6, L=40, D=16, pre_mix=2, post_mix=3),                # different group sizes (lcm 6)
    # mixing without convs, groups of >= 8 heads: the register kernel (mix_kernels.py)
    Case(H=8, L=45, D=24, pre_mix=8),                            # pre_mix alone: one online-softmax pass
    Case(B=2, H=16, Hkv=4, L=33, D=16, pre_mix=16, causal=False, layout="blhd"),
    Case(H=8, L=1, D=16, pre_mix=8),
    Case(H=8, L=45, D=24, post_mix=8, causal=False),
    Case(B=2, H=16, Hkv=4, L=33, D=16, pre_mix=8, post_mix=16),
    Case(H=16, L=20, D=16, pre_mix=8, post_mix=4),                # two head blocks, block-diagonal post mix
    Case(H=8, L=50, D=96, pre_mix=8, post_mix=8, layout="blhd"),
    Case(D=96, L=50, **FULL),                                    # D not a power of two
    Case(D=20, L=33, pre_conv=(2, 3)),
    Case(L=60, layout="blhd", **FULL),                           # non-contiguous q, k, v
    Case(L=90, pre_conv=(8, 15), post_conv=(8, 15)),             # the largest kernels we promise
    Case(L=24, D=256),                                           # the widest heads we promise
    Case(H=8, L=24, D=256, pre_mix=8, post_mix=8),               # (talking heads take the general kernel)
]


def _run_and_check(case, dtype, device, scale=None):
    q, k, v, *w = make_inputs(case, dtype, device)
    opts = dict(causal=case.causal, pad_key=case.pad_key, scale=scale)
    out = mta_kernels.mta_attention(q, k, v, *w, **opts)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=dtype, **opts)
    assert out.dtype == q.dtype and out.shape == q.shape
    check_rule("out", out, ref, low, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_forward_matches_reference(case, dtype, device):
    _run_and_check(case, dtype, device)


def test_conv_sizes_beyond_the_kernels_limits_are_refused(device):
    case = Case(L=20, D=16)
    q, k, v, *_ = make_inputs(case, torch.float32, device)
    with pytest.raises(ValueError, match="pre_conv/post_conv"):
        mta_kernels.mta_attention(q, k, v, pre_conv=torch.zeros(4, 18, 3), post_conv=torch.zeros(4, 17, 3))
    with pytest.raises(ValueError, match="pre_conv/post_conv"):
        mta_kernels.mta_attention(q, k, v, pre_conv=torch.zeros(4, 2, 41), post_conv=torch.zeros(4, 2, 27))
    # exactly at the limits: still the reference's answer
    w = dict(pre_conv=torch.randn(4, 17, 3, device=device) * 0.2, post_conv=torch.randn(4, 17, 33, device=device) * 0.2)
    out = mta_kernels.mta_attention(q, k, v, **w)
    ref = mta_reference.mta_attention(q, k, v, **w, compute_dtype=torch.float64)
    check_rule("out", out, ref, mta_reference.mta_attention(q, k, v, **w), torch.float32)


def test_custom_scale(device):
    _run_and_check(Case(L=40, **FULL), torch.float32, device, scale=0.37)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pad_key", ["both", "left", "right"])
def test_identity_weights_equal_sdpa(causal, pad_key, device):
    H, L, D = 4, 50, 32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, H, L, D, generator=g).to(device) for _ in range(3))
    ck = 5 if pad_key == "both" else 4
    w = dict(pre_conv=mta_reference.identity_conv(H, 3, ck, pad_key, device=device),
             pre_mix=mta_reference.identity_mix(H, 4, device=device),
             post_conv=mta_reference.identity_conv(H, 2, ck, pad_key, device=device),
             post_mix=mta_reference.identity_mix(H, 2, device=device))
    out = mta_kernels.mta_attention(q, k, v, **w, causal=causal, pad_key=pad_key)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    assert (out.double() - expected).abs().max().item() < 2e-6


@pytest.mark.parametrize("parts", [
    dict(pre_conv=(3, 5)), dict(post_conv=(3, 5)), dict(post_conv=(2, 5)), dict(pre_mix=4),
    dict(post_mix=4), FULL,
], ids=["pre_conv", "post_conv-both", "post_conv-2x5", "pre_mix", "post_mix", "full"])
@pytest.mark.parametrize("pad_key", ["both", "left", "right"])
def test_causality(parts, pad_key, device):
    """Perturbing q, k, v at positions >= t leaves outputs < t unchanged."""
    if pad_key != "both":
        parts = {n: (s[0], s[1] + 1) if isinstance(s, tuple) else s for n, s in parts.items()}
    case = Case(L=48, pad_key=pad_key, **parts)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    t = 29
    out = mta_kernels.mta_attention(q, k, v, *w, pad_key=pad_key)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
    out2 = mta_kernels.mta_attention(q2, k2, v2, *w, pad_key=pad_key)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.equal(out[:, :, t:], out2[:, :, t:])


def test_large_logits_stay_finite(device):
    """|S| up to 1e4: no inf or NaN, and still the reference's answer."""
    case = Case(L=40, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    q = q * 60.0
    k = k * 60.0
    out = mta_kernels.mta_attention(q, k, v, *w)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float32)
    assert torch.isfinite(out).all()
    check_rule("out", out, ref, low, torch.float32)


# ---- GPU: realistic sizes in bf16 and fp16 ----

PAPER = dict(pre_conv=(6, 11), pre_mix=16, post_conv=(6, 11), post_mix=16)
GPU_CASES = [
    Case(H=16, L=2048, D=64, **PAPER),
    Case(H=16, L=2048, D=96, **PAPER),
    Case(H=16, L=4096, D=128, **PAPER),
    Case(H=16, L=2048, D=128, pre_mix=16, post_mix=16),
    Case(H=16, L=4096, D=128),
    Case(B=2, H=16, Hkv=4, L=1000, D=128, **PAPER),
    Case(H=10, L=2048, D=128, pre_conv=(6, 11), pre_mix=10, post_conv=(6, 11), post_mix=10),
    Case(H=10, L=2048, D=128, pre_mix=10, post_mix=10),
    Case(B=2, H=16, Hkv=4, L=1000, D=96, pre_mix=16),
    Case(H=16, L=2048, D=64, causal=False, **PAPER),
    Case(H=16, L=1024, D=256),
    Case(H=16, L=1024, D=256, pre_mix=16, post_mix=16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_forward_gpu(case, dtype):
    _run_and_check(case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunked_talking_heads_gpu(dtype, monkeypatch):
    """Talking heads through the row-chunked forward (the post mix in the softmax's kernel),
    forced (as 'auto' takes it at L=4096 on CUDA), under the spec's rule."""
    from mta_kernels import chunked_forward
    monkeypatch.setattr(chunked_forward, "CHUNKED_TALKING_HEADS", "1")
    _run_and_check(Case(H=16, L=4096, D=128, pre_mix=16, post_mix=16), dtype, "cuda")


@pytest.mark.gpu
def test_long_sequence_runs():
    case = Case(H=16, L=32768, D=128, **PAPER)
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = mta_kernels.mta_attention(q, k, v, *w)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    print(f"L=32768 full MTA forward: peak {extra / 2**30:.2f} GiB beyond inputs and output")
    assert torch.isfinite(out).all()
    assert extra < 2 * 2**30, f"{extra / 2**30:.2f} GiB beyond inputs and output"


@pytest.mark.gpu
@pytest.mark.parametrize("parts", [{}, dict(pre_mix=16, post_mix=16), PAPER], ids=["none", "talking-heads", "full"])
def test_longest_sequence_last_rows(parts):
    """L = 65536 (offsets past int32 range in the scores' index space): the last 64 rows
    against the reference computed on those rows only (with the convs' halo above them)."""
    from mta_reference.mta import forward_intermediates

    case = Case(H=16, L=65536, D=128, **parts)
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda")
    out = mta_kernels.mta_attention(q, k, v, *w)
    L, rows = case.L, 64
    lo = L - rows - 10 * ("pre_conv" in parts)

    def reference_rows(dtype):
        t = forward_intermediates(q, k, v, *w, compute_dtype=dtype, row_range=(lo, L))
        return torch.matmul(t.a, t.v)[:, :, -rows:]

    check_rule("out[-64:]", out[:, :, -rows:], reference_rows(torch.float32), reference_rows(torch.bfloat16),
               torch.bfloat16)


MANY_FRAME_CASES = [
    Case(L=150, D=16, pre_conv=(3, 5), post_conv=(2, 3)),
    Case(B=2, H=4, Hkv=2, L=150, D=24, pre_conv=(3, 4), pre_mix=2, pad_key="left"),
    Case(L=100, D=16, pre_conv=(2, 4), causal=False, pad_key="right"),
    Case(L=200, D=16, pre_conv=(6, 11), pre_mix=4, post_conv=(6, 11), post_mix=4),
]


@pytest.mark.parametrize("case", MANY_FRAME_CASES, ids=lambda c: c.id)
def test_general_kernel_many_frames(case, device):
    """Several row and key frames per head (halos crossing frame edges), paper-sized convs."""
    _run_and_check(case, torch.float32, device)


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("case", [Case(L=70, **FULL), Case(L=70, pre_conv=(3, 5), post_conv=(2, 5)),
                                  Case(B=2, H=4, Hkv=2, L=45, causal=False, pad_key="left", **FULL),
                                  Case(H=8, L=60, D=16, pre_mix=8, post_mix=8)], ids=lambda c: c.id)
def test_key_splits(case, splits, device):
    """Each row block's keys split into ranges (separate programs, combined on the host):
    still the reference's answer, and the lse of one split."""
    from mta_kernels import forward

    q, k, v, *w = make_inputs(case, torch.float32, device)
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    cfg = dict(general=True, W=32)   # several key tiles per row block at these lengths
    out, lse = forward.mta_forward(q, k, v, *w, case.causal, case.pad_key, case.D ** -0.5, dict(cfg, splits=splits))
    one, lse_one = forward.mta_forward(q, k, v, *w, case.causal, case.pad_key, case.D ** -0.5, dict(cfg, splits=1))
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float32, **opts)
    check_rule("out", out, ref, low, torch.float32)
    assert (lse - lse_one).abs().max().item() < 1e-4


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("case", [Case(H=8, L=45, D=24, pre_mix=8),                 # one online-softmax pass
                                  Case(B=2, H=16, Hkv=4, L=50, D=16, pre_mix=8, post_mix=16),
                                  Case(H=8, L=40, D=16, post_mix=8, causal=False)], ids=lambda c: c.id)
def test_mix_forward_key_splits(case, splits, device):
    """The talking-heads forward with each row block's keys in 2, 3 and 8 ranges (some
    empty for the first causal rows): the reference's answer, and the lse of one range."""
    from mta_kernels import forward

    q, k, v, *w = make_inputs(case, torch.float32, device)
    scale = case.D ** -0.5
    out, lse = forward.mix_forward(q, k, v, w[1], w[3], case.causal, scale, dict(splits=splits))
    _, lse_one = forward.mix_forward(q, k, v, w[1], w[3], case.causal, scale, dict(splits=1))
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float32, **opts)
    check_rule("out", out, ref, low, torch.float32)
    assert (lse - lse_one).abs().max().item() < 1e-4


def test_key_split_count():
    from mta_kernels import forward
    from mta_kernels.forward import MAX_KEY_SPLITS, TARGET_PROGRAMS, key_splits

    assert key_splits(TARGET_PROGRAMS, 100) == 1            # the row blocks fill the GPU
    assert key_splits(TARGET_PROGRAMS // 4, 100) == 4
    assert key_splits(1, 100) == MAX_KEY_SPLITS
    assert key_splits(1, 3) == 3                             # never more ranges than key tiles
    assert forward.mix_forward_splits(forward.MIX_FWD_SPLIT_BELOW, 100) == 1
    assert forward.mix_forward_splits(1, 100) == forward.MIX_FWD_SPLITS
    assert forward.mix_forward_splits(1, 2) == 2



CHUNKED_FORWARD_CASES = [
    Case(L=1, **FULL),
    Case(L=2, pre_conv=(3, 5), post_conv=(4, 3)),               # L < cq and L < ck
    Case(pre_conv=(4, 4), pad_key="left"),
    Case(post_conv=(3, 2), pad_key="right", causal=False),
    Case(L=70, **FULL),
    Case(L=70, causal=False, **FULL),
    Case(B=2, H=4, Hkv=2, L=45, **FULL),                         # GQA, batch > 1
    Case(H=10, L=40, D=16, pre_conv=(2, 3), pre_mix=10, post_conv=(2, 3), post_mix=5),
    Case(D=96, L=50, **FULL),
    Case(L=60, layout="blhd", **FULL),                           # non-contiguous q, k, v
    Case(L=70, pre_mix=4, post_mix=4),                           # talking heads: post mix in the softmax's kernel
    Case(H=10, Hkv=5, L=40, pre_mix=10, post_mix=10, causal=False),
    Case(H=6, L=40, pre_mix=3, post_mix=2),                      # mixes of two group sizes: no fusion
]


def _reference_lse(q, k, v, w, opts, dtype):
    """Log-sum-exp of each row of the reference's masked pre-softmax logits."""
    t = forward_intermediates(q, k, v, *w, compute_dtype=dtype, **opts)
    return torch.logsumexp(t.m.masked_fill(t.future, float("-inf")).double(), dim=-1)


@pytest.mark.parametrize("rows", [None, 7], ids=["one-chunk", "7-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CHUNKED_FORWARD_CASES, ids=lambda c: c.id)
def test_chunked_forward_matches_reference(case, dtype, rows, device):
    """The row-chunked forward (MTA_KERNELS_CHUNKED_FORWARD) against the reference: output
    and log-sum-exp, with chunks of 7 rows below the convs' halos of up to 5 rows (the
    first cq-1 rows, chunk edges inside a conv's reach) and in one chunk."""
    from mta_kernels.chunked_forward import chunked_forward
    q, k, v, *w = make_inputs(case, dtype, device)
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    scale = case.D ** -0.5
    out, lse = chunked_forward(q, k, v, *w, **opts, scale=scale, rows=rows)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=dtype, **opts)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    check_rule("out", out, ref, low, dtype)
    check_rule("lse", lse, _reference_lse(q, k, v, w, opts, torch.float64),
               _reference_lse(q, k, v, w, opts, dtype), dtype)


BF16_SCORES_CASES = [
    Case(L=70, pre_mix=4, post_mix=4),
    Case(H=16, L=100, D=96, pre_mix=16, post_mix=16),                # all heads mixed, D = 96
    Case(B=2, H=10, Hkv=5, L=40, pre_mix=10, post_mix=10, causal=False, layout="blhd"),
]


@pytest.mark.parametrize("rows", [None, 16], ids=["one-chunk", "16-rows"])
@pytest.mark.parametrize("case", BF16_SCORES_CASES, ids=lambda c: c.id)
def test_chunked_talking_heads_with_bf16_scores(case, rows, device):
    """Talking heads in bf16 make their scores in bf16 (the scale in the pre mix, whose kernel
    mixes and normalises in fp32): output and lse within the spec rule of the bf16 reference,
    and the causal future does not reach the past. (The interpreter's bf16 tl.dot is wrong, but
    this path's dots run in fp32.)"""
    from mta_kernels.chunked_forward import chunked_forward, slab_dtype
    q, k, v, *w = make_inputs(case, torch.bfloat16, device)
    assert slab_dtype(q, *w) == torch.bfloat16
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    scale = case.D ** -0.5
    out, lse = chunked_forward(q, k, v, *w, **opts, scale=scale, rows=rows)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.bfloat16, **opts)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    check_rule("out", out, ref, low, torch.bfloat16)
    check_rule("lse", lse, _reference_lse(q, k, v, w, opts, torch.float64),
               _reference_lse(q, k, v, w, opts, torch.bfloat16), torch.bfloat16)
    if case.causal:
        t = 2 * case.L // 3
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
        out2, _ = chunked_forward(q2, k2, v2, *w, **opts, scale=scale, rows=rows)
        assert torch.equal(out[:, :, :t], out2[:, :, :t])


SIXTEEN_BIT_SLAB_CASES = [
    Case(L=70, **FULL),
    Case(B=2, H=8, Hkv=2, L=45, D=96, pre_conv=(4, 3), post_mix=8, pad_key="left", layout="blhd"),
    Case(L=20, pre_mix=4, post_conv=(3, 5), causal=False, pad_key="right"),   # L < 16 + halo rows
    Case(H=4, L=100, pre_conv=(6, 11), post_conv=(6, 11)),                   # no mix: the plain softmax
]


@pytest.mark.parametrize("rows", [None, 16], ids=["one-chunk", "16-rows"])
@pytest.mark.parametrize("case", SIXTEEN_BIT_SLAB_CASES, ids=lambda c: c.id)
def test_chunked_forward_with_16bit_slabs(case, rows, device):
    """With 16-bit slabs (bf16 on CUDA, the default there; fp16 here under the interpreter, whose
    bf16 tl.dot is wrong), the scale in the pre conv or pre mix, the convs and mixes on 16-bit
    tensor cores with fp32 sums and the softmax in fp32: output and lse within the spec rule of
    the reference in that dtype, and the causal future does not reach the past."""
    from mta_kernels.chunked_forward import chunked_forward, slab_dtype
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    q, k, v, *w = make_inputs(case, dtype, device)
    if device == "cuda":
        assert slab_dtype(q, *w) == dtype
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    scale = case.D ** -0.5
    run = lambda q, k, v: chunked_forward(q, k, v, *w, **opts, scale=scale, rows=rows, slabs_dtype=dtype)
    out, lse = run(q, k, v)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=dtype, **opts)
    assert out.dtype == dtype and lse.dtype == torch.float32
    check_rule("out", out, ref, low, dtype)
    check_rule("lse", lse, _reference_lse(q, k, v, w, opts, torch.float64), _reference_lse(q, k, v, w, opts, dtype),
               dtype)
    if case.causal:
        t = 2 * case.L // 3
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
        assert torch.equal(out[:, :, :t], run(q2, k2, v2)[0][:, :, :t])


def test_chunked_forward_with_16bit_slabs_and_the_slab_pre_conv(device, monkeypatch):
    """16-bit slabs where the pre conv is the slab conv kernel on the scores (L beyond the pre
    conv matmul's budget), not one matmul: the pre conv took the scale."""
    from mta_kernels import slabs
    monkeypatch.setattr(slabs, "PRE_CONV_MATMUL", "0")
    test_chunked_forward_with_16bit_slabs(SIXTEEN_BIT_SLAB_CASES[0], 16, device)


def test_16bit_slabs_need_a_map_for_the_scale(device):
    """16-bit slabs put the softmax scale into the pre conv or pre mix: a call with neither (or
    slabs of another dtype than q's) is refused, naming the argument; fp32 and fp16 q keep
    fp32 slabs by default, as do CPU calls with convs."""
    from mta_kernels.chunked_forward import chunked_forward, slab_dtype
    q, k, v, *w = make_inputs(Case(L=20, post_conv=(2, 3)), torch.float16, device)
    with pytest.raises(ValueError, match="slabs_dtype"):
        chunked_forward(q, k, v, *w, causal=True, pad_key="both", scale=0.1, slabs_dtype=torch.float16)
    q, k, v, *w = make_inputs(Case(L=20, **FULL), torch.float16, device)
    with pytest.raises(ValueError, match="slabs_dtype"):
        chunked_forward(q, k, v, *w, causal=True, pad_key="both", scale=0.1, slabs_dtype=torch.bfloat16)
    assert slab_dtype(q, *w) == torch.float32
    assert slab_dtype(q.float(), *w) == torch.float32
    assert slab_dtype(q.bfloat16().cpu(), *[x.cpu() for x in w]) == torch.float32


def test_chunked_forward_switch(device, monkeypatch):
    """With CHUNKED_FORWARD '1', calls with convs take the chunked forward, calls without them
    do not, and gradients are bit-identical to the fused forward's (the backward recomputes
    what it needs, so it does not depend on which forward ran)."""
    from mta_kernels import chunked_forward as chunked
    calls = []
    real = chunked.chunked_forward
    monkeypatch.setattr(chunked, "chunked_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    case = Case(L=40, **FULL)

    def run(on):
        monkeypatch.setattr(chunked, "CHUNKED_FORWARD", "1" if on else "0")
        q, k, v, *w = make_inputs(case, torch.float32, device, requires_grad=True)
        out = mta_kernels.mta_attention(q, k, v, *w)
        return out, torch.autograd.grad(out, (q, k, v, *w), torch.ones_like(out))

    out_fused, grads_fused = run(False)
    assert not calls
    out_chunked, grads_chunked = run(True)
    assert len(calls) == 1
    torch.testing.assert_close(out_chunked, out_fused, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(grads_chunked, grads_fused))
    q, k, v, *_ = make_inputs(Case(L=20, pre_mix=4), torch.float32, device)
    mta_kernels.mta_attention(q, k, v, pre_mix=torch.eye(4)[None].to(device))
    assert len(calls) == 1                      # no convs: the fused forward


def test_talking_heads_path_choice(device, monkeypatch):
    """Talking heads (8+ heads mixed, no convs) take the row-chunked forward and backward where
    prefer_chunked_talking_heads says so: 'auto' on CUDA (never under the interpreter) from
    CHUNKED_TALKING_HEADS_FROM to CHUNKED_TALKING_HEADS_UP_TO or where fp32 heads are too wide for
    the register kernels, '1' always, '0' never; other calls never. Both paths give the same output and gradients (fp32,
    up to rounding)."""
    from mta_kernels import chunked_forward as chunked, ops
    conv, mix, pairs = (torch.empty(*s, device="meta") for s in ((16, 6, 11), (1, 16, 16), (8, 2, 2)))

    def chosen(L, D=128, on_cuda=True, pre_conv=None, pre_mix=mix, post_mix=mix, dtype=torch.bfloat16):
        q = torch.empty(1, 16, L, D, device="meta", dtype=dtype)
        return chunked.prefer_chunked_talking_heads(q, pre_conv, pre_mix, None, post_mix, on_cuda)

    monkeypatch.setattr(chunked, "CHUNKED_TALKING_HEADS", "auto")
    assert chosen(2048) and chosen(4096) and chosen(16384) and chosen(8192, post_mix=None)
    assert not chosen(1024) and not chosen(32768) and not chosen(8192, on_cuda=False) and not chosen(8192, D=256)
    # fp32 heads wider than 32 do not fit the register kernels' shared memory: chunked at any length
    assert chosen(1024, D=64, dtype=torch.float32) and not chosen(1024, D=32, dtype=torch.float32)
    assert not chosen(4096, pre_conv=conv) and not chosen(4096, pre_mix=pairs, post_mix=None)
    monkeypatch.setattr(chunked, "CHUNKED_TALKING_HEADS", "1")
    assert chosen(64, on_cuda=False) and not chosen(64, pre_conv=conv)
    monkeypatch.setattr(chunked, "CHUNKED_TALKING_HEADS", "0")
    assert not chosen(8192)

    calls = []
    for module, name in ((chunked, "chunked_forward"), (ops, "talking_heads_backward")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    case = Case(H=8, Hkv=4, L=40, pre_mix=8, post_mix=8)

    def run(mode):
        monkeypatch.setattr(chunked, "CHUNKED_TALKING_HEADS", mode)
        q, k, v, *w = make_inputs(case, torch.float32, device, requires_grad=True)
        out = mta_kernels.mta_attention(q, k, v, *w)
        return out, torch.autograd.grad(out, (q, k, v, w[1], w[3]), torch.ones_like(out))

    out_register, grads_register = run("0")
    assert not calls
    out_chunked, grads_chunked = run("1")
    assert calls == ["chunked_forward", "talking_heads_backward"]
    torch.testing.assert_close(out_chunked, out_register, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_chunked, grads_register):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_forward_auto_choice(monkeypatch):
    """'auto' takes the chunked forward where the general kernel has fewer than eight row
    blocks per SM: on 132 SMs (the H200), full MTA with the paper's 6x11 convs at B=1 and
    L=2048 .. 32768 (38 .. 607 row blocks) and for the paper's B=8 layers (304), not for a
    conv without mixing (a block per head: 1120 at B=1, L=4096) nor at L=65536 (1214), never
    without convs; '1' and '0' force it."""
    from mta_kernels.chunked_forward import prefer_chunked_forward
    from mta_kernels import chunked_forward as chunked
    conv, mix = torch.empty(16, 6, 11, device="meta"), torch.empty(1, 16, 16, device="meta")

    def chosen(B, L, pre_conv=conv, pre_mix=mix, post_conv=conv, post_mix=mix, sms=132):
        q = torch.empty(B, 16, L, 128, device="meta")
        return prefer_chunked_forward(q, pre_conv, pre_mix, post_conv, post_mix, sms=sms)

    monkeypatch.setattr(chunked, "CHUNKED_FORWARD", "auto")
    assert chosen(1, 2048) and chosen(1, 8192) and chosen(1, 16384) and chosen(1, 32768) and chosen(8, 2048)
    assert not chosen(1, 65536) and not chosen(1, 16384, sms=32)
    assert not chosen(1, 4096, pre_mix=None, post_conv=None, post_mix=None)
    assert not chosen(1, 2048, pre_conv=None, post_conv=None)
    q_cpu = torch.empty(1, 16, 2048, 128)
    assert not prefer_chunked_forward(q_cpu, conv, mix, conv, mix)      # the interpreter: general kernel
    monkeypatch.setattr(chunked, "CHUNKED_FORWARD", "1")
    assert chosen(8, 8192) and not chosen(1, 2048, pre_conv=None, post_conv=None)
    monkeypatch.setattr(chunked, "CHUNKED_FORWARD", "0")
    assert not chosen(1, 2048)


def test_chunked_forward_mode_from_the_environment(monkeypatch):
    """MTA_KERNELS_CHUNKED_FORWARD: unset or empty is 'auto'; anything but auto, 1 or 0 is
    refused with an error that names the variable."""
    from mta_kernels.chunked_forward import _mode_from_env
    monkeypatch.delenv("MTA_KERNELS_CHUNKED_FORWARD", raising=False)
    assert _mode_from_env() == "auto"
    for text, mode in (("", "auto"), ("auto", "auto"), ("1", "1"), (" 0 ", "0")):
        monkeypatch.setenv("MTA_KERNELS_CHUNKED_FORWARD", text)
        assert _mode_from_env() == mode
    for bad in ("yes", "2", "on"):
        monkeypatch.setenv("MTA_KERNELS_CHUNKED_FORWARD", bad)
        with pytest.raises(ValueError, match="MTA_KERNELS_CHUNKED_FORWARD"):
            _mode_from_env()


@pytest.mark.parametrize("pad_key", ["both", "left", "right"])
def test_chunked_forward_causality(pad_key, device):
    """The row-chunked forward: perturbing q, k, v at positions >= t leaves outputs < t
    bit-identical, with chunk edges on both sides of t."""
    from mta_kernels.chunked_forward import chunked_forward
    ck = 5 if pad_key == "both" else 6
    case = Case(L=48, pad_key=pad_key, pre_conv=(3, 5), pre_mix=4, post_conv=(2, ck), post_mix=4)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    t = 29

    def run(q, k, v):
        return chunked_forward(q, k, v, *w, causal=True, pad_key=pad_key, scale=0.2, rows=7)[0]

    out = run(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
    out2 = run(q2, k2, v2)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.equal(out[:, :, t:], out2[:, :, t:])


@pytest.mark.parametrize("pad_key", ["both", "left", "right"])
@pytest.mark.parametrize("causal", [True, False])
def test_pre_conv_matmul_matches_the_conv(pad_key, causal, device):
    """The pre conv as one matmul (q against K~, cq x D wide; GQA, D = 24, two batch elements)
    with the slab conv kernel redoing the tiles near the diagonal, against the reference's conv
    of the masked scores on a slab of rows [lo, hi) (fp64: exact); rows from lo + cq - 1 on
    (above them the slab conv reads zeros), the causal future excluded. Without the band
    tiles the causal result is wrong, so both kernels are checked; the band tiles read the
    same from scores of only the columns right of band_first_column."""
    from mta_kernels.pre_conv_matmul import conv_keys, pre_conv_matmul
    from mta_kernels.slab_conv import band_first_column, key_query_conv
    g = torch.Generator().manual_seed(11)
    B, H, Hkv, L, D, lo, hi = 2, 4, 2, 200, 24, 100, 200
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(device)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(H, 3, 5, generator=g, dtype=torch.float64).to(device)
    scores = 0.37 * q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2)
    rows, cols = torch.arange(L, device=device)[:, None], torch.arange(L, device=device)[None, :]
    if causal:
        scores = scores.masked_fill(cols > rows, 0.0)
    expected = mta_reference.key_query_conv(scores, w, pad_key)[:, :, lo:hi]
    zero_above = lo if causal else None
    c = pre_conv_matmul(q, conv_keys(k, w, pad_key, H, q.dtype), lo, hi, L, 0.37, zero_above, dtype=q.dtype)
    if causal:
        band = c.clone()
        key_query_conv(scores[:, :, lo:hi], w, pad_key, zero_above=lo, out=band, band=True)
        assert not torch.equal(band, c)
        # the band tiles from the scores of the columns they read only: the same bits
        first = band_first_column(lo, 3, 5, pad_key)
        assert 0 < first < lo
        narrow = c.clone()
        key_query_conv(scores[:, :, lo:hi, first:].contiguous(), w, pad_key, zero_above=lo, out=narrow, band=True,
                       x_col0=first)
        assert torch.equal(narrow, band)
        with pytest.raises(ValueError, match="x_col0"):
            key_query_conv(scores[:, :, lo:hi, first + 16:], w, pad_key, zero_above=lo, out=narrow, band=True,
                           x_col0=first + 16)
        c = band
    valid = (rows[lo:hi] >= lo + 2) & ((cols <= rows[lo:hi]) if causal else True)
    assert torch.allclose(c * valid, expected * valid, atol=1e-11, rtol=1e-10)
    if causal:
        assert (c[:, :, :, lo + 64:].masked_select(cols[:, lo + 64:] - rows[lo:hi] > lo + 63) == 0).all()


CHUNKED_MATMUL_CASES = [
    Case(L=160, **FULL),
    Case(L=150, causal=False, **FULL),
    Case(B=2, H=4, Hkv=2, L=100, pad_key="left", **FULL),        # GQA, batch > 1
    Case(D=96, L=120, pre_conv=(6, 11)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CHUNKED_MATMUL_CASES, ids=lambda c: c.id)
def test_chunked_forward_with_the_pre_conv_matmul(case, dtype, device, monkeypatch):
    """The row-chunked forward with its pre conv as one matmul (forced on, as 'auto' does for
    16-bit inputs) against the reference, in chunks of 50 rows, long enough rows for tiles
    the matmul keeps; the causal future does not reach the past (bit-identical outputs)."""
    from mta_kernels import chunked_forward as chunked, slabs
    calls = []
    real = slabs.pre_conv_matmul
    monkeypatch.setattr(slabs, "PRE_CONV_MATMUL", "1")
    monkeypatch.setattr(slabs, "pre_conv_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, *w = make_inputs(case, dtype, device)
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    out, _ = chunked.chunked_forward(q, k, v, *w, **opts, scale=case.D ** -0.5, rows=50)
    assert calls
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=dtype, **opts)
    check_rule("out", out, ref, low, dtype)
    if case.causal:
        t = 3 * case.L // 4
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
        out2, _ = chunked.chunked_forward(q2, k2, v2, *w, **opts, scale=case.D ** -0.5, rows=50)
        assert torch.equal(out[:, :, :t], out2[:, :, :t])


def test_pre_conv_matmul_choice(monkeypatch):
    """'auto' takes the pre conv matmul for 16-bit inputs while K~ fits a quarter of the slab
    budget (L = 8192 at H = 16, D = 128, cq = 6 with 1 GiB, not 16384), never for fp32 or
    without a pre conv; '1' and '0' force it; a bad MTA_KERNELS_PRE_CONV_MATMUL is refused."""
    from mta_kernels import slabs
    conv = torch.empty(16, 6, 11, device="meta")
    q = lambda L, dtype=torch.bfloat16: torch.empty(1, 16, L, 128, device="meta", dtype=dtype)
    monkeypatch.setattr(slabs, "PRE_CONV_MATMUL", "auto")
    monkeypatch.setattr(slabs, "CHUNK_BYTES", 1 << 30)
    assert slabs.use_pre_conv_matmul(q(8192), conv) and slabs.use_pre_conv_matmul(q(4096, torch.float16), conv)
    assert not slabs.use_pre_conv_matmul(q(16384), conv) and not slabs.use_pre_conv_matmul(q(4096, torch.float32), conv)
    assert not slabs.use_pre_conv_matmul(q(4096), None)
    monkeypatch.setattr(slabs, "PRE_CONV_MATMUL", "1")
    assert slabs.use_pre_conv_matmul(q(16384, torch.float32), conv) and not slabs.use_pre_conv_matmul(q(64), None)
    monkeypatch.setattr(slabs, "PRE_CONV_MATMUL", "0")
    assert not slabs.use_pre_conv_matmul(q(4096), conv)
    for bad in ("yes", "2"):
        monkeypatch.setenv("MTA_KERNELS_PRE_CONV_MATMUL", bad)
        with pytest.raises(ValueError, match="MTA_KERNELS_PRE_CONV_MATMUL"):
            slabs._pre_conv_matmul_mode_from_env()
