"""slabs/matmul.py: talking heads' causal scores and A V through tensor descriptors, and the
talking-heads path that uses them (the future skipped: unwritten score tiles, A left
unwritten there), or not, as kernel_options' causal_matmuls says."""
import pytest
import torch

import mta_kernels
import mta_reference
from cases import Case, make_inputs
from mta_kernels import configs
from mta_kernels.slabs import matmul as cm
from mta_kernels.talking_heads import backward as th_backward, forward as th_forward
from tolerance import check_rule

# several row blocks and key tiles, and a program whose TILES run past the causal end, on
# interpreter-sized slabs
SMALL_TILES = dict(BM=16, BN=16, TILES=3, num_warps=4, num_stages=1)


def _past(R, K, lo, device):
    """[R, K] mask of the keys in each row's past (row i of the slab is row lo + i)."""
    return torch.arange(K, device=device)[None, :] <= torch.arange(R, device=device)[:, None] + lo


def _one_rounding(ref: torch.Tensor, dtype) -> float:
    """Bound on |result - ref| for fp32 sums rounded once to dtype: one ulp of dtype at ref's
    largest magnitude (the interpreter casts fp32 to bf16 toward zero, the GPU to nearest), and
    1e-5 relative for the fp32 sums themselves."""
    top = ref.abs().max().item()
    return torch.finfo(dtype).eps * 2.0 ** torch.tensor(top).log2().floor().item() + 1e-5 * top


def _dtypes(device):
    # the interpreter's bf16 tl.dot is wrong; the wrappers feed it fp32 there, so bf16 runs too
    return [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("D", [16, 96])
@pytest.mark.parametrize("lo, R", [(0, 70), (72, 100)], ids=["first-rows", "later-rows"])
def test_causal_scores_exact_on_the_past_and_skip_the_future(lo, R, D, device, monkeypatch):
    """S = Q K^T on every key of a row's past (GQA: 4 heads on 2 kv heads), in the slab's dtype
    with fp32 sums; the tiles wholly in the future keep what the buffer held (NaN here)."""
    monkeypatch.setattr(configs, "CAUSAL_SCORES", SMALL_TILES)
    g = torch.Generator().manual_seed(0)
    for dtype in _dtypes(device):
        x = torch.randn(4, 200, D, generator=g).to(device, dtype)
        y = torch.randn(2, 200, D, generator=g).to(device, dtype)
        K = lo + R
        out = cm.scores_buffer(4, R, K, dtype, device).fill_(float("nan"))
        cm.causal_scores(x, y, out, row0=lo, zero_above=lo, precision="ieee")
        ref = x[:, lo:lo + R].double() @ y.repeat_interleave(2, 0)[:, :K].double().transpose(1, 2)
        past = _past(R, K, lo, device)
        assert (out.double() - ref)[:, past].abs().max().item() <= _one_rounding(ref, dtype), dtype
        tile_future = (torch.arange(K, device=device)[None, :] // 16 * 16
                       > torch.arange(R, device=device)[:, None] // 16 * 16 + 15 + lo)
        assert torch.isnan(out[:, tile_future]).all(), f"{dtype}: a tile wholly in the future was written"


@pytest.mark.parametrize("D, splits", [(16, None), (96, None), (16, 3), (96, 5)])
def test_causal_pv_reads_only_the_past(D, splits, device):
    """out = A V over each row's past keys, whatever A holds in the future (NaN here), for
    heads that share kv heads; and without zero_above, the whole of A; with the keys split
    into parts (more parts than a row block has key blocks too)."""
    g = torch.Generator().manual_seed(1)
    lo, R = 40, 90
    K = lo + R
    past = _past(R, K, lo, device)
    for dtype in _dtypes(device):
        a = cm.scores_buffer(4, R, K, dtype, device)
        a.copy_(torch.rand(4, R, K, generator=g).to(device, dtype).masked_fill(~past, float("nan")))
        y = torch.randn(2, 150, D, generator=g).to(device, dtype)
        out = torch.empty(4, R, D, device=device, dtype=dtype)
        cm.causal_pv(a, y, out, zero_above=lo, precision="ieee", splits=splits)
        ref = a.double().nan_to_num(0.0) @ y.repeat_interleave(2, 0)[:, :K].double()
        bound = _one_rounding(ref, dtype)
        assert (out.double() - ref).abs().max().item() <= bound, dtype
        full = cm.scores_buffer(4, R, K, dtype, device)
        full.copy_(a.nan_to_num(0.0))
        cm.causal_pv(full, y, out, precision="ieee", splits=splits)
        assert (out.double() - ref).abs().max().item() <= bound, dtype


def test_tma_ok_and_bad_arguments(device):
    """tma_ok refuses what a descriptor cannot address; the wrappers name a bad argument."""
    x = torch.randn(2, 64, 16, device=device)
    assert cm.tma_ok(x) and cm.tma_ok(cm.scores_buffer(2, 5, 7, torch.float16, device))
    assert not cm.tma_ok(x[:, :, 1:])                   # base off 16 bytes, rows of 60 bytes
    assert not cm.tma_ok(x.transpose(1, 2))             # last dim not contiguous
    out = cm.scores_buffer(2, 8, 64, torch.float32, device)
    with pytest.raises(ValueError, match="zero_above"):
        cm.causal_scores(x, x, out, zero_above=-1)
    with pytest.raises(ValueError, match="y's heads"):
        cm.causal_scores(x, torch.randn(3, 64, 16, device=device), out)
    with pytest.raises(ValueError, match="out"):
        cm.causal_pv(out, x, torch.empty(2, 9, 16, device=device))


def test_forward_falls_back_where_descriptors_cannot_go(device, monkeypatch):
    """q whose rows a descriptor cannot address (D = 20 in fp16: 40-byte rows) keeps the batched
    matmuls, and the result still meets the spec rule; the aligned call takes the kernels."""
    calls = []
    monkeypatch.setattr(th_forward, "causal_pv", lambda *a, **k: calls.append(1) or cm.causal_pv(*a, **k))
    for D, used in ((20, False), (24, True)):
        calls.clear()
        case = Case(H=4, L=50, D=D, pre_mix=4, post_mix=4)
        q, k, v, *w = make_inputs(case, torch.float16, device)
        out = mta_kernels.mta_attention(q, k, v, *w, kernel_options=dict(path="talking_heads", chunk_rows=16))
        ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64)
        low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float16)
        check_rule("out", out, ref, low, torch.float16)
        assert bool(calls) == used, D


