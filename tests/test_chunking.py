"""How the row-chunked paths cut a call into slabs: chunk heights from the byte budget,
chunk order, the keys a causal slab computes, the slabs' dtype and where the softmax scale
goes, and the live-slab bound each path's budget relies on (kernels stubbed, memory
measured)."""
import pytest
import torch

from cases import Case, make_inputs
from mta_kernels.mta import backward as mta_backward, forward as mta_forward, slab_forward
from mta_kernels.options import DEFAULT_CHUNK_BYTES, Options
from mta_kernels.slabs.chunks import (MIN_SLAB_ROWS, chunk_starts, conv_halos, default_slab_dtype, is_talking_heads,
                                      rows_per_chunk, slab_inputs, slab_keys, slab_weights)
from mta_kernels.talking_heads import backward as th_backward, forward as th_forward

GIB = 1 << 30


def test_chunk_height_fills_a_conv_tile():
    """The budget sets the chunk height, except that a slab (rows plus halos) is never shorter
    than one row tile of the slab conv kernels; the rows are shared evenly by the chunks."""
    # 1 GiB / (6 slabs * 16 * 4096 * 4 B) = 682 rows: 7 chunks, evenly 586 rows each (not 6 x 682 + 4)
    assert rows_per_chunk(16, 4096, 4, halo=20, live=6, budget=GIB) == 586
    assert rows_per_chunk(16, 4096, 4, halo=10, live=3, budget=GIB) == 1024       # 1365 rows: 4 chunks of 1024
    assert rows_per_chunk(16, 2048, 4, halo=20, live=6, budget=GIB) == 1024       # 1365 rows: 2 chunks
    assert rows_per_chunk(16, 1000, 4, halo=20, live=6, budget=GIB) == 1000       # one chunk
    assert rows_per_chunk(16, 65536, 4, halo=20, live=6, budget=GIB) == MIN_SLAB_ROWS - 20   # the budget: 42 rows
    assert rows_per_chunk(16, 65536, 4, halo=0, live=6, budget=GIB) == MIN_SLAB_ROWS
    assert rows_per_chunk(16, 65536, 2, halo=0, live=6, budget=GIB) == 85         # 16-bit slabs: twice the rows
    assert rows_per_chunk(16, 4096, 4, halo=20, live=6, budget=2 * GIB) == 1024   # 1365 rows: 4 chunks
    assert rows_per_chunk(16, 4096, 4, halo=60, live=6, budget=1) == 16           # never below 16 rows
    assert MIN_SLAB_ROWS == 64 and DEFAULT_CHUNK_BYTES == GIB


def test_chunks_run_last_first():
    """Chunk starts cover [0, L) once, the last rows' chunk first (a causal chunk's work grows
    with its keys); the sums over chunks follow this fixed order."""
    assert chunk_starts(100, 30) == [90, 60, 30, 0]
    assert chunk_starts(64, 64) == [0] and chunk_starts(1, 16) == [0]
    assert chunk_starts(45, 16) == [32, 16, 0]


def test_causal_slabs_end_at_aligned_keys():
    """Causal slabs compute keys up to their last row rounded up to 16 (row strides Triton and
    cuBLAS can vectorize), never past L; non-causal slabs every key."""
    assert [slab_keys(hi, 4096, True) for hi in (1, 16, 17, 302, 4090, 4096)] == [16, 16, 32, 304, 4096, 4096]
    assert slab_keys(20, 23, True) == 23 and slab_keys(5, 23, False) == 23


def test_conv_halos_and_talking_heads():
    conv, conv2, mix, pairs = (torch.empty(*s, device="meta") for s in ((4, 3, 5), (4, 6, 11), (1, 4, 4), (2, 2, 2)))
    assert conv_halos(conv, conv2) == (2, 5) and conv_halos(None, conv) == (0, 2) and conv_halos(None, None) == (0, 0)
    assert is_talking_heads(None, mix, None, mix)
    assert not is_talking_heads(None, mix, None, pairs) and not is_talking_heads(conv, mix, None, mix)
    assert not is_talking_heads(None, mix, None, None) and not is_talking_heads(None, None, conv, mix)


