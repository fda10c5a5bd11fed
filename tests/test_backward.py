"""Gradients: the reference backward against autograd, the fused op's gradients against the
reference under the spec's rule, causality of gradients, the custom ops and torch.compile."""
import pytest
import torch

import mta_kernels
import mta_reference
from cases import Case, make_inputs
from mta_kernels.chunked_backward import chunked_backward
from mta_kernels.ops import mta_bwd, mta_fwd
from tolerance import check_rule

FULL = dict(pre_conv=(3, 5), pre_mix=4, post_conv=(2, 3), post_mix=4)
NAMES = ("q", "k", "v", "pre_conv", "pre_mix", "post_conv", "post_mix")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pad_key", ["both", "left", "right"])
def test_reference_backward_matches_autograd(causal, pad_key):
    ck = 5 if pad_key == "both" else 4
    case = Case(B=2, H=4, Hkv=2, L=11, D=6, pre_conv=(3, ck), pre_mix=2, post_conv=(2, ck), post_mix=4,
                causal=causal, pad_key=pad_key)
    inputs = make_inputs(case, torch.float64, "cpu", requires_grad=True)
    inputs = [x.double().detach().requires_grad_() for x in inputs]
    out = mta_reference.mta_attention(*inputs, causal=causal, pad_key=pad_key, compute_dtype=torch.float64)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, inputs, grad)
    got = mta_reference.mta_attention_backward(grad, *inputs, causal=causal, pad_key=pad_key,
                                               compute_dtype=torch.float64)
    for name, e, g in zip(NAMES, expected, got):
        assert torch.allclose(e, g, atol=1e-11, rtol=1e-9), name


@pytest.mark.parametrize("rows, L, causal, pad_key", [
    (1, 12, True, "both"), (4, 23, True, "both"), (4, 23, False, "left"), (7, 23, True, "right"),
    (7, 23, False, "left"), (5, 23, True, "left"), (64, 23, True, "right")])
def test_chunked_backward_matches_reference(rows, L, causal, pad_key, device):
    """Row chunks with halos give exactly the materialized backward, whatever the chunk
    height (1 row, heights that do not divide L, one chunk for everything); causal slabs
    stop at their last row's key."""
    ck = 5 if pad_key == "both" else 4
    case = Case(B=2, H=4, Hkv=2, L=L, D=6, pre_conv=(3, ck), pre_mix=2, post_conv=(4, ck), post_mix=4,
                causal=causal, pad_key=pad_key)
    inputs = [x.double() for x in make_inputs(case, torch.float64, device)]
    grad = torch.randn(inputs[0].shape, dtype=torch.float64).to(device)
    expected = mta_reference.mta_attention_backward(grad, *inputs, causal=causal, pad_key=pad_key,
                                                    compute_dtype=torch.float64)
    got = chunked_backward(grad, *inputs, causal=causal, pad_key=pad_key, scale=6 ** -0.5,
                           compute_dtype=torch.float64, rows=rows)
    for name, e, g in zip(NAMES, expected, got):
        assert torch.allclose(e, g, atol=1e-12, rtol=1e-10), name


SIXTEEN_BIT_SLAB_CASES = [
    Case(L=70, **FULL),
    Case(B=2, H=8, Hkv=2, L=45, D=96, pre_conv=(4, 3), post_mix=8, pad_key="left", layout="blhd"),
    Case(L=40, pre_mix=4, post_conv=(3, 5), causal=False, pad_key="right"),
    Case(H=4, L=60, pre_conv=(6, 11), post_conv=(6, 11)),                   # no mix: torch's softmax backward
    Case(H=8, L=50, pre_mix=8, post_mix=8),                                 # talking heads
]


@pytest.mark.parametrize("rows", [None, 16], ids=["one-chunk", "16-rows"])
@pytest.mark.parametrize("case", SIXTEEN_BIT_SLAB_CASES, ids=lambda c: c.id)
def test_chunked_backward_with_16bit_slabs(case, rows, device):
    """The chunked backward with 16-bit slabs (bf16 on CUDA, its default there; fp16 here under
    the interpreter, whose bf16 tl.dot is wrong): the scale in the pre conv or pre mix (whose
    gradient takes it back), the kernels' math in fp32, the matmuls into dq, dk, dv with fp32
    results. Every gradient within the spec rule of the reference in that dtype."""
    from mta_kernels.chunked_forward import slab_dtype
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    inputs = make_inputs(case, dtype, device)
    if device == "cuda":
        assert slab_dtype(inputs[0], *inputs[3:]) == dtype
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    got = chunked_backward(grad, *inputs, **opts, scale=case.D ** -0.5, rows=rows, slabs_dtype=dtype)
    ref = mta_reference.mta_attention_backward(grad, *inputs, **opts, compute_dtype=torch.float64)
    low = mta_reference.mta_attention_backward(grad, *inputs, **opts, compute_dtype=dtype)
    for name, g, r, lo, x in zip(NAMES, got, ref, low, inputs):
        if x is None:
            assert g is None, name
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, name
        check_rule(f"d{name}", g, r, lo, dtype)


def test_chunked_backward_with_16bit_slabs_and_the_slab_pre_conv(device, monkeypatch):
    """16-bit slabs where the backward's forward recomputation makes the pre conv with the slab
    conv kernel, not one matmul."""
    from mta_kernels import slabs
    monkeypatch.setattr(slabs, "PRE_CONV_MATMUL", "0")
    test_chunked_backward_with_16bit_slabs(SIXTEEN_BIT_SLAB_CASES[0], 16, device)


def test_chunk_height_fills_a_conv_tile():
    """The budget sets the chunk height, except that a slab (rows plus halos) is never shorter
    than one row tile of the slab conv kernels; the rows are shared evenly by the chunks."""
    from mta_kernels.slabs import MIN_SLAB_ROWS, rows_per_chunk
    # 1 GiB / (6 slabs * 16 * 4096 * 4 B) = 682 rows: 7 chunks, evenly 586 rows each (not 6 x 682 + 4)
    assert rows_per_chunk(16, 4096, 4, halo=20, live=6) == 586
    assert rows_per_chunk(16, 4096, 4, halo=10, live=3) == 1024         # 1365 rows: 4 chunks of 1024
    assert rows_per_chunk(16, 2048, 4, halo=20, live=6) == 1024         # 1365 rows: 2 chunks
    assert rows_per_chunk(16, 1000, 4, halo=20, live=6) == 1000         # one chunk
    assert rows_per_chunk(16, 65536, 4, halo=20, live=6) == MIN_SLAB_ROWS - 20   # the budget: 42 rows
    assert rows_per_chunk(16, 65536, 4, halo=0, live=6) == MIN_SLAB_ROWS


def test_causal_slabs_end_at_aligned_keys():
    """Causal slabs compute keys up to their last row rounded up to 16 (row strides Triton and
    cuBLAS can vectorize), never past L; non-causal slabs every key."""
    from mta_kernels.slabs import slab_keys
    assert [slab_keys(hi, 4096, True) for hi in (1, 16, 17, 302, 4090, 4096)] == [16, 16, 32, 304, 4096, 4096]
    assert slab_keys(20, 23, True) == 23 and slab_keys(5, 23, False) == 23


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


@pytest.mark.parametrize("convs", [True, False], ids=["full", "talking-heads"])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_paths_keep_at_most_their_live_slabs(causal, convs, monkeypatch):
    """At most live_slabs slabs (rows plus halos by keys, fp32) are alive at once in the
    chunked backward and forward, which the chunk height's budget relies on (fewer without
    convs, whose chunks are taller for it). The slab conv
    kernels are replaced by allocations of their outputs, the in-place softmax by its lse,
    the mix, the fused mix-softmax and mix backward by their outputs (in place or new, as asked), lse
    and weight gradient (as on the GPU; the interpreter would add copies of its arguments);
    everything else the call allocates counts too."""
    from mta_kernels import chunked_backward as backward, chunked_forward as forward, slabs
    stub = lambda x, *args, **kwargs: torch.empty_like(x)
    monkeypatch.setattr(slabs, "key_query_conv", stub)
    monkeypatch.setattr(slabs, "softmax_rows_", lambda x, zero_above, want_lse: (x, x[..., 0].clone() if want_lse else None))
    monkeypatch.setattr(slabs, "mix_softmax_rows", lambda x, w, zero_above, want_lse, precision, out, post_mix,
                        out_dtype, lse_out, write_future: (torch.empty_like(x, dtype=out_dtype) if out is None else out,
                                                           x[..., 0].clone() if want_lse else None))
    # causal talking heads' matmuls write into the slabs their caller allocates
    monkeypatch.setattr(slabs, "causal_scores", lambda x, y, out, **kw: out)
    monkeypatch.setattr(forward, "causal_pv", lambda a, y, out, **kw: out)
    monkeypatch.setattr(slabs, "mix_rows", lambda x, w, zero_above, precision, out_dtype: torch.empty_like(x, dtype=out_dtype))
    monkeypatch.setattr(backward, "key_query_conv_input_grad", stub)
    monkeypatch.setattr(backward, "key_query_conv_weight_grad", lambda g, x, w, *a, **kw: torch.zeros(w.shape))
    monkeypatch.setattr(backward, "mix_backward_rows", lambda grad, w, x=None, out=None, **kw: (
        torch.empty_like(grad) if out is None else out, None if x is None else torch.zeros(w.shape)))
    H, L, rows = 2, 512, 64
    conv = (lambda cq: (cq, 5)) if convs else (lambda cq: None)
    case = Case(H=H, L=L, D=4, pre_conv=conv(3), pre_mix=2, post_conv=conv(4), post_mix=2, causal=causal)
    q, k, v, *w = make_inputs(case, torch.float32, "cpu")
    grad = torch.randn_like(q)
    opts = dict(causal=causal, pad_key="both", scale=0.5, rows=rows)
    halo = 5 if convs else 0        # HQ + HP rows above, as many below in the backward
    slab_bytes = lambda halo: H * (rows + halo) * L * 4
    inputs = 3 * H * L * 4 * 4       # q, k, v in fp32 (slab_inputs): O(L), outside the slab budget
    live = lambda module: module.live_slabs(w[0], w[2], module.LIVE_TENSORS, module.LIVE_TENSORS_WITHOUT_CONVS)
    peak_backward = _peak_cpu_bytes(lambda: backward.chunked_backward(grad, q, k, v, *w, **opts))
    peak_forward = _peak_cpu_bytes(lambda: forward.chunked_forward(q, k, v, *w, **opts))
    assert peak_backward > (4 if convs else 2) * slab_bytes(2 * halo)    # the measurement sees the slabs
    assert peak_backward <= live(backward) * slab_bytes(2 * halo) + inputs
    assert peak_forward <= live(forward) * slab_bytes(halo) + inputs
    assert live(backward) == (6 if convs else 4) and live(forward) == (3 if convs else 2)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_talking_heads_keep_at_most_their_live_slabs(causal, monkeypatch):
    """talking_heads_backward keeps at most its live slabs alive (three in fp32: S, dA and A),
    beyond O(L) copies of its inputs and the weight gradients' row buffers; the kernels are
    replaced by their outputs' allocations."""
    from mta_kernels import chunked_forward, chunked_talking_heads as th
    monkeypatch.setattr(th, "mix_softmax_rows", lambda x, w, zero_above, precision, post_mix, out_dtype, lse_in:
                        (torch.empty_like(x, dtype=out_dtype), None))
    monkeypatch.setattr(th, "talking_heads_backward_rows", lambda da, s, lse, w_pre, w_post, zero_above, out,
                        **kw: out)
    # the causal scores kernel writes into the buffer its caller allocates (the process's
    # GPU must not see these CPU tensors when it is not the interpreter)
    monkeypatch.setattr(th, "causal_scores", lambda x, y, out, **kw: out)
    H, L, D, rows = 4, 512, 4, 64
    case = Case(H=H, L=L, D=D, pre_mix=4, post_mix=4, causal=causal)
    q, k, v, _, pre_mix, _, post_mix = make_inputs(case, torch.float32, "cpu")
    lse = torch.zeros(1, H, L)
    grad = torch.randn_like(q)
    peak = _peak_cpu_bytes(lambda: th.talking_heads_backward(grad, q, k, v, pre_mix, post_mix, lse, causal=causal,
                                                             scale=0.5, rows=rows))
    slab = H * rows * L * 4
    inputs = 7 * H * L * D * 4 + 2 * L * H * H * 4     # q, k, v, dO, dq, dk, dv in fp32; two (L, 4, 4) buffers
    assert 2 * slab < peak <= th.live_bytes_per_entry(*[torch.float32] * 3) // 4 * slab + inputs