@pytest.mark.parametrize("causal_matmuls", [None, True, False], ids=["default", "on", "off"])
def test_causal_matmuls_option(causal_matmuls, device, monkeypatch):
    """causal_matmuls: the causal scores (forward and backward alike, so that the backward's
    scores are the forward's, which its lse normalises) and A V through the descriptor kernels
    (the default where the operands allow them) or batched matmuls; output and gradients
    within the spec rule either way, in chunks of 16 rows."""
    calls = []
    for module, name in ((th_forward, "causal_scores"), (th_forward, "causal_pv"), (th_backward, "causal_scores")):
        real = getattr(cm, name)
        tag = (module.__name__.rsplit(".", 1)[1], name)
        monkeypatch.setattr(module, name, lambda *a, real=real, tag=tag, **k: calls.append(tag) or real(*a, **k))
    case = Case(B=2, H=4, Hkv=2, L=40, D=16, pre_mix=4, post_mix=4)
    inputs = make_inputs(case, torch.float32, device, requires_grad=True)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(device)
    options = dict(path="talking_heads", chunk_rows=16)
    if causal_matmuls is not None:
        options["causal_matmuls"] = causal_matmuls

    def run(fn, **kw):
        out = fn(*inputs, **kw)
        return (out, *torch.autograd.grad(out, [x for x in inputs if x is not None], grad))

    got = run(mta_kernels.mta_attention, kernel_options=options)
    ref = run(mta_reference.mta_attention, compute_dtype=torch.float64)
    low = run(mta_reference.mta_attention)
    for name, g, r, lo in zip(["out", "dq", "dk", "dv", "dpre_mix", "dpost_mix"], got, ref, low):
        check_rule(name, g, r, lo, torch.float32)
    chunks = [("forward", "causal_scores"), ("forward", "causal_pv")] * 3 + [("backward", "causal_scores")] * 3
    assert sorted(calls) == ([] if causal_matmuls is False else sorted(chunks))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_dq_through_split_causal_pv(dtype, device, monkeypatch):
    """Where causal_pv would split its keys (a chunk of few rows over many keys), the talking
    heads backward's dS K runs there: every gradient within the spec rule, and the future of dS
    never read."""
    calls = []
    monkeypatch.setattr(cm, "causal_pv_splits", lambda a, y: 3)
    real = cm.causal_pv
    monkeypatch.setattr(cm, "causal_pv", lambda *a, **k: calls.append(k["zero_above"]) or real(*a, **k))
    case = Case(B=2, H=4, Hkv=2, L=48, D=16, pre_mix=4, post_mix=4)
    inputs = make_inputs(case, dtype, device, requires_grad=True)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def run(fn, **kw):
        out = fn(*inputs, **kw)
        return torch.autograd.grad(out, [x for x in inputs if x is not None], grad)

    got = run(mta_kernels.mta_attention, kernel_options=dict(path="talking_heads", chunk_rows=16))
    ref = run(mta_reference.mta_attention, compute_dtype=torch.float64)
    low = run(mta_reference.mta_attention, compute_dtype=dtype)
    for name, g, r, lo in zip(["dq", "dk", "dv", "dpre_mix", "dpost_mix"], got, ref, low):
        check_rule(name, g, r, lo, dtype)
    assert calls == [32, 16, 0]      # each chunk's rows, last chunk first


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_paths_through_split_causal_pv(causal, device, monkeypatch):
    """Full MTA's row-chunked forward (A V) and backward (dS K) where causal_pv would split
    their keys: output and every gradient within the spec rule, in chunks of 16 rows."""
    calls = []
    monkeypatch.setattr(cm, "causal_pv_splits", lambda a, y: 3)
    real = cm.causal_pv
    monkeypatch.setattr(cm, "causal_pv", lambda *a, **k: calls.append(k["zero_above"]) or real(*a, **k))
    case = Case(B=2, H=4, Hkv=2, L=48, D=16, pre_conv=(3, 5), pre_mix=4, post_conv=(2, 3), post_mix=4, causal=causal)
    inputs = make_inputs(case, torch.float32, device, requires_grad=True)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3)).to(device)

    def run(fn, **kw):
        out = fn(*inputs, causal=causal, **kw)
        return (out, *torch.autograd.grad(out, [x for x in inputs if x is not None], grad))

    got = run(mta_kernels.mta_attention, kernel_options=dict(path="chunked", chunk_rows=16))
    ref = run(mta_reference.mta_attention, compute_dtype=torch.float64)
    low = run(mta_reference.mta_attention)
    names = ["out", "dq", "dk", "dv", "dpre_conv", "dpre_mix", "dpost_conv", "dpost_mix"]
    for name, g, r, lo in zip(names, got, ref, low):
        check_rule(name, g, r, lo, torch.float32)
    assert len(calls) == 6 and all((z is None) != causal for z in calls)     # 3 chunks, forward and backward


