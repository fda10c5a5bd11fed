"""The forward of every path against the reference, under the spec's tolerance rule.

Each call forces its path through kernel_options: 'flash' for plain attention, 'talking_heads'
and 'chunked' for talking heads, 'chunked' for everything else ('sdpa' on CUDA only)."""
import pytest
import torch
import torch.nn.functional as F

import mta_kernels
import mta_reference
from cases import Case, make_inputs
from mta_kernels.autograd import forward_impl
from mta_kernels.options import Options
from mta_reference.mta import forward_intermediates
from tolerance import check_rule

FULL = dict(pre_conv=(3, 5), pre_mix=4, post_conv=(2, 3), post_mix=4)
FP32, FP16 = torch.float32, torch.float16


def paths(case, cuda=False):
    """The paths that can run a case (as dispatch.applicable_paths)."""
    mixes = (case.pre_mix, case.post_mix)
    if not (case.pre_conv or case.post_conv or any(mixes)):
        return ["sdpa", "flash"] if cuda else ["flash"]
    if not (case.pre_conv or case.post_conv) and mixes[0] and mixes[0] == mixes[1]:
        return ["talking_heads", "chunked"]
    return ["chunked"]


def params(cases, dtypes=(FP32,), cuda=False):
    """pytest params (case, path, dtype) for every path of each case, with readable ids."""
    return [pytest.param(case, path, dtype, id=f"{case.id}-{path}-{str(dtype)[6:]}")
            for case in cases for path in paths(case, cuda) for dtype in dtypes]


def run_and_check(case, dtype, device, path=None, scale=None, **options):
    """mta_attention on ``path`` (and other kernel_options) against the reference; returns the output."""
    q, k, v, *w = make_inputs(case, dtype, device)
    opts = dict(causal=case.causal, pad_key=case.pad_key, scale=scale)
    kernel_options = dict(options, **({"path": path} if path else {}))
    out = mta_kernels.mta_attention(q, k, v, *w, **opts, kernel_options=kernel_options)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=dtype, **opts)
    assert out.dtype == q.dtype and out.shape == q.shape
    check_rule("out", out, ref, low, dtype)
    return out


CPU_CASES = [
    Case(L=37),
    Case(L=70, causal=False),
    Case(B=2, H=4, Hkv=1, L=45, D=96, layout="blhd"),            # MQA, batch > 1, non-contiguous
    Case(L=24, D=256),                                           # the widest heads we promise
    Case(L=1, **FULL),
    Case(L=2, pre_conv=(3, 5), post_conv=(4, 3)),                # L < cq and L < ck
    Case(H=2, pre_conv=(4, 4), pad_key="left"),
    Case(H=2, pre_conv=(2, 4), pad_key="right"),
    Case(L=24, pre_mix=2),
    Case(H=2, L=24, post_conv=(3, 5)),
    Case(H=2, post_conv=(3, 2), pad_key="right", causal=False),
    Case(L=24, post_mix=4, causal=False),
    Case(pre_mix=4, post_mix=4),                                 # talking heads
    Case(L=70, **FULL),                                          # L crosses a tile edge
    Case(pad_key="left", causal=False, pre_conv=(3, 4), pre_mix=2, post_conv=(2, 6), post_mix=4),
    Case(B=2, H=4, Hkv=2, L=30, **FULL),                         # GQA, batch > 1
    Case(H=4, Hkv=1, L=30, pre_conv=(3, 5), post_mix=2),         # MQA
    Case(H=10, L=40, D=16, pre_mix=10, post_mix=10),             # H = 10, all heads mixed
    Case(H=10, L=24, D=16, pre_conv=(2, 3), pre_mix=10, post_conv=(2, 3), post_mix=5),
    Case(H=6, L=24, D=16, pre_mix=2, post_mix=3),                # two group sizes (lcm 6)
    Case(B=2, H=16, Hkv=4, L=33, D=16, pre_mix=16, post_mix=16, causal=False, layout="blhd"),
    Case(H=16, L=20, D=16, pre_mix=8, post_mix=8),               # two mixing groups
    Case(D=96, L=24, **FULL),                                    # D not a power of two
    Case(H=8, L=30, D=96, pre_mix=8, post_mix=8, layout="blhd"),
    Case(L=24, layout="blhd", **FULL),                           # non-contiguous q, k, v
    Case(H=2, L=50, pre_conv=(8, 15), post_conv=(8, 15)),        # the largest kernels we promise
    Case(H=8, L=24, D=256, pre_mix=8, post_mix=8),
]