def test_chunk_budget_from_the_environment(monkeypatch):
    """MTA_KERNELS_CHUNK_BYTES sets the working-set budget; anything but a positive integer
    is refused with an error that names the variable."""
    from mta_kernels.slabs import _chunk_bytes_from_env, rows_per_chunk
    monkeypatch.delenv("MTA_KERNELS_CHUNK_BYTES", raising=False)
    assert _chunk_bytes_from_env() == 1 << 30
    monkeypatch.setenv("MTA_KERNELS_CHUNK_BYTES", str(2 << 30))
    assert _chunk_bytes_from_env() == 2 << 30
    assert rows_per_chunk(16, 4096, 4, halo=20, live=6, budget=2 << 30) == 1024   # 1365 rows (twice 1 GiB's): 4 chunks
    for bad in ("2GiB", "0", "-5"):
        monkeypatch.setenv("MTA_KERNELS_CHUNK_BYTES", bad)
        with pytest.raises(ValueError, match="MTA_KERNELS_CHUNK_BYTES"):
            _chunk_bytes_from_env()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, zero_above", [((1, 2, 5, 37), None), ((2, 3, 7, 40), 3), ((1, 2, 9, 3000), 0),
                                               ((1, 1, 4, 2049), 2100), ((1, 2, 6, 16), 1)])
def test_slab_softmax_matches_torch(shape, zero_above, dtype, device):
    """The slab softmax kernel against torch.softmax of the masked slab, in place on a
    strided view (a row slice of a larger slab), with its log-sum-exp: masked entries
    (col - row > zero_above) come out exactly zero whatever they held; rows longer than one
    2048-column block; a mask beyond the last column. On the GPU too (fp64 included, which
    the fp64 gradchecks take through the chunked paths)."""
    from mta_kernels.slab_softmax import softmax_rows_
    g = torch.Generator().manual_seed(4)
    B, H, R, K = shape
    big = 8 * torch.randn(B, H, R + 3, K, generator=g, dtype=dtype).to(device)
    x = big[:, :, 2:2 + R]
    rows, cols = torch.arange(R, device=device)[:, None], torch.arange(K, device=device)[None, :]
    masked = x if zero_above is None else x.masked_fill(cols - rows > zero_above, float("-inf"))
    expected, expected_lse = torch.softmax(masked, -1), torch.logsumexp(masked, -1)
    before = big.clone()
    y, lse = softmax_rows_(x, zero_above, want_lse=True)
    assert y.data_ptr() == x.data_ptr()
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-14, rtol=1e-12)
    assert torch.allclose(y, expected, **tol) and torch.allclose(lse, expected_lse, **tol)
    if zero_above is not None:
        assert (y.masked_select(cols - rows > zero_above) == 0).all()
    assert torch.equal(big[:, :, :2], before[:, :, :2]) and torch.equal(big[:, :, 2 + R:], before[:, :, 2 + R:])
    assert softmax_rows_(x, zero_above)[1] is None
    with pytest.raises(ValueError, match="zero_above"):
        softmax_rows_(x, -1)