def test_noncausal_calls_take_no_causal_matmuls(device, monkeypatch):
    for module, name in ((th_forward, "causal_scores"), (th_forward, "causal_pv"), (th_backward, "causal_scores")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a causal matmul ran"))
    q, k, v, *w = make_inputs(Case(L=20, D=16, pre_mix=4, post_mix=4, causal=False), torch.float32, device,
                              requires_grad=True)
    out = mta_kernels.mta_attention(q, k, v, *w, causal=False, kernel_options=dict(path="talking_heads",
                                                                                  causal_matmuls=True))
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 96, 256])
@pytest.mark.parametrize("rows", [None, 128], ids=["one-chunk", "128-rows"])
def test_causal_talking_heads_forward_gpu(dtype, D, rows):
    """The talking-heads path with the causal kernels, each dtype and head width up to D = 256
    (the tiles and stages fit shared memory), GQA and a length off every tile, under the
    spec's rule; the future of a row does not reach it."""
    case = Case(H=8, Hkv=4, L=1000, D=D, pre_mix=8, post_mix=8)
    q, k, v, *w = make_inputs(case, dtype, "cuda")
    options = dict(path="talking_heads", causal_matmuls=True, **({"chunk_rows": rows} if rows else {}))
    out = mta_kernels.mta_attention(q, k, v, *w, kernel_options=options)
    ref = mta_reference.mta_attention(q, k, v, *w, compute_dtype=torch.float64)
    low = mta_reference.mta_attention(q, k, v, *w, compute_dtype=dtype)
    check_rule("out", out, ref, low, dtype)
    t = 613
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
    out2 = mta_kernels.mta_attention(q2, k2, v2, *w, kernel_options=options)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])


@pytest.mark.gpu
def test_causal_pv_committed_config_ignores_nan_future_gpu():
    """The committed A V config on a realistic slab whose future holds NaN: equal to cuBLAS on
    the zero-filled slab to bf16 rounding."""
    torch.manual_seed(0)
    H, R, lo, D = 16, 1024, 1024, 128
    K = lo + R
    a = cm.scores_buffer(H, R, K, torch.bfloat16, "cuda")
    a.copy_(torch.rand(H, R, K, device="cuda").masked_fill(~_past(R, K, lo, "cuda"), float("nan")))
    v = torch.randn(H, K, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(H, R, D, device="cuda", dtype=torch.bfloat16)
    cm.causal_pv(a, v, out, zero_above=lo)
    ref = torch.bmm(a.nan_to_num(0.0).float(), v.float())
    assert torch.isfinite(out).all()
    assert (out.double() - ref.double()).abs().max().item() <= _one_rounding(ref.double(), torch.bfloat16)