def test_default_slab_dtype():
    """bf16 slabs for bf16 inputs, the accumulator's dtype otherwise (fp16 scores before the
    scale could overflow)."""
    q = lambda dtype: torch.empty(1, 2, 4, 8, dtype=dtype)
    assert default_slab_dtype(q(torch.bfloat16), torch.float32) == torch.bfloat16
    assert default_slab_dtype(q(torch.float16), torch.float32) == torch.float32
    assert default_slab_dtype(q(torch.float32), torch.float32) == torch.float32
    assert default_slab_dtype(q(torch.float64), torch.float64) == torch.float64


@pytest.mark.parametrize("parts, scaled", [
    (dict(pre_conv=True, pre_mix=True), 0), (dict(pre_mix=True, post_conv=True), 1), (dict(post_conv=True), None)])
def test_slab_weights_place_the_scale(parts, scaled):
    """fp32 slabs take the scale in q; 16-bit slabs in the first linear map of the scores (the
    pre conv, else the pre mix), else in the softmax kernel; the weights in the accumulator's
    dtype, contiguous."""
    H, scale = 4, 0.25
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(4, 5, 3, generator=g).transpose(1, 2), torch.randn(1, H, H, generator=g),
            torch.randn(H, 2, 3, generator=g), None)
    w = tuple(x if parts.get(name) else None for x, name in zip(full, ("pre_conv", "pre_mix", "post_conv", "post_mix")))
    q = torch.empty(1, H, 8, 16, dtype=torch.float16)
    fp32 = slab_weights(w, q, scale, torch.float32, torch.float32)
    assert (fp32.q_scale, fp32.softmax_scale, fp32.scaled) == (scale, 1.0, None)
    sw = slab_weights(w, q, scale, torch.float16, torch.float32)
    assert sw.scaled == scaled
    assert (sw.q_scale, sw.softmax_scale) == ((1.0, 1.0) if scaled is not None else (1.0, scale))
    for i, (got, given) in enumerate(zip(sw.weights, w)):
        if given is None:
            assert got is None
            continue
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, given * (scale if i == scaled else 1.0))


def test_slab_inputs_repeat_kv_heads():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 2, 5, 3, generator=g), torch.randn(2, 2, 5, 3,
                                                                                                        generator=g)
    qf, kf, vf = slab_inputs(q, k, v, 0.5, torch.float16)
    assert qf.shape == kf.shape == vf.shape == (8, 5, 3) and qf.dtype == torch.float16
    assert torch.equal(qf, (q.half() * 0.5).flatten(0, 1))
    assert torch.equal(kf.view(2, 4, 5, 3)[:, 3], k[:, 1].half()) and torch.equal(vf.view(2, 4, 5, 3)[:, 0], v[:, 0].half())
    assert slab_inputs(q, k, None, 1.0, torch.float32)[2] is None