FP16_CASES = [
    Case(L=37),
    Case(L=24, D=256),
    Case(L=1, **FULL),
    Case(L=24, **FULL),
    Case(B=2, H=2, Hkv=1, L=20, pad_key="right", pre_conv=(2, 4), post_mix=2, layout="blhd"),
    Case(pre_mix=4, post_mix=4),
    Case(H=10, L=30, D=16, pre_mix=10, post_mix=10, causal=False),
]


@pytest.mark.parametrize("case, path, dtype", params(CPU_CASES) + params(FP16_CASES, (FP16,)))
def test_forward_matches_reference(case, path, dtype, device):
    run_and_check(case, dtype, device, path)


def test_conv_sizes_beyond_the_kernels_limits_are_refused(device):
    case = Case(H=2, L=20, D=16)
    q, k, v, *_ = make_inputs(case, FP32, device)
    with pytest.raises(ValueError, match="pre_conv/post_conv"):
        mta_kernels.mta_attention(q, k, v, pre_conv=torch.zeros(2, 18, 3), post_conv=torch.zeros(2, 17, 3))
    with pytest.raises(ValueError, match="pre_conv/post_conv"):
        mta_kernels.mta_attention(q, k, v, pre_conv=torch.zeros(2, 2, 41), post_conv=torch.zeros(2, 2, 27))
    # exactly at the limits: still the reference's answer
    g = torch.Generator().manual_seed(0)
    w = dict(pre_conv=torch.randn(2, 17, 3, generator=g).to(device) * 0.2,
             post_conv=torch.randn(2, 17, 33, generator=g).to(device) * 0.2)
    out = mta_kernels.mta_attention(q, k, v, **w)
    ref = mta_reference.mta_attention(q, k, v, **w, compute_dtype=torch.float64)
    check_rule("out", out, ref, mta_reference.mta_attention(q, k, v, **w), FP32)


@pytest.mark.parametrize("case, path, dtype", params([Case(L=24, **FULL), Case(L=24, pre_mix=4, post_mix=4), Case()]))
def test_custom_scale(case, path, dtype, device):
    run_and_check(case, dtype, device, path, scale=0.37)


def _identity_weights(H, pad_key, device, convs=True):
    ck = 5 if pad_key == "both" else 4
    w = dict(pre_mix=mta_reference.identity_mix(H, 4, device=device),
             post_mix=mta_reference.identity_mix(H, 2 if convs else 4, device=device))
    if convs:
        w.update(pre_conv=mta_reference.identity_conv(H, 3, ck, pad_key, device=device),
                 post_conv=mta_reference.identity_conv(H, 2, ck, pad_key, device=device))
    return w


@pytest.mark.parametrize("path, causal, pad_key", [
    ("chunked", True, "both"), ("chunked", True, "left"), ("chunked", False, "right"), ("chunked", False, "both"),
    ("talking_heads", True, "both"), ("talking_heads", False, "both"), ("flash", True, "both"),
    ("flash", False, "both")])
def test_identity_weights_equal_sdpa(path, causal, pad_key, device):
    """Identity weights (every part for 'chunked', both mixes for 'talking_heads', none for
    'flash') give plain attention: torch SDPA in fp64."""
    H, L, D = 4, 33, 32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, L, D, generator=g).to(device) for _ in range(3))
    w = {} if path == "flash" else _identity_weights(H, pad_key, device, convs=path == "chunked")
    out = mta_kernels.mta_attention(q, k, v, **w, causal=causal, pad_key=pad_key, kernel_options={"path": path})
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    assert (out.double() - expected).abs().max().item() < 2e-6


def _perturb_future(t, *tensors):
    """Copies of the tensors with positions >= t replaced by large random values."""
    out = [x.clone() for x in tensors]
    for x in out:
        x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
    return out