@pytest.mark.parametrize("shape, groups", [((1, 16, 5, 1100), 1), ((2, 6, 4, 37), 3), ((1, 4, 3, 20), 1)])
@pytest.mark.parametrize("zero_above", [None, 0, 7])
@pytest.mark.parametrize("in_place", [False, True])
def test_mix_softmax_rows_matches_torch(shape, groups, zero_above, in_place, device):
    """The fused pre-mix and softmax kernel against mix_heads then torch.softmax of the masked
    slab (fp64): all 16 heads in one group with rows longer than one key block, three groups of
    two heads at B=2, a strided view as input; in place or into a new tensor; the log-sum-exp;
    masked entries exactly zero whatever the input held there. On the GPU too."""
    from mta_kernels.slab_softmax import mix_softmax_rows
    g = torch.Generator().manual_seed(5)
    B, H, R, K = shape
    big = 4 * torch.randn(B, H, R + 2, K, generator=g, dtype=torch.float64).to(device)
    x = big[:, :, 1:1 + R]
    w = torch.randn(groups, H // groups, H // groups, generator=g, dtype=torch.float64).to(device)
    rows, cols = torch.arange(R, device=device)[:, None], torch.arange(K, device=device)[None, :]
    mixed = mta_reference.mix_heads(x, w)
    masked = mixed if zero_above is None else mixed.masked_fill(cols - rows > zero_above, float("-inf"))
    expected, expected_lse = torch.softmax(masked, -1), torch.logsumexp(masked, -1)
    before = big.clone()
    y, lse = mix_softmax_rows(x, w, zero_above, want_lse=True, out=x if in_place else None)
    assert (y.data_ptr() == x.data_ptr()) == in_place
    assert torch.allclose(y, expected, atol=1e-12, rtol=1e-10)
    assert torch.allclose(lse, expected_lse, atol=1e-12, rtol=1e-10)
    if zero_above is not None:
        assert (y.masked_select(cols - rows > zero_above) == 0).all()
    # nothing outside the view is written (nothing at all into a new tensor)
    assert torch.equal(big[:, :, [0, R + 1]], before[:, :, [0, R + 1]])
    assert in_place or torch.equal(big, before)
    assert mix_softmax_rows(x, w, zero_above)[1] is None


@pytest.mark.parametrize("shape, groups", [((1, 16, 5, 1100), 1), ((2, 6, 4, 37), 3), ((1, 10, 3, 50), 1)])
@pytest.mark.parametrize("zero_above", [None, 0, 7])
@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_mix_softmax_rows_with_the_post_mix(shape, groups, zero_above, out_dtype, device):
    """The pre mix, softmax and post mix in one kernel against mix_heads(softmax(mix_heads(x)))
    of the masked slab (fp64 slabs), written in fp64 or rounded to fp16 (as the forward writes
    A in q's dtype): all 16 heads in one group over rows longer than a key block, three groups
    at B=2, ten heads padded to 16 (the padding heads' softmax must not leak into the mix); the
    log-sum-exp; exact zeros on the masked entries; a post mix of another shape is refused."""
    from mta_kernels.slab_softmax import mix_softmax_rows
    g = torch.Generator().manual_seed(6)
    B, H, R, K = shape
    x = (4 * torch.randn(B, H, R + 2, K, generator=g, dtype=torch.float64))[:, :, 1:1 + R].to(device)
    w, w_post = torch.randn(2, groups, H // groups, H // groups, generator=g, dtype=torch.float64).to(device)
    rows, cols = torch.arange(R, device=device)[:, None], torch.arange(K, device=device)[None, :]
    mixed = mta_reference.mix_heads(x, w)
    masked = mixed if zero_above is None else mixed.masked_fill(cols - rows > zero_above, float("-inf"))
    expected = mta_reference.mix_heads(torch.softmax(masked, -1), w_post)
    y, lse = mix_softmax_rows(x, w, zero_above, want_lse=True, post_mix=w_post, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    if out_dtype == torch.float64:
        assert torch.allclose(y, expected, atol=1e-12, rtol=1e-10)
    else:   # one fp16 rounding of each entry
        assert torch.allclose(y.double(), expected, atol=1e-7, rtol=2 ** -11)
    assert torch.allclose(lse, torch.logsumexp(masked, -1), atol=1e-12, rtol=1e-10)
    if zero_above is not None:
        assert (y.masked_select(cols - rows > zero_above) == 0).all()
    with pytest.raises(ValueError, match="post_mix"):
        mix_softmax_rows(x, w, zero_above, post_mix=w_post[..., :1])
    # the lse into rows of a longer one (the chunked forward's), the rows around it untouched
    longer = torch.full((B, H, R + 3), 5.0, dtype=torch.float64, device=device)
    _, lse_in_place = mix_softmax_rows(x, w, zero_above, want_lse=True, post_mix=w_post, out_dtype=out_dtype,
                                       lse_out=longer[:, :, 1:1 + R])
    assert lse_in_place.data_ptr() == longer[:, :, 1:].data_ptr() and torch.equal(lse_in_place, lse)
    assert (longer[:, :, [0, R + 1, R + 2]] == 5.0).all()
    with pytest.raises(ValueError, match="lse_out"):
        mix_softmax_rows(x, w, zero_above, want_lse=True, lse_out=longer[:, :, :R].float())
    # with the lse known (the backward's recomputation) one sweep gives the same probabilities
    y_known, none = mix_softmax_rows(x, w, zero_above, post_mix=w_post, out_dtype=out_dtype, lse_in=lse)
    assert none is None and torch.allclose(y_known.double(), y.double(), atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="lse_in"):
        mix_softmax_rows(x, w, zero_above, lse_in=lse.float())
    with pytest.raises(ValueError, match="lse_in"):
        mix_softmax_rows(x, w, zero_above, want_lse=True, lse_in=lse)


@pytest.mark.parametrize("shape, groups", [((1, 16, 5, 600), 1), ((2, 6, 4, 37), 3)])
@pytest.mark.parametrize("zero_above", [None, 0, 7])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_mix_backward_rows_matches_torch(shape, groups, zero_above, softmax, in_place, device):
    """The fused backward of a slab's head mix (with the softmax's backward before it, or
    not) against PyTorch's softmax backward and the reference's mix_heads_backward, the
    weight gradient over a row range (fp64): the incoming gradient counts as zero above the
    diagonal, inputs are strided views, in place or into a new tensor. On the GPU too."""
    from mta_kernels.slab_mix_backward import mix_backward_rows
    from mta_reference.backward import mix_heads_backward
    g = torch.Generator().manual_seed(6)
    B, H, R, K = shape
    big_grad, big_x, logits = (torch.randn(B, H, R + 2, K, generator=g, dtype=torch.float64).to(device)
                               for _ in range(3))
    grad, x = big_grad[:, :, 1:1 + R], big_x[:, :, 1:1 + R]
    w = torch.randn(groups, H // groups, H // groups, generator=g, dtype=torch.float64).to(device)
    rows, cols = torch.arange(R, device=device)[:, None], torch.arange(K, device=device)[None, :]
    future = (cols - rows > zero_above) if zero_above is not None else torch.zeros_like(cols - rows, dtype=torch.bool)
    probs = torch.softmax(logits[:, :, :R].masked_fill(future, float("-inf")), -1) if softmax else None
    incoming = grad.masked_fill(future, 0.0)
    if softmax:
        incoming = torch._softmax_backward_data(grad, probs, -1, probs.dtype)
    mine = slice(1, R - 1)
    expected_dx = mix_heads_backward(incoming, x, w)[0]
    expected_dw = mix_heads_backward(incoming[:, :, mine], x[:, :, mine], w)[1]
    before = big_grad.clone()
    dx, dw = mix_backward_rows(grad, w, x=x, probs=probs, zero_above=zero_above, rows=(mine.start, mine.stop),
                               out=grad if in_place else None)
    assert (dx.data_ptr() == grad.data_ptr()) == in_place
    assert torch.allclose(dx, expected_dx, atol=1e-12, rtol=1e-10)
    assert torch.allclose(dw, expected_dw, atol=1e-12, rtol=1e-10)
    assert torch.equal(big_grad[:, :, [0, R + 1]], before[:, :, [0, R + 1]])
    assert in_place or torch.equal(big_grad, before)
    assert mix_backward_rows(grad, w, zero_above=zero_above)[1] is None


def test_mix_backward_rows_into_a_row_buffer(device):
    """dw_rows: each weight row's share of the mix's weight gradient goes to its own row of a
    caller's buffer, from row0 on (the row-chunked backward sums the buffer once), rows of
    the buffer outside stay as they were; the buffer's shape is checked."""
    from mta_kernels.slab_mix_backward import mix_backward_rows
    g = torch.Generator().manual_seed(7)
    B, H, R, K, groups = 2, 6, 5, 37, 3
    grad, x = (torch.randn(B, H, R, K, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    w = torch.randn(groups, H // groups, H // groups, generator=g, dtype=torch.float64).to(device)
    expected = mix_backward_rows(grad, w, x=x, zero_above=2, rows=(1, 4))[1]
    buffer = torch.full((B, groups, 9, 2, 2), 7.0, dtype=torch.float64, device=device)
    dx, dw = mix_backward_rows(grad, w, x=x, zero_above=2, rows=(1, 4), dw_rows=(buffer, 3))
    assert dw is None
    assert torch.allclose(buffer[:, :, 4:7].sum((0, 2)), expected, atol=1e-12, rtol=1e-10)
    assert torch.equal(buffer[:, :, [0, 1, 2, 3, 7, 8]], torch.full_like(buffer[:, :, :6], 7.0))
    with pytest.raises(ValueError, match="dw_rows"):
        mix_backward_rows(grad, w, x=x, rows=(1, 4), dw_rows=(buffer, 6))


@pytest.mark.parametrize("shape, groups", [((1, 16, 5, 600), 1), ((2, 6, 4, 37), 3), ((1, 10, 3, 50), 1)])
@pytest.mark.parametrize("zero_above", [None, 0, 7])
@pytest.mark.parametrize("in_place", [False, True])
def test_talking_heads_backward_rows_matches_autograd(shape, groups, zero_above, in_place, device):
    """Talking heads' backward kernel (dA to the scores through the post mix, the softmax
    from a given lse and the pre mix, with both weight gradients into row buffers) against
    autograd through mix_heads(softmax(mix_heads(s))) of a masked slab (fp64): all 16 heads in
    a group over rows longer than a key block, three groups at B=2, ten heads padded to 16;
    strided inputs, in place or not; exact zeros in the causal future; bad buffers refused.
    Out of place, A itself goes to a strided a_out on the way (zeros in the future too)."""
    from mta_kernels.slab_mix_backward import talking_heads_backward_rows
    g = torch.Generator().manual_seed(8)
    B, H, R, K = shape
    big_da, big_s = (3 * torch.randn(B, H, R + 2, K, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    da, s = big_da[:, :, 1:1 + R], big_s[:, :, 1:1 + R]
    w_pre, w_post = (torch.randn(groups, H // groups, H // groups, generator=g, dtype=torch.float64)
                     .to(device).requires_grad_() for _ in range(2))
    rows, cols = torch.arange(R, device=device)[:, None], torch.arange(K, device=device)[None, :]
    future = (cols - rows > zero_above) if zero_above is not None else torch.zeros(R, K, dtype=torch.bool,
                                                                                  device=device)
    s_leaf = s.clone().requires_grad_()
    logits = mta_reference.mix_heads(s_leaf, w_pre).masked_fill(future, float("-inf"))
    a = mta_reference.mix_heads(torch.softmax(logits, -1), w_post)
    expected = torch.autograd.grad(a, (s_leaf, w_pre, w_post), da)
    lse = torch.logsumexp(logits, -1).detach()
    buffers = [torch.full((B, groups, R + 4, H // groups, H // groups), 7.0, dtype=torch.float64, device=device)
               for _ in range(2)]
    before = big_da.clone()
    a_out = None if in_place else torch.full((B, H, K, R + 1), float("nan"), dtype=torch.float64,
                                             device=device).transpose(-1, -2)[:, :, 1:]
    ds = talking_heads_backward_rows(da, s, lse, w_pre.detach(), w_post.detach(), zero_above,
                                     out=da if in_place else None, dw_pre_rows=buffers[0],
                                     dw_post_rows=buffers[1], row0=3, a_out=a_out)
    assert (ds.data_ptr() == da.data_ptr()) == in_place
    if a_out is not None:
        assert torch.allclose(a_out, a.detach(), atol=1e-12, rtol=1e-10)
        assert (a_out.masked_select(future) == 0).all()
    assert torch.allclose(ds, expected[0], atol=1e-12, rtol=1e-10)
    for buffer, e in zip(buffers, expected[1:]):
        assert torch.allclose(buffer[:, :, 3:3 + R].sum((0, 2)), e, atol=1e-10, rtol=1e-10)
        assert (buffer[:, :, :3] == 7.0).all() and (buffer[:, :, 3 + R:] == 7.0).all()
    assert (ds.masked_select(future) == 0).all()
    assert torch.equal(big_da[:, :, [0, R + 1]], before[:, :, [0, R + 1]])
    assert in_place or torch.equal(big_da, before)
    with pytest.raises(ValueError, match="dw_pre_rows"):
        talking_heads_backward_rows(da, s, lse, w_pre.detach(), w_post.detach(), dw_pre_rows=buffers[0], row0=5)
    with pytest.raises(ValueError, match="lse"):
        talking_heads_backward_rows(da, s, lse[:, :, :1], w_pre.detach(), w_post.detach())


@pytest.mark.parametrize("shape, groups", [((1, 16, 5, 1100), 1), ((2, 6, 4, 37), 3), ((1, 10, 3, 20), 1)])
@pytest.mark.parametrize("zero_above", [None, 0, 7])
def test_mix_rows_matches_reference(shape, groups, zero_above, device):
    """The post mix's kernel against the reference's mix_heads (fp64) on a strided view: all
    16 heads in one group with rows longer than one key block, three groups of two heads at
    B=2, ten heads (padded to 16 in the kernel); entries above the diagonal read as zero when
    zero_above says so, whatever x holds there; a 32-bit result rounded to the dtype asked for.
    On the GPU too."""
    from mta_kernels.slab_mix import mix_rows
    g = torch.Generator().manual_seed(3)
    B, H, R, K = shape
    x = torch.randn(B, H, R + 2, K, generator=g, dtype=torch.float64).to(device)[:, :, 1:1 + R]
    w = torch.randn(groups, H // groups, H // groups, generator=g, dtype=torch.float64).to(device)
    rows, cols = torch.arange(R, device=device)[:, None], torch.arange(K, device=device)[None, :]
    kept = x if zero_above is None else x.masked_fill(cols - rows > zero_above, 0.0)
    expected = mta_reference.mix_heads(kept, w)
    assert torch.allclose(mix_rows(x, w, zero_above), expected, atol=1e-12, rtol=1e-10)
    y16 = mix_rows(x.float(), w.float(), zero_above, out_dtype=torch.float16)
    assert y16.dtype == torch.float16
    assert torch.allclose(y16.double(), expected, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="zero_above"):
        mix_rows(x, w, -1)



@pytest.mark.parametrize("kernel", ["softmax", "mix_softmax", "post_mix_softmax", "lse_in", "mix_rows", "mix_backward",
                                    "talking_heads_backward"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_row_kernels_ignore_what_the_causal_future_holds(kernel, fill, device):
    """The row kernels load whole 16-column runs past the last column a causal row uses (so
    that their loads vectorize) and mask what they loaded: NaN or inf in the causal future of
    their input slabs changes no output bit. Rows ending on both sides of a 16-column boundary,
    K not a multiple of 16."""
    from mta_kernels.slab_mix import mix_rows
    from mta_kernels.slab_mix_backward import mix_backward_rows, talking_heads_backward_rows
    from mta_kernels.slab_softmax import mix_softmax_rows, softmax_rows_
    g = torch.Generator().manual_seed(9)
    B, H, R, K, zero_above = 1, 16, 5, 70, 13          # rows end at columns 14 .. 18
    clean = [torch.randn(B, H, R, K, generator=g).to(device) for _ in range(3)]
    w, w_post = (torch.randn(1, H, H, generator=g).to(device) for _ in range(2))
    future = (torch.arange(K)[None, :] - torch.arange(R)[:, None] > zero_above).to(device)
    lse = mix_softmax_rows(clean[0], w, zero_above, want_lse=True)[1]

    def run(x, y, z):
        buffers = [torch.zeros(B, 1, R, H, H, device=device) for _ in range(2)]
        if kernel == "softmax":
            return softmax_rows_(x, zero_above, want_lse=True)
        if kernel == "mix_softmax":
            return mix_softmax_rows(x, w, zero_above, want_lse=True)
        if kernel == "post_mix_softmax":
            return mix_softmax_rows(x, w, zero_above, want_lse=True, post_mix=w_post)
        if kernel == "lse_in":
            return mix_softmax_rows(x, w, zero_above, post_mix=w_post, lse_in=lse)[:1]
        if kernel == "mix_rows":
            return (mix_rows(x, w, zero_above),)
        if kernel == "mix_backward":
            return mix_backward_rows(x, w, x=y, probs=z, zero_above=zero_above, dw_rows=(buffers[0], 0))[:1] + (
                buffers[0],)
        return (talking_heads_backward_rows(x, y, lse, w, w_post, zero_above, dw_pre_rows=buffers[0],
                                            dw_post_rows=buffers[1]), *buffers)

    expected = run(*(x.clone() for x in clean))
    got = run(*(x.masked_fill(future, fill) for x in clean))
    for e, o in zip(expected, got):
        assert torch.equal(e, o)

GRAD_CASES = [
    # no MTA part: the fused flash-attention backward
    Case(L=30),
    Case(L=1),
    Case(L=70, causal=False),
    Case(B=2, H=4, Hkv=2, L=70),
    Case(H=4, Hkv=1, L=45, D=96, layout="blhd"),
    # MTA parts: the interim reference backward behind the same op
    Case(L=30, **FULL),
    Case(L=30, causal=False, pad_key="left", pre_conv=(2, 4), post_mix=2),
    Case(B=2, H=4, Hkv=2, L=25, **FULL),
    Case(H=8, L=20, D=16, pre_mix=8, post_mix=8),
    Case(L=20, D=96, layout="blhd", **FULL),
    Case(L=20, D=256),
    Case(H=8, L=16, D=256, pre_mix=8, post_mix=8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_gradients_match_reference(case, dtype, device):
    inputs = [x for x in make_inputs(case, dtype, device, requires_grad=True)]
    present = [x for x in inputs if x is not None]
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)

    def grads(fn, **kw):
        out = fn(*inputs, **opts, **kw)
        return torch.autograd.grad(out, present, grad)

    got = grads(mta_kernels.mta_attention)
    ref = grads(mta_reference.mta_attention, compute_dtype=torch.float64)
    low = grads(mta_reference.mta_attention, compute_dtype=dtype)
    names = [n for n, x in zip(NAMES, inputs) if x is not None]
    for name, g, r, lo, x in zip(names, got, ref, low, present):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        check_rule(f"d{name}", g, r, lo, dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_backward_with_very_negative_logits(causal, device):
    """Plain attention's backward where every logit of some rows is below -88 (their lse too):
    exp(0 - lse) overflows fp32, so the keys past L of a partial last key block (zero k, v)
    must stay masked in dq's tiles: the gradients stay finite, and dq (where the overflow
    would land) matches the fp64 reference under the spec's rule. (dk and dv do not here: the
    fp32 lse of a row near -100 is off by about 1e-5 (its ulp is 8e-6), which P = exp(s - lse)
    inherits in the backward, as in every flash backward that saves one fp32 lse per row.)"""
    g = torch.Generator().manual_seed(3)
    H, L, D = 2, 70, 16
    k = torch.randn(1, H, L, D, generator=g).abs() + 1.0
    q = torch.randn(1, H, L, D, generator=g)
    q[:, :, 40:] = -9.5 * k.mean(2, keepdim=True)           # rows 40.. see only logits below -88
    v = torch.randn(1, H, L, D, generator=g)
    q, k, v = (x.to(device).requires_grad_(True) for x in (q, k, v))
    grad = torch.randn(1, H, L, D, generator=g).to(device)
    assert mta_reference.mta_attention(q.detach(), k.detach(), v.detach(), causal=causal).isfinite().all()
    got = torch.autograd.grad(mta_kernels.mta_attention(q, k, v, causal=causal), (q, k, v), grad)
    ref = torch.autograd.grad(mta_reference.mta_attention(q, k, v, causal=causal, compute_dtype=torch.float64),
                              (q, k, v), grad)
    low = torch.autograd.grad(mta_reference.mta_attention(q, k, v, causal=causal), (q, k, v), grad)
    logits = (q[0, 0, 40:] @ k[0, 0].T) * D ** -0.5
    assert logits.max() < -88
    assert all(x.isfinite().all() for x in got)
    check_rule("dq", got[0], ref[0], low[0], torch.float32)


MIX_CASES = [
    Case(H=8, L=37, D=16, pre_mix=8, post_mix=8),
    Case(B=2, H=16, Hkv=4, L=33, D=24, pre_mix=8, post_mix=16),
    Case(H=8, L=40, D=16, post_mix=8, causal=False),
    Case(H=10, L=20, D=16, pre_mix=10),
    Case(H=16, L=20, D=16, pre_mix=8, post_mix=4),            # two head blocks, block-diagonal post mix
    Case(H=8, L=30, D=96, layout="blhd", pre_mix=8, post_mix=8),
    Case(H=8, L=30, D=32, pre_mix=8, post_mix=8),               # the widest fp32 heads of the register kernels
    Case(H=8, L=30, D=64, pre_mix=8, post_mix=8),               # fp32: too wide for them (chunked)
]


def _count_calls(monkeypatch, module, name):
    """Wrap module.name so that each call is recorded; returns the (growing) list of calls."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _assert_only_wanted(names, needs, expected, got, exact=True):
    """got holds expected's gradients where needs says so (bit for bit if exact, else to fp64
    rounding), and None elsewhere."""
    for name, need, e, g in zip(names, needs, expected, got):
        if need:
            assert torch.equal(e, g) if exact else torch.allclose(e, g, atol=1e-12, rtol=1e-10), name
        else:
            assert g is None, name


def _use_fused_mix_backward(monkeypatch):
    """Make sure the fused talking-heads backward is on and record that it ran."""
    monkeypatch.setattr(mta_kernels.backward, "FUSED_MIX_BACKWARD", True)
    return _count_calls(monkeypatch, mta_kernels.backward, "mix_backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", MIX_CASES, ids=lambda c: c.id)
def test_fused_mix_backward(case, dtype, device, monkeypatch):
    """Talking heads' gradients against the reference, through the register-mixing backward
    wherever its kernels take the heads (fp32 up to D=32, 16-bit up to 128; the chunked paths
    otherwise, forced so on the CPU too)."""
    from mta_kernels import chunked_forward, forward
    monkeypatch.setattr(chunked_forward, "CHUNKED_TALKING_HEADS", "auto")
    calls = _use_fused_mix_backward(monkeypatch)
    fits = forward.uses_register_mixing(*make_inputs(case, dtype, "cpu")[3:], case.D, dtype.itemsize)
    if not fits:
        monkeypatch.setattr(chunked_forward, "CHUNKED_TALKING_HEADS", "1")
    test_gradients_match_reference(case, dtype, device)
    assert bool(calls) == fits, "the fused mixing backward ran where it should not, or not where it should"


@pytest.mark.parametrize("splits", [1, 2, 8])
def test_fused_mix_backward_splits_agree(splits, device, monkeypatch):
    """The talking-heads backward with 1, 2 and 8 ranges (splits longer and shorter than the
    rows, empty ones) of keys per row block and rows per key block: the same gradients up to
    summation order."""
    case = Case(B=2, H=8, Hkv=2, L=70, D=16, pre_mix=8, post_mix=4)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    lse = mta_kernels.forward.mta_forward(q, k, v, *w, True, "both", case.D ** -0.5)[1]
    grad = torch.randn_like(q)
    run = lambda: mta_kernels.backward.mix_backward(grad, q, k, v, w[1], w[3], lse, True, case.D ** -0.5)
    monkeypatch.setattr(mta_kernels.backward, "MIX_BWD_MAX_SPLITS", 1)
    expected = run()
    monkeypatch.setattr(mta_kernels.backward, "MIX_BWD_MAX_SPLITS", splits)
    assert mta_kernels.backward.mix_backward_splits(5 * 2, 5) == min(splits, 5)
    for e, g in zip(expected, run()):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wanted", ["q", "k", "v", "pre_mix", "post_mix", "q k v"])
def test_fused_mix_backward_skips_unwanted_gradients(wanted, device, monkeypatch):
    """needs=: the talking-heads backward returns exactly the full call's gradients where asked
    and None elsewhere, launching only the kernels those need."""
    case = Case(B=1, H=8, Hkv=2, L=40, D=16, pre_mix=8, post_mix=4)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    lse = mta_kernels.forward.mta_forward(q, k, v, *w, True, "both", case.D ** -0.5)[1]
    grad = torch.randn_like(q)
    run = lambda needs: mta_kernels.backward.mix_backward(grad, q, k, v, w[1], w[3], lse, True,
                                                          case.D ** -0.5, needs=needs)
    expected = run((True,) * 5)
    launches = []
    for name in ("mta_mix_bwd_row_kernel", "mta_mix_bwd_col_kernel"):
        kernel = getattr(mta_kernels.backward, name)
        monkeypatch.setattr(mta_kernels.backward, name, _CountLaunches(kernel, name, launches))
    names = ("q", "k", "v", "pre_mix", "post_mix")
    needs = [name in wanted.split() for name in names]
    _assert_only_wanted(names, needs, expected, run(needs))
    row, col = "mta_mix_bwd_row_kernel", "mta_mix_bwd_col_kernel"   # row: Delta, then dq and dW
    assert launches == {"q": [row, row], "k": [row, col], "v": [col], "pre_mix": [row, row],
                        "post_mix": [row, row], "q k v": [row, row, col, col]}[wanted]


class _CountLaunches:
    """A Triton kernel stand-in that records each launch's name, then launches the kernel."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_mix_backward_split_counts_are_even():
    """Odd split counts measured 10-25% slower on the H200 at L=2048 (backward.py): the count
    goes up to the next even one unless a cap (MIX_BWD_MAX_SPLITS, the tiles) forbids it."""
    splits = mta_kernels.backward.mix_backward_splits
    assert [splits(n, n) for n in (64, 128, 256, 512, 1024)] == [8, 6, 4, 2, 1]
    assert splits(176, 176) == 4          # 3 rounded up
    assert splits(10, 5) == 5             # 6 would exceed the tiles


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [Case(H=16, L=2048, D=128, pre_mix=16, post_mix=16),
                                  Case(B=2, H=10, L=1000, D=96, pre_mix=10, post_mix=10)], ids=lambda c: c.id)
def test_fused_mix_backward_gpu(case, dtype, monkeypatch):
    """The register-mixing backward at realistic sizes on the GPU (the chunked paths turned off:
    'auto' takes them for talking heads from L=2048)."""
    from mta_kernels import chunked_forward
    monkeypatch.setattr(chunked_forward, "CHUNKED_TALKING_HEADS", "0")
    calls = _use_fused_mix_backward(monkeypatch)
    test_gradients_match_reference(case, dtype, "cuda")
    assert calls


CHUNKED_TALKING_HEADS_CASES = [
    Case(H=16, L=50, D=96, pre_mix=16, post_mix=16),                       # all heads mixed, D = 96
    Case(B=2, H=10, Hkv=5, L=40, D=16, pre_mix=10, post_mix=10, causal=False, layout="blhd"),
    Case(H=16, L=37, D=16, pre_mix=8, post_mix=8),                         # two groups
]


def _use_chunked_talking_heads(monkeypatch):
    """Send talking heads through the row-chunked forward and its backward (chunked_talking_heads)
    and record that backward's calls."""
    from mta_kernels import chunked_forward
    monkeypatch.setattr(chunked_forward, "CHUNKED_TALKING_HEADS", "1")
    return _count_calls(monkeypatch, mta_kernels.ops, "talking_heads_backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CHUNKED_TALKING_HEADS_CASES, ids=lambda c: c.id)
def test_chunked_talking_heads_backward(case, dtype, device, monkeypatch):
    """Talking heads through the row-chunked forward and the backward that reuses its lse (and,
    for bf16, its bf16 scores): every gradient against the reference under the spec's rule.
    (bf16 runs under the interpreter too: this path's dots are fp32.)"""
    calls = _use_chunked_talking_heads(monkeypatch)
    test_gradients_match_reference(case, dtype, device)
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_talking_heads_backward_chunks_and_needs(dtype, device):
    """Chunks of 16 rows (L = 45: a short last one) give one chunk's gradients to fp32 rounding,
    at B = 2 with GQA; each subset of wanted gradients gets exactly those (bit for bit), the
    others None."""
    from mta_kernels.chunked_forward import chunked_forward
    from mta_kernels.chunked_talking_heads import talking_heads_backward
    case = Case(B=2, H=8, Hkv=2, L=45, D=16, pre_mix=8, post_mix=8)
    q, k, v, _, pre_mix, _, post_mix = make_inputs(case, dtype, device)
    scale = case.D ** -0.5
    out, lse = chunked_forward(q, k, v, None, pre_mix, None, post_mix, causal=True, pad_key="both", scale=scale)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    run = lambda **kw: talking_heads_backward(grad, q, k, v, pre_mix, post_mix, lse, causal=True, scale=scale, **kw)
    whole, chunks = run(), run(rows=16)
    for name, a, b in zip(["q", "k", "v", "pre_mix", "post_mix"], whole, chunks):
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-4 if dtype == torch.float32 else 2 ** -7), name
    for wanted in ([1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0, 0, 1, 1, 0]):
        _assert_only_wanted(["q", "k", "v", "pre_mix", "post_mix"], wanted, whole, run(needs=[bool(n) for n in wanted]))


def test_chunked_talking_heads_gradcheck(device, monkeypatch):
    """fp64 gradcheck through the fused op with the row-chunked talking-heads forward and backward."""
    calls = _use_chunked_talking_heads(monkeypatch)
    case = Case(H=8, Hkv=4, L=6, D=4, pre_mix=8, post_mix=8)
    q, k, v, _, pre_mix, _, post_mix = [None if x is None else x.detach().double().requires_grad_()
                                        for x in make_inputs(case, torch.float64, device)]
    fn = lambda *xs: mta_kernels.mta_attention(xs[0], xs[1], xs[2], pre_mix=xs[3], post_mix=xs[4])
    assert torch.autograd.gradcheck(fn, [q, k, v, pre_mix, post_mix], fast_mode=True, atol=1e-7, rtol=1e-5)
    assert calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunked_talking_heads_gradients_gpu(dtype, monkeypatch):
    """Talking heads at L=4096 take the row-chunked forward and backward under 'auto' on CUDA;
    every gradient against the reference under the spec's rule."""
    from mta_kernels import chunked_forward
    monkeypatch.setattr(chunked_forward, "CHUNKED_TALKING_HEADS", "auto")
    case = Case(H=16, L=4096, D=128, pre_mix=16, post_mix=16)
    q, _, _, _, pre_mix, _, post_mix = make_inputs(case, dtype, "cuda")
    assert chunked_forward.prefer_chunked_talking_heads(q, None, pre_mix, None, post_mix)
    test_gradients_match_reference(case, dtype, "cuda")


@pytest.mark.parametrize("case, fused_mix", [(Case(L=32, **FULL), False),
                                             (Case(H=8, L=32, D=16, pre_mix=8, post_mix=8), True),
                                             (Case(H=8, L=32, D=16, pre_mix=8, post_mix=8), "chunked")],
                         ids=["full-reference-bwd", "talking-heads-fused-bwd", "talking-heads-chunked"])
def test_gradient_causality(case, fused_mix, device, monkeypatch):
    """A loss on outputs before t gives zero gradient to q, k, v at t and after."""
    if fused_mix == "chunked":
        _use_chunked_talking_heads(monkeypatch)
    elif fused_mix:
        _use_fused_mix_backward(monkeypatch)
    q, k, v, *w = make_inputs(case, torch.float32, device, requires_grad=True)
    t = 19
    out = mta_kernels.mta_attention(q, k, v, *w)
    out[:, :, :t].square().sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert torch.count_nonzero(x.grad[:, :, t:]) == 0, name
        assert torch.count_nonzero(x.grad[:, :, :t]) > 0, name


def test_frozen_inputs_get_no_gradient_work(device, monkeypatch):
    """Only inputs that require grad get gradients, frozen conv weights cost no weight-gradient
    kernel, and with nothing to differentiate the backward op is not run."""
    case = Case(L=20, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    q.requires_grad_()
    weight_grads = _count_calls(monkeypatch, mta_kernels.chunked_backward, "key_query_conv_weight_grad")
    out = mta_kernels.mta_attention(q, k, v, *w)
    out.sum().backward()
    assert q.grad is not None and k.grad is None and all(x.grad is None for x in w)
    assert weight_grads == []

    calls = _count_calls(monkeypatch, mta_kernels.ops, "chunked_backward")
    x = torch.ones((), requires_grad=True)
    out = mta_kernels.mta_attention(q.detach(), k, v, *w) * x   # nothing of MTA's requires grad
    out.sum().backward()
    assert calls == [] and x.grad is not None


@pytest.mark.parametrize("parts, chunked_forward", [({}, "0"), (dict(pre_mix=4, post_mix=4), "0"), (FULL, "0"),
                                                    (FULL, "1")], ids=["none", "talking-heads", "full", "full-chunked"])
def test_autocast_changes_nothing(parts, chunked_forward, device, monkeypatch):
    """Called inside torch.autocast (as in mixed-precision training), the op's output and
    gradients are bit-identical to those of a call outside it: the implementations pick
    their own dtypes (autocast had turned the chunked paths' fp32 matmuls into bf16 ones)."""
    from mta_kernels import chunked_forward as chunked
    monkeypatch.setattr(chunked, "CHUNKED_FORWARD", chunked_forward)
    q, k, v, *w = make_inputs(Case(L=40, **parts), torch.float16, device, requires_grad=True)
    inputs = [x for x in (q, k, v, *w) if x is not None]

    def run():
        out = mta_kernels.mta_attention(q, k, v, *w)
        return [out, *torch.autograd.grad(out, inputs, torch.ones_like(out))]

    expected = run()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = run()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("B, wanted", [(1, "q"), (1, "v"), (1, "k post_conv"), (1, "pre_conv pre_mix"),
                                        (1, "post_mix"), (1, "q k v"), (2, "v pre_conv")])
def test_chunked_backward_skips_unwanted_gradients(B, wanted, device, monkeypatch):
    """needs=: the chunked backward returns the full call's gradients where asked and None
    elsewhere, and runs a conv weight-gradient kernel only for a conv weight asked for (once
    per chunk and batch element). Bit for bit under the interpreter; on the GPU to fp64
    rounding, since kernels compiled without their weight-gradient outputs may contract
    multiply-adds differently (dq was not bit-identical on the H200, equal in the printed digits)."""
    case = Case(B=B, H=4, Hkv=2, L=15, D=6, pre_conv=(3, 5), pre_mix=2, post_conv=(4, 5), post_mix=4)
    inputs = [x.double() for x in make_inputs(case, torch.float64, device)]
    grad = torch.randn(inputs[0].shape, dtype=torch.float64).to(device)
    run = lambda needs: chunked_backward(grad, *inputs, causal=True, pad_key="both", scale=6 ** -0.5,
                                         compute_dtype=torch.float64, rows=8, needs=needs)
    expected = run((True,) * 7)
    calls = _count_calls(monkeypatch, mta_kernels.chunked_backward, "key_query_conv_weight_grad")
    needs = [name in wanted.split() for name in NAMES]
    _assert_only_wanted(NAMES, needs, expected, run(needs), exact=device == "cpu")
    conv_weights = sum(needs[i] for i in (3, 5))
    assert len(calls) == conv_weights * 2 * B   # per chunk of 8 of the 15 rows, per element


def test_opcheck(device):
    case = Case(L=12, D=16, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device, requires_grad=True)
    args = (q, k, v, *w, True, "both", 0.25)
    torch.library.opcheck(mta_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = mta_fwd(*args)
    needs = [True] * 7
    torch.library.opcheck(mta_bwd, (torch.randn_like(out), q, k, v, *w, out, lse, True, "both", 0.25, needs),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("parts", [{}, dict(pre_mix=8, post_mix=8), FULL], ids=["none", "talking-heads", "full"])
def test_eager_function_matches_custom_op(parts, device):
    """Eager calls go through ops.MTAFunction, compiled ones through the custom ops: the same
    implementations, so the same output and gradients bit for bit (frozen k included)."""
    case = Case(H=8, L=40, D=16, **parts)
    q, k, v, *w = make_inputs(case, torch.float32, device, requires_grad=True)
    k.requires_grad_(False)
    grad = torch.randn(case.B, case.H, case.L, case.D, device=device)
    args = (q, k, v, *w, True, "both", 0.25)
    wanted = [x for x in (q, v, *w) if x is not None]
    out_op = mta_kernels.ops.mta_fwd(*args)[0]
    out_fn = mta_kernels.ops.MTAFunction.apply(*args)
    assert torch.equal(out_op, out_fn)
    for a, b in zip(torch.autograd.grad(out_op, wanted, grad), torch.autograd.grad(out_fn, wanted, grad)):
        assert torch.equal(a, b)


def test_double_backward_is_refused(device):
    """No second derivatives: create_graph=True fails with a message, instead of returning
    gradients without a graph (which would make a gradient penalty silently wrong)."""
    q, k, v = (torch.randn(1, 2, 8, 16, device=device, requires_grad=True) for _ in range(3))
    out = mta_kernels.mta_attention(q, k, v)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_compiled_training_step(device):
    """torch.compile(fullgraph=True) over forward and backward: no graph break, same numbers."""
    case = Case(L=16, D=16, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device, requires_grad=True)

    def step(q, k, v, *w):
        out = mta_kernels.mta_attention(q, k, v, *w)
        loss = out.square().mean()
        return loss, torch.autograd.grad(loss, (q, k, v, *w))

    eager_loss, eager_grads = step(q, k, v, *w)
    compiled = torch.compile(lambda *a: mta_kernels.mta_attention(*a).square().mean(), fullgraph=True)
    loss = compiled(q, k, v, *w)
    grads = torch.autograd.grad(loss, (q, k, v, *w))
    assert torch.allclose(loss, eager_loss, atol=1e-6)
    for name, g, e in zip(NAMES, grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4), name


PAPER = dict(pre_conv=(6, 11), pre_mix=16, post_conv=(6, 11), post_mix=16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [Case(H=16, L=2048, D=128, **PAPER), Case(B=2, H=16, Hkv=4, L=1000, D=96, **PAPER)],
                         ids=lambda c: c.id)
def test_gradients_gpu(case, dtype):
    test_gradients_match_reference(case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [Case(H=16, L=4096, D=128), Case(B=2, H=16, Hkv=4, L=1000, D=96, causal=False),
                                  Case(H=16, L=1024, D=256)],
                         ids=lambda c: c.id)
def test_flash_gradients_gpu(case, dtype):
    test_gradients_match_reference(case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [Case(B=2, H=16, Hkv=4, L=2048, D=128),
                                  Case(B=2, H=16, Hkv=4, L=1024, D=128, pre_mix=16, post_mix=16),
                                  Case(B=2, H=16, Hkv=4, L=512, D=128, **PAPER),
                                  Case(H=16, L=4096, D=128, pre_mix=16, post_mix=16)],
                         ids=["flash", "talking-heads", "full", "talking-heads-chunked"])
def test_backward_is_deterministic(case):
    """50 backward passes give bitwise-identical gradients: no atomics on any path, partial
    sums reduced in a fixed order."""
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda", requires_grad=True)
    inputs = [x for x in (q, k, v, *w) if x is not None]
    out = mta_kernels.mta_attention(q, k, v, *w)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    for _ in range(50):
        again = torch.autograd.grad(out, inputs, grad, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [Case(H=16, L=2048, D=128),
                                  Case(H=16, L=2048, D=128, pre_mix=16, post_mix=16),
                                  Case(B=2, H=16, Hkv=4, L=1000, D=96, **PAPER)],
                         ids=["none", "talking-heads-chunked", "full"])
def test_cuda_graph_replay(case):
    """Forward and backward captured in one CUDA graph (what a host-bound caller does, and
    what ``python -m bench --cuda-graphs`` times) and replayed on new inputs copied into the
    captured ones give the eager call's output and gradients to the bit: no host sync, no
    host-side value and no allocation outside the graph's pool is baked into the capture."""
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda", requires_grad=True)
    inputs = [x for x in (q, k, v, *w) if x is not None]
    grad = torch.randn_like(q)

    def step():
        out = mta_kernels.mta_attention(q, k, v, *w)
        return (out, *torch.autograd.grad(out, inputs, grad))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                   # compiles and warms the allocator off the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for x, new in zip((q, k, v, *w), make_inputs(case, torch.bfloat16, "cuda", seed=1)):
            if x is not None:
                x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    assert all(torch.equal(a, b) for a, b in zip(captured, expected))


@pytest.mark.gpu
def test_compiled_reduce_overhead():
    """torch.compile(mode="reduce-overhead") (CUDA graphs through the custom ops, forward and
    backward) over the chunked talking heads: after its recording calls, the replayed graphs
    give the eager call's output and gradients to the bit."""
    case = Case(H=16, L=2048, D=128, pre_mix=16, post_mix=16)
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda", requires_grad=True)
    inputs = [x for x in (q, k, v, *w) if x is not None]
    grad = torch.randn_like(q)

    def step(attention):
        out = attention(q, k, v, *w)
        return [out.detach().clone(), *torch.autograd.grad(out, inputs, grad)]

    expected = step(mta_kernels.mta_attention)
    compiled = torch.compile(mta_kernels.mta_attention, mode="reduce-overhead")
    for _ in range(3):                           # warm-up, record, replay
        got = step(compiled)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


GRADCHECK_CASES = [
    pytest.param(Case(H=2, L=6, D=4), False, id="none-flash-bwd"),
    pytest.param(Case(H=2, L=6, D=4, causal=False, Hkv=1), False, id="none-noncausal-mqa"),
    pytest.param(Case(H=2, L=6, D=4, pre_conv=(2, 3)), False, id="pre_conv"),
    pytest.param(Case(H=2, L=6, D=4, pre_mix=2), False, id="pre_mix"),
    pytest.param(Case(H=2, L=6, D=4, post_conv=(2, 3), pad_key="left"), False, id="post_conv-left"),
    pytest.param(Case(H=2, L=6, D=4, post_mix=2), False, id="post_mix"),
    pytest.param(Case(H=2, L=6, D=4, pre_conv=(2, 3), pre_mix=2, post_conv=(3, 3), post_mix=2), False, id="full"),
    pytest.param(Case(H=8, Hkv=4, L=5, D=4, pre_mix=8, post_mix=8), True, id="talking-heads-fused-bwd"),
]


@pytest.mark.parametrize("case, fused_mix", GRADCHECK_CASES)
def test_gradcheck_fused_op(case, fused_mix, device, monkeypatch):
    """fp64 gradcheck through the fused op: the Triton forward (fp64 accumulators for fp64
    inputs) against the backward the op registers."""
    if fused_mix:
        calls = _use_fused_mix_backward(monkeypatch)
    inputs = [x.detach().double().requires_grad_() if x is not None else None
              for x in make_inputs(case, torch.float64, device)]
    present = [i for i, x in enumerate(inputs) if x is not None]

    def fn(*xs):
        args = list(inputs)
        for i, x in zip(present, xs):
            args[i] = x
        return mta_kernels.mta_attention(*args, causal=case.causal, pad_key=case.pad_key)

    assert torch.autograd.gradcheck(fn, [inputs[i] for i in present], fast_mode=True, atol=1e-7, rtol=1e-5)
    if fused_mix:
        assert calls


@pytest.mark.gpu
def test_long_sequence_fwd_bwd_memory():
    """Full MTA forward+backward at L = 32768 runs with memory far from the (L x L) tensors
    the materialized path needs (~192 GiB per the benchmark's estimate): under 4 GiB beyond
    the inputs, their gradients and the output."""
    case = Case(H=16, L=32768, D=128, **PAPER)
    inputs = make_inputs(case, torch.bfloat16, "cuda", requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = mta_kernels.mta_attention(*inputs)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    own = sum(x.numel() * x.element_size() for x in inputs) + out.numel() * out.element_size()
    extra = torch.cuda.max_memory_allocated() - base - own
    print(f"L=32768 full MTA fwd+bwd: peak {extra / 2**30:.2f} GiB beyond inputs, grads and output")
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    assert extra < 4 * 2**30, f"{extra / 2**30:.2f} GiB"


@pytest.mark.parametrize("zero_above", [None, 0, 37])
@pytest.mark.parametrize("shape, cq, ck, pad_key", [((1, 2, 7, 13), 3, 5, "both"), ((2, 3, 20, 70), 6, 11, "both"),
                                                    ((1, 2, 5, 9), 2, 4, "left"), ((1, 1, 33, 40), 4, 3, "right"),
                                                    ((1, 2, 20, 200), 6, 11, "both"), ((1, 1, 9, 200), 3, 4, "left"),
                                                    ((1, 1, 20, 90), 2, 35, "both"), ((1, 1, 17, 80), 3, 20, "left")])
def test_slab_convs_match_reference(shape, cq, ck, pad_key, zero_above):
    """The Triton slab convs of the chunked backward against the reference's conv2d versions:
    the conv, its input gradient and its weight gradient (fp64, non-contiguous input; kernels
    wider than 33 taps need 32-column halos). With zero_above, the kernels get inputs that are
    *not* zero above that diagonal and must read them as zero (the reference gets them zeroed):
    the weight gradient both of its inputs."""
    from mta_kernels import slab_conv
    from mta_reference import backward as ref_bwd
    from mta_reference.mta import key_query_conv

    g = torch.Generator().manual_seed(0)
    x_raw, grad_raw = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    x, grad = x_raw, grad_raw
    if zero_above is not None:
        rows, cols = torch.arange(shape[2])[:, None], torch.arange(shape[3])[None, :]
        x, grad = (t.masked_fill(cols - rows > zero_above, 0.0) for t in (x_raw, grad_raw))
    w = torch.randn(shape[1], cq, ck, generator=g, dtype=torch.float64)
    x_strided = x_raw.transpose(2, 3).contiguous().transpose(2, 3)
    z = dict(zero_above=zero_above)
    pairs = [(slab_conv.key_query_conv(x_strided, w, pad_key, **z), key_query_conv(x, w, pad_key)),
             (slab_conv.key_query_conv_input_grad(grad_raw, w, pad_key, **z),
              ref_bwd.key_query_conv_input_grad(grad, w, pad_key)),
             (slab_conv.key_query_conv_weight_grad(grad_raw, x_strided, w, pad_key, **z),
              ref_bwd.key_query_conv_weight_grad(grad, x, w, pad_key))]
    for got, expected in pairs:
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("zero_above", [None, 11])
def test_slab_convs_on_16bit_slabs(zero_above, device):
    """The slab convs on 16-bit slabs (the chunked paths' bf16 slabs; fp16 under the interpreter,
    whose bf16 tl.dot is wrong): the weights rounded to the slab's dtype, sums in fp32, the
    conv and its input gradient stored rounded once (within one unit in the last place of
    the exact result of those 16-bit operands), the weight gradient in fp32."""
    from mta_kernels import slab_conv
    from mta_reference import backward as ref_bwd
    from mta_reference.mta import key_query_conv
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    g = torch.Generator().manual_seed(1)
    x, grad = (torch.randn(1, 3, 40, 100, generator=g).to(device, dtype) for _ in range(2))
    w = torch.randn(3, 6, 11, generator=g).to(device)
    if zero_above is not None:
        rows, cols = torch.arange(40, device=device)[:, None], torch.arange(100, device=device)[None, :]
        x, grad = (t.masked_fill(cols - rows > zero_above, 0.0) for t in (x, grad))
    w16 = w.to(dtype).double()
    z = dict(zero_above=zero_above, precision="ieee")
    ulp = torch.finfo(dtype).eps
    for got, exact in [(slab_conv.key_query_conv(x, w, "both", **z), key_query_conv(x.double(), w16, "both")),
                       (slab_conv.key_query_conv_input_grad(grad, w, "both", **z),
                        ref_bwd.key_query_conv_input_grad(grad.double(), w16, "both"))]:
        assert got.dtype == dtype
        assert ((got.double() - exact).abs() <= ulp * exact.abs() + 1e-6).all()
    dw = slab_conv.key_query_conv_weight_grad(grad, x, w, "both", **z)
    assert dw.dtype == torch.float32
    torch.testing.assert_close(dw.double(), ref_bwd.key_query_conv_weight_grad(grad.double(), x.double(), w, "both"),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("keys", [288, 270])    # rows of 16-byte multiples (TMA on sm_90 / the interpreter) or not
@pytest.mark.parametrize("strip", [dict(TILES=0), dict(), dict(tma=False), dict(group=2)],
                         ids=["per_tile", "strip", "strip_pointers", "strip_two_offsets_per_dot"])
def test_strip_conv_kernel_on_16bit_slabs(strip, keys, device, monkeypatch):
    """The conv and its input gradient on 16-bit slabs through each kernel (a program per tile;
    per strip of column tiles, the tiles clear of the causal diagonal loaded by TMA where x's
    strides allow, or by pointers, one or two query offsets per dot): several row tiles and
    strips, causal slabs whose tiles are clear, on the diagonal and beyond it, a row-offset
    view, the band beside the pre-conv matmul; each within one unit in the last place of the
    exact result of the 16-bit operands, plus the error bound of summing its cq * ck products
    in fp32 (entries that nearly cancel, which a GPU's fp32 accumulation gets to about 1e-6)."""
    from mta_kernels import slab_conv
    from mta_reference import backward as ref_bwd
    from mta_reference.mta import key_query_conv
    monkeypatch.setattr(slab_conv, "STRIP_CONV_CONFIG", dict(slab_conv.STRIP_CONV_CONFIG, **strip))
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 153, keys, generator=g).to(device, dtype)
    w = torch.randn(2, 6, 11, generator=g).to(device)
    w16 = w.to(dtype).double()
    ulp = torch.finfo(dtype).eps
    rows, cols = torch.arange(150, device=device)[:, None], torch.arange(keys, device=device)[None, :]
    xs = x[:, :, 3:]                    # a view that starts 3 rows in

    def assert_rounded_once(got, exact, magnitude, what):
        """got within one ulp of exact plus fp32 summation's bound over magnitude (the sum of
        the products' absolute values)."""
        excess = (got.double() - exact).abs() - ulp * exact.abs() - 66 * 2.0 ** -24 * magnitude
        assert got.dtype == dtype
        assert (excess <= 0).all(), (f"{what}: {(excess > 0).sum().item()} entries off, the worst by "
                                     f"{excess.max().item():.3g} at {tuple((excess > 0).nonzero()[0].tolist())}")

    for zero_above in (None, 3, 90):
        future = (cols - rows > zero_above) if zero_above is not None else torch.zeros_like(cols - rows, dtype=bool)
        xz = xs.masked_fill(future, 0.0).double()    # the kernels read the causal future as zero
        z = dict(zero_above=zero_above, precision="ieee")
        assert_rounded_once(slab_conv.key_query_conv(xs, w, "both", **z), key_query_conv(xz, w16, "both"),
                            key_query_conv(xz.abs(), w16.abs(), "both"), f"conv, zero_above={zero_above}")
        assert_rounded_once(slab_conv.key_query_conv_input_grad(xs, w, "both", mask_output=True, **z),
                            ref_bwd.key_query_conv_input_grad(xz, w16, "both").masked_fill(future, 0.0),
                            ref_bwd.key_query_conv_input_grad(xz.abs(), w16.abs(), "both"),
                            f"input gradient, zero_above={zero_above}")
    # the band tiles beside the pre-conv matmul (every entry whose window reaches above the
    # diagonal), x holding the columns from the band's first on
    lo = 90
    first = slab_conv.band_first_column(lo, 6, 11, "both")
    xz = xs.masked_fill(cols - rows > lo, 0.0).double()
    out = torch.full_like(xs, float("nan"))     # (a number as the mark: bf16 results hit 7.0 on the H200)
    slab_conv.key_query_conv(xs[..., first:], w, "both", zero_above=lo, out=out, band=True, x_col0=first,
                             precision="ieee")
    written = ~out.isnan()
    assert written[..., cols - rows > lo - 5 - 5].all()
    assert_rounded_once(out[written], key_query_conv(xz, w16, "both")[written],
                        key_query_conv(xz.abs(), w16.abs(), "both")[written], "band")


@pytest.mark.parametrize("keys", [288, 270])    # rows of 16-byte multiples (TMA) or not
@pytest.mark.parametrize("strip", [dict(on=False), dict(on=True), dict(on=True, tma=False)],
                         ids=["per_offset", "strip", "strip_pointers"])
def test_conv_weight_grad_kernels_on_16bit_slabs(strip, keys, device, monkeypatch):
    """The conv weight gradient of 16-bit slabs through either kernel (the committed one; the
    transposed-product kernel with the tiles clear of the causal diagonal loaded by TMA or by
    pointers): causal slabs with clear, diagonal and future tiles, the gradient's rows limited,
    a row-offset view; within fp32 summation of the exact result of the 16-bit operands."""
    from mta_kernels import slab_conv
    from mta_reference import backward as ref_bwd
    monkeypatch.setattr(slab_conv, "WEIGHT_GRAD_STRIP_CONFIG", dict(slab_conv.WEIGHT_GRAD_STRIP_CONFIG, **strip))
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    g = torch.Generator().manual_seed(3)
    x, grad = (torch.randn(1, 2, 153, keys, generator=g).to(device, dtype)[:, :, 3:] for _ in range(2))
    w = torch.randn(2, 6, 11, generator=g).to(device)
    rows, cols = torch.arange(150, device=device)[:, None], torch.arange(keys, device=device)[None, :]
    for zero_above, own_rows in ((None, None), (3, (5, 150)), (90, (20, 130))):
        future = (cols - rows > zero_above) if zero_above is not None else torch.zeros_like(cols - rows, dtype=bool)
        lo, hi = own_rows or (0, 150)
        mine = (rows >= lo) & (rows < hi)
        exact = ref_bwd.key_query_conv_weight_grad(grad.double().masked_fill(future | ~mine, 0.0),
                                                   x.double().masked_fill(future, 0.0), w.double(), "both")
        got = slab_conv.key_query_conv_weight_grad(grad, x, w, "both", zero_above=zero_above, rows=own_rows,
                                                   precision="ieee")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)


def test_slab_conv_unroll_factor():
    """The conv kernel's loop over query offsets: "full" unrolls cq offsets up to
    MAX_FULL_UNROLL and none beyond (wide kernels spill); a number is taken as it is."""
    from mta_kernels.slab_conv import MAX_FULL_UNROLL, _unroll
    assert _unroll(6, dict(unroll="full")) == 6 and _unroll(1, dict(unroll="full")) == 1
    assert _unroll(MAX_FULL_UNROLL, dict(unroll="full")) == MAX_FULL_UNROLL
    assert _unroll(MAX_FULL_UNROLL + 1, dict(unroll="full")) == 1
    assert _unroll(6, dict(unroll=2)) == 2 and _unroll(6, {}) == 1


@pytest.mark.parametrize("transpose", [False, True])
def test_slab_conv_masked_output_and_weight_grad_rows(transpose):
    """mask_output zeroes the result above the diagonal (and nothing else); the weight gradient
    with rows=(lo, hi) counts only those rows of the gradient."""
    from mta_kernels import slab_conv
    from mta_reference import backward as ref_bwd

    g = torch.Generator().manual_seed(2)
    shape, z = (2, 2, 70, 100), 5
    rows, cols = torch.arange(shape[2])[:, None], torch.arange(shape[3])[None, :]
    future = cols - rows > z
    x, grad = (torch.randn(shape, generator=g, dtype=torch.float64).masked_fill(future, 0.0) for _ in range(2))
    w = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    conv = slab_conv.key_query_conv_input_grad if transpose else slab_conv.key_query_conv
    plain = conv(x, w, "both", zero_above=z)
    masked = conv(x, w, "both", zero_above=z, mask_output=True)
    assert plain.masked_fill(~future, 0.0).abs().max() > 0.1     # the mask has work to do
    assert torch.equal(masked, plain.masked_fill(future, 0.0))
    own = (rows >= 20) & (rows < 53)
    expected = ref_bwd.key_query_conv_weight_grad(grad.masked_fill(~own, 0.0), x, w, "both")
    got = slab_conv.key_query_conv_weight_grad(grad, x, w, "both", zero_above=z, rows=(20, 53))
    assert torch.allclose(got, expected, atol=1e-12, rtol=1e-10)



def test_conv_weight_grad_sums_over_chunks(device):
    """ConvWeightGradSums: slabs of several sizes (chunks) write their weight-gradient partial
    sums into slices of one buffer, sized for the largest slab (the smaller slabs' extra slots
    stay zero), reduced when the buffer fills (a small byte cap forces that) and at the end: the
    sum of the slabs' own weight gradients; a slice of the wrong shape is refused by name."""
    from mta_kernels import slab_conv
    g = torch.Generator().manual_seed(11)
    w = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(device)
    slabs = [(grad.to(device), x.to(device)) for grad, x in
             ((torch.randn(1, 2, R, K, generator=g, dtype=torch.float64),
               torch.randn(1, 2, R, K, generator=g, dtype=torch.float64)) for R, K in ((70, 100), (20, 40), (64, 96)))]
    expected = sum(slab_conv.key_query_conv_weight_grad(grad, x, w, "both", zero_above=3, rows=(2, 18))
                   for grad, x in slabs)
    one_slice = 2 * 3 * slab_conv._weight_grad_tiles(70, 100, 5, "both")[3] * 5 * 8
    sums = slab_conv.ConvWeightGradSums(w, 2, 70, 100, "both", len(slabs), device, torch.float64,
                                        max_bytes=2 * one_slice)
    assert sums.buffer.shape[0] == 2
    for grad, x in slabs:
        assert slab_conv.key_query_conv_weight_grad(grad, x, w, "both", zero_above=3, rows=(2, 18),
                                                    partial=sums.next_slice()) is None
    assert torch.allclose(sums.result(), expected, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="partial"):
        slab_conv.key_query_conv_weight_grad(*slabs[0], w, "both", partial=sums.buffer[0, :, :, :1])

def test_chunked_backward_long_causal_slabs(device):
    """Slabs several column tiles wide, so the slab convs skip the tiles above the diagonal."""
    case = Case(B=1, H=2, L=150, D=8, pre_conv=(3, 5), post_conv=(2, 5), post_mix=2)
    inputs = make_inputs(case, torch.float64, device)
    grad = torch.randn(inputs[0].shape, dtype=torch.float64).to(device)
    expected = mta_reference.mta_attention_backward(grad, *inputs, compute_dtype=torch.float64)
    got = chunked_backward(grad, *inputs, causal=True, pad_key="both", scale=8 ** -0.5,
                           compute_dtype=torch.float64, rows=40)
    for name, e, g in zip(NAMES, expected, got):
        if e is not None:
            assert g is not None
            assert torch.allclose(e, g, atol=1e-12, rtol=1e-10), name


@pytest.mark.parametrize("pad_key, ck", [("both", 5), ("left", 4), ("right", 4)])
def test_slab_convs_skip_exactly_the_zero_tiles(pad_key, ck):
    """Tiles at the diagonal bound: for every Z near a tile corner's column-minus-row (65
    here: rows 0..63 by columns 128..191), a tap that reads the last nonzero entry must not
    be skipped. An under-estimate of how far taps reach by one fails here."""
    from mta_kernels import slab_conv
    from mta_reference import backward as ref_bwd
    from mta_reference.mta import key_query_conv

    g = torch.Generator().manual_seed(1)
    shape = (1, 1, 100, 256)
    rows, cols = torch.arange(shape[2])[:, None], torch.arange(shape[3])[None, :]
    w = torch.randn(1, 3, ck, generator=g, dtype=torch.float64)
    for z in range(57, 67):
        x, grad = (torch.randn(shape, generator=g, dtype=torch.float64).masked_fill(cols - rows > z, 0.0)
                   for _ in range(2))
        pairs = [(slab_conv.key_query_conv(x, w, pad_key, z), key_query_conv(x, w, pad_key)),
                 (slab_conv.key_query_conv_input_grad(grad, w, pad_key, z),
                  ref_bwd.key_query_conv_input_grad(grad, w, pad_key)),
                 (slab_conv.key_query_conv_weight_grad(grad, x, w, pad_key, z),
                  ref_bwd.key_query_conv_weight_grad(grad, x, w, pad_key))]
        for i, (got, expected) in enumerate(pairs):
            assert torch.allclose(got, expected, atol=1e-12, rtol=1e-10), (z, i)


@pytest.mark.parametrize("causal, pad_key", [(True, "both"), (False, "left"), (True, "right")])
def test_chunked_backward_with_the_pre_conv_matmul(causal, pad_key, device, monkeypatch):
    """The chunked backward with its forward recomputation's pre conv as one matmul (switched
    on, and forced as 'auto' would for 16-bit inputs) gives exactly the materialized backward
    (fp64): rows long enough for tiles the matmul keeps, chunks of 40 rows, GQA."""
    from mta_kernels import chunked_backward as backward, slabs
    calls = []
    real = slabs.pre_conv_matmul
    monkeypatch.setattr(backward, "PRE_CONV_MATMUL_IN_BACKWARD", True)
    monkeypatch.setattr(slabs, "PRE_CONV_MATMUL", "1")
    monkeypatch.setattr(slabs, "pre_conv_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ck = 5 if pad_key == "both" else 4
    case = Case(B=1, H=4, Hkv=2, L=128, D=8, pre_conv=(3, ck), pre_mix=4, post_conv=(2, ck), post_mix=2,
                causal=causal, pad_key=pad_key)
    inputs = make_inputs(case, torch.float64, device)
    grad = torch.randn(inputs[0].shape, dtype=torch.float64).to(device)
    expected = mta_reference.mta_attention_backward(grad, *inputs, causal=causal, pad_key=pad_key,
                                                    compute_dtype=torch.float64)
    got = backward.chunked_backward(grad, *inputs, causal=causal, pad_key=pad_key, scale=8 ** -0.5,
                                    compute_dtype=torch.float64, rows=40)
    assert calls
    for name, e, g in zip(NAMES, expected, got):
        assert torch.allclose(e, g, atol=1e-12, rtol=1e-10), name