def test_pre_conv_matmul_choice():
    """By default the pre conv is one matmul for 16-bit inputs of self-attention calls whose K~
    (B, H, L, cq, D) fits the slab budget, never for fp32 or without a pre conv;
    kernel_options' pre_conv_matmul forces it either way (not for a query block shorter than
    the keys, which takes the slab conv)."""
    from mta_kernels.mta.pre_conv import use_pre_conv_matmul
    conv = torch.empty(16, 6, 11, device="meta")
    q = lambda L, dtype=torch.bfloat16, B=1: torch.empty(B, 16, L, 128, device="meta", dtype=dtype)
    use = lambda q_, pre_conv=conv, choice=None, budget=GIB, k=None: use_pre_conv_matmul(
        q_, q_ if k is None else k, pre_conv, choice, budget)
    # K~ of L = 32768 is 16 * 32768 * 6 * 128 * 2 B = 768 MiB: within 1 GiB; twice that is not
    assert use(q(32768)) and use(q(4096, torch.float16)) and use(q(8192, B=4))
    assert not use(q(65536)) and not use(q(8192, B=8)) and not use(q(32768), budget=GIB // 2)
    assert not use(q(4096, torch.float32)) and not use(q(4096), pre_conv=None)
    assert use(q(65536, torch.float32), choice=True) and not use(q(4096), choice=False)
    assert not use(q(64), pre_conv=None, choice=True)
    assert not use(q(64), choice=True, k=q(128))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("path, parts, B, dtype, expected", [
    ("chunked", dict(pre_conv=(3, 5), post_conv=(2, 3)), 2, torch.float32,
     dict(fwd=(8, 4, 3, mta_forward.LIVE_SLABS), bwd=(8, 4, 6, mta_backward.LIVE_SLABS))),
    ("chunked", dict(pre_mix=2, post_mix=4), 1, torch.float16, dict(fwd=(4, 4, 0, 3), bwd=(4, 4, 0, 6))),
    ("talking_heads", dict(pre_mix=4, post_mix=4), 2, torch.float32, dict(fwd=(8, 4, 0, 2), bwd=(8, 12, 0, 1))),
], ids=["chunked-convs", "chunked-mixes-fp16", "talking-heads"])
def test_the_budget_reaches_the_chunk_height(path, parts, B, dtype, expected, device, monkeypatch):
    """kernel_options' chunk_bytes is the budget each path's forward and backward cut their
    chunks by, over B * H planes, with their slabs' bytes per entry, conv halos (twice in the
    backward) and live slabs; chunk_rows, when given, is taken as it is."""
    fwd_module, bwd_module = (mta_forward, mta_backward) if path == "chunked" else (th_forward, th_backward)
    seen = []

    def spy(heads, L, itemsize, halo, live, budget):
        seen.append((heads, itemsize, halo, live, budget))
        raise _Stop

    for module in (fwd_module, bwd_module):
        monkeypatch.setattr(module, "rows_per_chunk", spy)
    case = Case(B=B, H=4, L=20, D=8, **parts)
    q, k, v, *w = make_inputs(case, dtype, device)
    options = Options(path=path, chunk_bytes=12345)
    if path == "chunked":
        fwd = lambda o: mta_forward.mta_chunked_fwd(q, k, v, tuple(w), causal=True, pad_key="both", scale=0.3, options=o)
        bwd = lambda o: mta_backward.mta_chunked_bwd(q, q, k, v, tuple(w), causal=True, pad_key="both", scale=0.3,
                                                     options=o)
    else:
        fwd = lambda o: th_forward.talking_heads_chunked_fwd(q, k, v, w[1], w[3], causal=True, scale=0.3, options=o)
        lse = torch.zeros(B, 4, 20, device=device)
        bwd = lambda o: th_backward.talking_heads_chunked_bwd(q, q, k, v, w[1], w[3], lse, causal=True, scale=0.3,
                                                              options=o)
    for run, name in ((fwd, "fwd"), (bwd, "bwd")):
        with pytest.raises(_Stop):
            run(options)
        heads, itemsize, halo, live = expected[name]
        assert seen.pop() == (heads, itemsize, halo, live, 12345), name
        run(options._replace(chunk_rows=64))      # given rows: no budget asked (and the call runs)
        assert not seen


# ---- live slabs: at most the count each path's budget assumes

def _peak_cpu_bytes(fn):
    """Peak of the CPU memory allocated while fn() runs, from torch.profiler's allocation
    and free events in time order (what was allocated before the call does not count)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    now = peak = 0
    for e in events:
        now += e.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def _stub_slab_kernels(monkeypatch):
    """Replace the slab kernels by allocations of their outputs (in place where asked, new
    tensors otherwise), lse and weight-gradient partial sums, as on the GPU: the interpreter
    would add copies of their arguments."""
    new_like = lambda x, *a, **kw: torch.empty_like(x)
    lse_of = lambda x, want: x[..., 0].clone() if want else None

    def mix_softmax(x, w, zero_above=None, want_lse=False, out=None, out_dtype=None, lse_out=None, **kw):
        out = torch.empty_like(x, dtype=out_dtype or x.dtype) if out is None else out
        return out, (lse_out if lse_out is not None else lse_of(x, want_lse))

    monkeypatch.setattr(slab_forward, "key_query_conv", new_like)
    monkeypatch.setattr(slab_forward, "softmax_rows_", lambda x, zero_above, want_lse, scale: (x, lse_of(x, want_lse)))
    monkeypatch.setattr(slab_forward, "mix_softmax_rows", mix_softmax)
    monkeypatch.setattr(slab_forward, "mix_rows", lambda x, w, zero_above, precision, out_dtype:
                        torch.empty_like(x, dtype=out_dtype or x.dtype))
    monkeypatch.setattr(mta_backward, "key_query_conv_input_grad", new_like)
    monkeypatch.setattr(mta_backward, "key_query_conv_weight_grad", lambda *a, **kw: None)
    monkeypatch.setattr(mta_backward, "mix_backward_rows", lambda grad, w, out=None, **kw: (
        torch.empty_like(grad) if out is None else out, None))
    # causal talking heads' matmuls and backward kernel write into what their caller allocates
    monkeypatch.setattr(th_forward, "mix_softmax_rows", mix_softmax)
    monkeypatch.setattr(th_forward, "causal_scores", lambda x, y, out, **kw: out)
    monkeypatch.setattr(th_forward, "causal_pv", lambda a, y, out, **kw: out)
    monkeypatch.setattr(th_backward, "mix_softmax_rows", mix_softmax)
    monkeypatch.setattr(th_backward, "causal_scores", lambda x, y, out, **kw: out)
    monkeypatch.setattr(th_backward, "talking_heads_backward_rows", lambda da, s, lse, w_pre, w_post, zero_above,
                        out, **kw: out)


@pytest.mark.parametrize("convs", [True, False], ids=["full", "mixes"])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_path_keeps_at_most_its_live_slabs(causal, convs, monkeypatch):
    """The chunked forward and backward keep at most LIVE_SLABS slabs (rows plus halos by keys,
    fp32) alive at once, beyond O(L) buffers (the scaled q, dq, dk, dv, the mixes' per-row
    weight-gradient shares): what their chunk height's budget relies on."""
    _stub_slab_kernels(monkeypatch)
    B, H, L, D, rows = 1, 2, 512, 4, 64
    conv = (lambda cq: (cq, 5)) if convs else (lambda cq: None)
    case = Case(B=B, H=H, L=L, D=D, pre_conv=conv(3), pre_mix=2, post_conv=conv(4), post_mix=2, causal=causal)
    q, k, v, *w = make_inputs(case, torch.float32, "cpu")
    grad = torch.randn_like(q)
    opts = dict(causal=causal, pad_key="both", scale=0.5, options=Options(path="chunked", chunk_rows=rows))
    halo = 5 if convs else 0        # HQ + HP rows above, as many below in the backward
    slab_bytes = lambda halo: B * H * (rows + halo) * L * 4
    o_l = (4 * B * H * L * D + 2 * B * L * 2 * 2) * 4
    peak_backward = _peak_cpu_bytes(lambda: mta_backward.mta_chunked_bwd(grad, q, k, v, tuple(w), **opts))
    peak_forward = _peak_cpu_bytes(lambda: mta_forward.mta_chunked_fwd(q, k, v, tuple(w), **opts))
    assert peak_backward > (4 if convs else 2) * slab_bytes(2 * halo)      # the measurement sees the slabs
    assert peak_forward > 2 * slab_bytes(halo)
    assert peak_backward <= mta_backward.LIVE_SLABS * slab_bytes(2 * halo) + o_l
    assert peak_forward <= mta_forward.LIVE_SLABS * slab_bytes(halo) + o_l
    assert (mta_backward.LIVE_SLABS, mta_forward.LIVE_SLABS) == (6, 3)


@pytest.mark.parametrize("causal", [True, False])
def test_talking_heads_path_keeps_at_most_its_live_slabs(causal, monkeypatch):
    """The talking-heads forward keeps at most two slabs alive (S and A), its backward at most
    three in fp32 (S, dA and A), beyond O(L) buffers: q, k, v in the slabs' dtype, dO, dq, dk,
    dv, and the weight gradients' per-row shares."""
    _stub_slab_kernels(monkeypatch)
    B, H, L, D, rows = 1, 4, 512, 4, 64
    case = Case(B=B, H=H, L=L, D=D, pre_mix=4, post_mix=4, causal=causal)
    q, k, v, _, pre_mix, _, post_mix = make_inputs(case, torch.float32, "cpu")
    lse = torch.zeros(B, H, L)
    grad = torch.randn_like(q)
    options = Options(path="talking_heads", chunk_rows=rows)
    peak_forward = _peak_cpu_bytes(lambda: th_forward.talking_heads_chunked_fwd(
        q, k, v, pre_mix, post_mix, causal=causal, scale=0.5, options=options))
    peak_backward = _peak_cpu_bytes(lambda: th_backward.talking_heads_chunked_bwd(
        grad, q, k, v, pre_mix, post_mix, lse, causal=causal, scale=0.5, options=options))
    slab = B * H * rows * L * 4
    o_l = (8 * B * H * L * D + 2 * B * L * H * H) * 4
    live_backward = th_backward._bytes_per_entry(*[torch.float32] * 3) // 4
    assert live_backward == 3 and th_forward.LIVE_SLABS == 2
    assert slab < peak_forward <= th_forward.LIVE_SLABS * slab + o_l
    assert 2 * slab < peak_backward <= live_backward * slab + o_l