SMALL_FULL = dict(pre_conv=(3, 5), pre_mix=2, post_conv=(2, 3), post_mix=2)
CAUSALITY_CASES = [
    (dict(pre_conv=(3, 5)), "both", "chunked", None),
    (dict(post_conv=(2, 6)), "left", "chunked", None),
    (dict(post_conv=(3, 4)), "right", "chunked", None),
    (dict(pre_mix=2), "both", "chunked", None),
    (dict(post_mix=2), "both", "chunked", None),
    (SMALL_FULL, "both", "chunked", 7),                    # chunk edges on both sides of t
    (dict(SMALL_FULL, pre_conv=(3, 4)), "left", "chunked", 16),
    (dict(SMALL_FULL, post_conv=(2, 6)), "right", "chunked", None),
    (dict(pre_mix=2, post_mix=2), "both", "talking_heads", 16),
    (dict(pre_mix=2, post_mix=2), "both", "chunked", 16),
]


@pytest.mark.parametrize("parts, pad_key, path, chunk_rows", [
    pytest.param(*c, id=f"{Case(**c[0]).id.split('-', 4)[-1]}-{c[1]}-{c[2]}-rows{c[3]}") for c in CAUSALITY_CASES])
def test_causality(parts, pad_key, path, chunk_rows, device):
    """Perturbing q, k, v at positions >= t leaves outputs < t bit-identical."""
    case = Case(H=2, L=40, pad_key=pad_key, **parts)
    q, k, v, *w = make_inputs(case, FP32, device)
    t = 29
    options = dict(path=path, **({"chunk_rows": chunk_rows} if chunk_rows else {}))
    run = lambda q, k, v: mta_kernels.mta_attention(q, k, v, *w, pad_key=pad_key, kernel_options=options)
    out, out2 = run(q, k, v), run(*_perturb_future(t, q, k, v))
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.equal(out[:, :, t:], out2[:, :, t:])


@pytest.mark.parametrize("case, path, dtype", params([Case(L=40, **FULL), Case(L=40, pre_mix=4, post_mix=4),
                                                       Case(L=40)]))
def test_large_logits_stay_finite(case, path, dtype, device):
    """|S| up to 1e4: no inf or NaN, and still the reference's answer."""
    q, k, v, *w = make_inputs(case, dtype, device)
    q, k = q * 60.0, k * 60.0
    out = mta_kernels.mta_attention(q, k, v, *w, kernel_options={"path": path})
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=dtype)
    assert torch.isfinite(out).all()
    check_rule("out", out, ref, low, dtype)


# ---- the row-chunked paths' own outputs: out and lse, in several chunks

def reference_lse(q, k, v, w, opts, dtype):
    """Log-sum-exp of each row of the reference's masked pre-softmax logits."""
    t = forward_intermediates(q, k, v, *w, compute_dtype=dtype, **opts)
    return torch.logsumexp(t.m.masked_fill(t.future, float("-inf")).double(), dim=-1)


def check_out_and_lse(case, dtype, device, options, causality=False):
    """forward_impl on ``options`` against the reference: output and lse under the spec rule;
    with ``causality``, the past bit-identical when the future changes."""
    q, k, v, *w = make_inputs(case, dtype, device)
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    run = lambda q, k, v: forward_impl(q, k, v, tuple(w), case.causal, case.pad_key, case.D ** -0.5, options)
    out, lse = run(q, k, v)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64, **opts)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=dtype, **opts)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    check_rule("out", out, ref, low, dtype)
    check_rule("lse", lse, reference_lse(q, k, v, w, opts, torch.float64), reference_lse(q, k, v, w, opts, dtype),
               dtype)
    if causality and case.causal:
        t = 2 * case.L // 3
        assert torch.equal(out[:, :, :t], run(*_perturb_future(t, q, k, v))[0][:, :, :t])


CHUNK_CASES = [
    # (case, path, chunk_rows, dtype): 7 rows sit below the convs' halos of up to 5 rows
    (Case(L=40, **FULL), "chunked", 7, FP32),
    (Case(L=40, **FULL), "chunked", None, FP32),
    (Case(L=24, **FULL), "chunked", 7, FP16),
    (Case(L=30, causal=False, **FULL), "chunked", 7, FP32),
    (Case(B=2, H=2, Hkv=1, L=24, pad_key="left", pre_conv=(4, 4), post_conv=(2, 4), post_mix=2), "chunked", 8, FP32),
    (Case(H=2, L=30, post_conv=(3, 2), pad_key="right", causal=False), "chunked", 7, FP32),
    (Case(H=6, L=30, D=16, pre_mix=3, post_mix=2), "chunked", 7, FP32),
    (Case(L=40, pre_mix=4, post_mix=4), "talking_heads", 16, FP32),
    (Case(L=40, pre_mix=4, post_mix=4), "talking_heads", None, FP16),
    (Case(L=40, pre_mix=4, post_mix=4), "chunked", 16, FP32),
    (Case(B=2, H=10, Hkv=5, L=40, D=16, pre_mix=10, post_mix=10, causal=False, layout="blhd"), "talking_heads", 16,
     FP32),
]


@pytest.mark.parametrize("case, path, chunk_rows, dtype", [
    pytest.param(*c, id=f"{c[0].id}-{c[1]}-rows{c[2]}-{str(c[3])[6:]}") for c in CHUNK_CASES])
def test_row_chunked_forward_matches_reference(case, path, chunk_rows, dtype, device):
    """Both row-chunked paths in one chunk and in several (chunk edges inside the convs'
    reach, a short last chunk): output and log-sum-exp within the spec rule."""
    check_out_and_lse(case, dtype, device, Options(path=path, chunk_rows=chunk_rows or 0))


SIXTEEN_BIT_SLAB_CASES = [
    # (case, path, chunk_rows, pre_conv_matmul)
    (Case(L=32, **FULL), "chunked", 12, None),
    (Case(L=32, **FULL), "chunked", 12, False),            # the pre conv by the slab conv kernel
    (Case(B=2, H=2, Hkv=1, L=24, D=96, pre_conv=(4, 3), post_mix=2, pad_key="left", layout="blhd"), "chunked", None,
     None),
    (Case(L=20, pre_mix=4, post_conv=(3, 5), causal=False, pad_key="right"), "chunked", None, None),
    (Case(H=2, L=48, pre_conv=(6, 11), post_conv=(6, 11)), "chunked", 16, None),      # paper convs, no mix
    (Case(H=2, L=30, post_conv=(2, 3)), "chunked", None, None),         # no pre map: the scale in the softmax
    (Case(L=40, pre_mix=4, post_mix=4), "talking_heads", 16, None),
]


@pytest.mark.parametrize("case, path, chunk_rows, pre_conv_matmul", [
    pytest.param(*c, id=f"{c[0].id}-{c[1]}-rows{c[2]}" + ("" if c[3] is None else f"-pre_conv_matmul{c[3]}"))
    for c in SIXTEEN_BIT_SLAB_CASES])
def test_row_chunked_forward_with_16bit_slabs(case, path, chunk_rows, pre_conv_matmul, device):
    """16-bit slabs (bf16 on CUDA, its default there; fp16 here with slab_dtype, as the
    interpreter's bf16 dot is wrong): the scale in the pre conv, the pre mix or the softmax,
    the convs and mixes on 16-bit operands with fp32 sums: output and lse within the spec rule
    of the reference in that dtype; the future does not reach the past."""
    dtype = torch.bfloat16 if device == "cuda" else FP16
    options = Options(path=path, chunk_rows=chunk_rows or 0, slab_dtype=dtype, pre_conv_matmul=pre_conv_matmul)
    check_out_and_lse(case, dtype, device, options, causality=chunk_rows is not None)


MATMUL_CASES = [
    # (case, dtype, chunk_rows): chunks late enough that the matmul keeps tiles clear of the diagonal
    (Case(L=80, **FULL), FP16, 40),
    (Case(B=2, H=2, Hkv=1, L=64, causal=False, pad_key="left", pre_conv=(3, 4), post_mix=2), FP32, 32),
    (Case(H=2, D=96, L=96, pre_conv=(6, 11)), FP32, 32),
]


@pytest.mark.parametrize("case, dtype, chunk_rows", [
    pytest.param(*c, id=f"{c[0].id}-{str(c[1])[6:]}-rows{c[2]}") for c in MATMUL_CASES])
def test_chunked_forward_with_the_pre_conv_matmul(case, dtype, chunk_rows, device, monkeypatch):
    """pre_conv_matmul=True makes the pre conv one matmul of width cq * D (the slab conv
    kernel making the tiles near the diagonal), a call per chunk: the reference's output, and
    (in the first case) the future does not reach the past."""
    from mta_kernels.mta import pre_conv, slab_forward
    calls = []
    real = pre_conv.pre_conv_matmul
    monkeypatch.setattr(slab_forward, "pre_conv_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = run_and_check(case, dtype, device, "chunked", pre_conv_matmul=True, chunk_rows=chunk_rows)
    assert len(calls) == -(-case.L // chunk_rows)
    if case == MATMUL_CASES[0][0]:
        q, k, v, *w = make_inputs(case, dtype, device)
        t = 3 * case.L // 4
        options = dict(path="chunked", pre_conv_matmul=True, chunk_rows=chunk_rows)
        out2 = mta_kernels.mta_attention(*_perturb_future(t, q, k, v), *w, pad_key=case.pad_key,
                                         kernel_options=options)
        assert torch.equal(out[:, :, :t], out2[:, :, :t])


# ---- GPU: realistic sizes in bf16 and fp16, every path forced

PAPER = dict(pre_conv=(6, 11), pre_mix=16, post_conv=(6, 11), post_mix=16)
GPU_CASES = [
    Case(H=16, L=2048, D=64, **PAPER),
    Case(H=16, L=2048, D=96, **PAPER),
    Case(H=16, L=4096, D=128, **PAPER),
    Case(H=16, L=2048, D=128, pre_mix=16, post_mix=16),
    Case(H=16, L=4096, D=128, pre_mix=16, post_mix=16),
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
@pytest.mark.parametrize("case, path, dtype", params(GPU_CASES, (torch.bfloat16, FP16), cuda=True))
def test_forward_gpu(case, path, dtype):
    run_and_check(case, dtype, "cuda", path)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_rows", [None, 128], ids=["budget-rows", "128-rows"])
@pytest.mark.parametrize("pre_conv_matmul", [True, False], ids=["pre_conv_matmul", "slab-pre-conv"])
def test_chunked_forward_options_gpu(pre_conv_matmul, chunk_rows):
    """The paper's full MTA in bf16 with the pre conv as a matmul or not, in the budget's
    chunks or many of 128 rows."""
    options = dict(pre_conv_matmul=pre_conv_matmul, **({"chunk_rows": chunk_rows} if chunk_rows else {}))
    run_and_check(Case(B=2, H=16, Hkv=4, L=1000, D=128, **PAPER), torch.bfloat16, "cuda", "chunked", **options)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sdpa", "flash", "talking_heads", "chunked"])
def test_long_sequence_runs(path):
    """L = 32768 in bf16 within 2 GiB beyond the inputs and output."""
    parts = {"sdpa": {}, "flash": {}, "talking_heads": dict(pre_mix=16, post_mix=16), "chunked": PAPER}[path]
    case = Case(H=16, L=32768, D=128, **parts)
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = mta_kernels.mta_attention(q, k, v, *w, kernel_options={"path": path})
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    assert torch.isfinite(out).all()
    assert extra < 2 * 2**30, f"{extra / 2**30:.2f} GiB beyond inputs and output"


@pytest.mark.gpu
@pytest.mark.parametrize("parts, path", [({}, "flash"), (dict(pre_mix=16, post_mix=16), "talking_heads"),
                                         (PAPER, "chunked")], ids=["none", "talking-heads", "full"])
def test_longest_sequence_last_rows(parts, path):
    """L = 65536 (offsets past int32 range in the scores' index space): the last 64 rows
    against the reference computed on those rows only (with the convs' halo above them)."""
    case = Case(H=16, L=65536, D=128, **parts)
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda")
    out = mta_kernels.mta_attention(q, k, v, *w, kernel_options={"path": path})
    L, rows = case.L, 64
    lo = L - rows - 10 * ("pre_conv" in parts)

    def reference_rows(dtype):
        t = forward_intermediates(q, k, v, *w, compute_dtype=dtype, row_range=(lo, L))
        return torch.matmul(t.a, t.v)[:, :, -rows:]

    check_rule("out[-64:]", out[:, :, -rows:], reference_rows(FP32), reference_rows(torch.bfloat16), torch.bfloat16)
