"""Query blocks at the end of a sequence (q_prev, seqlens) and packed documents (cu_seqlens)
through the kernels, against the reference, on every path that takes them."""
import pytest
import torch

import mta_kernels
import mta_reference
from cases import Case, make_inputs
from tolerance import check_rule

FULL = dict(pre_conv=(3, 5), pre_mix=4, post_conv=(2, 3), post_mix=4)
BLOCK_CASES = [
    Case(B=2, H=4, L=40, D=16),
    Case(B=2, H=4, L=40, D=16, pre_mix=4, post_mix=4),
    Case(B=2, H=4, Hkv=2, L=40, D=16, **FULL),
    Case(B=1, H=4, L=37, D=16, pre_conv=(4, 4), post_conv=(2, 6), pad_key="left"),
    Case(B=1, H=4, L=37, D=16, pre_conv=(3, 4), post_mix=2, pad_key="right", causal=False),
]


def _paths(case):
    """The block paths for a case: the fused decode step and the general one."""
    if case.pre_conv is None and case.post_conv is None and case.pre_mix is None and case.post_mix is None:
        return ["flash"]
    return ["decode", "chunked"]


def _check_block(case, q, k, v, w, Lq, path, seqlens=None, q_prev=None, dtype=torch.float32):
    opts = dict(causal=case.causal, pad_key=case.pad_key, seqlens=seqlens, q_prev=q_prev)
    with torch.no_grad():
        got = mta_kernels.mta_attention(q, k, v, *w, **opts, kernel_options={"path": path})
    ref = mta_reference.mta_attention(q, k, v, *w, **opts, compute_dtype=torch.float64)
    low = mta_reference.mta_attention(q, k, v, *w, **opts, compute_dtype=dtype)
    check_rule(f"{path} Lq={Lq}", got, ref, low, dtype)
    return got


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: c.id)
def test_block_at_the_end_matches_the_reference(case, device):
    q, k, v, *w = make_inputs(case, torch.float32, device)
    for path in _paths(case):
        for Lq in (1, 3):
            _check_block(case, q[:, :, -Lq:], k, v, w, Lq, path, q_prev=q[:, :, :-Lq])


@pytest.mark.parametrize("pad_key", ["left", "right"])
def test_decode_step_with_convs_reaching_sixteen_keys(pad_key, device):
    """The decode step's widest convs: 17 taps on one side of the key, rows of one head groups."""
    case = Case(B=2, H=3, L=45, D=16, pre_conv=(2, 17), post_conv=(3, 17), pre_mix=1, pad_key=pad_key)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    _check_block(case, q[:, :, -2:], k, v, w, 2, "decode", q_prev=q[:, :, :-2])


@pytest.mark.parametrize("case", BLOCK_CASES[1:3], ids=lambda c: c.id)
def test_block_equals_the_last_rows_of_the_whole_call(case, device):
    """The reference's own block semantics aside: a block's rows are the whole call's rows."""
    q, k, v, *w = make_inputs(case, torch.float32, device)
    whole = mta_kernels.mta_attention(q, k, v, *w, causal=case.causal, pad_key=case.pad_key)
    with torch.no_grad():
        for path in _paths(case):
            for Lq in (1, 5):
                blk = mta_kernels.mta_attention(q[:, :, -Lq:], k, v, *w, causal=case.causal, pad_key=case.pad_key,
                                                q_prev=q[:, :, :-Lq], kernel_options={"path": path})
                assert (blk - whole[:, :, -Lq:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("path", ["decode", "chunked"])
def test_ragged_batch_equals_each_sequence_alone(path, device):
    case = Case(B=3, H=4, L=40, D=16, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    lens = torch.tensor([40, 17, 9], device=device)
    Lq, P = 2, 3
    # each sequence's last Lq queries and the P before them, gathered from its own length
    qb = torch.stack([q[b, :, n - Lq:n] for b, n in enumerate(lens.tolist())])
    qp = torch.stack([q[b, :, n - Lq - P:n - Lq] for b, n in enumerate(lens.tolist())])
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):      # what lies beyond a sequence's keys must not matter
        k2[b, :, n:] = float("nan")
        v2[b, :, n:] = 1e4                     # (finite: A V multiplies it by zero weights)
    with torch.no_grad():
        got = mta_kernels.mta_attention(qb, k2, v2, *w, q_prev=qp, seqlens=lens, kernel_options={"path": path})
        for b, n in enumerate(lens.tolist()):
            alone = mta_kernels.mta_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n], *w)
            assert (got[b] - alone[0, :, -Lq:]).abs().max().item() < 1e-5, b


def test_decoding_token_by_token_reproduces_the_whole_forward(device):
    case = Case(B=2, H=4, L=30, D=16, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    whole = mta_kernels.mta_attention(q, k, v, *w)
    halo = 3      # (cq-1) + (cq'-1): q_prev always holds 3 rows, zeros above the sequence's start
    padded = torch.cat([torch.zeros_like(q[:, :, :halo]), q], dim=2)
    with torch.no_grad():
        for t in range(1, case.L + 1):
            step = mta_kernels.mta_attention(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t], *w,
                                             q_prev=padded[:, :, t - 1:t - 1 + halo])
            assert (step - whole[:, :, t - 1:t]).abs().max().item() < 1e-5, t


@pytest.mark.parametrize("path", ["decode", "chunked"])
def test_block_near_the_start_takes_the_rows_that_exist(path, device):
    """A block starting at position p < (cq-1) + (cq'-1) = 3 needs only the p queries above it."""
    case = Case(B=2, H=4, L=6, D=16, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    with torch.no_grad():
        whole = mta_kernels.mta_attention(q, k, v, *w)
        ref_whole = mta_reference.mta_attention(q, k, v, *w)
        for t, Lq in ((2, 1), (3, 2), (3, 1), (4, 2)):
            qb, qp = q[:, :, t - Lq:t], q[:, :, :t - Lq]
            blk = mta_kernels.mta_attention(qb, k[:, :, :t], v[:, :, :t], *w, q_prev=qp, kernel_options={"path": path})
            assert (blk - whole[:, :, t - Lq:t]).abs().max().item() < 1e-5, (t, Lq)
            ref = mta_reference.mta_attention(qb, k[:, :, :t], v[:, :, :t], *w, q_prev=qp)
            assert (ref - ref_whole[:, :, t - Lq:t]).abs().max().item() < 1e-5, (t, Lq)
        # a ragged batch: the longest sequence sets how many rows q_prev must hold (sequence 1's
        # first row lies at position -1: never read, whatever it holds)
        lens = torch.tensor([3, 2], device=device)
        qb = torch.stack([q[0, :, 2:3], q[1, :, 1:2]])
        qp = torch.stack([q[0, :, :2], torch.cat([torch.full_like(q[1, :, :1], 1e4), q[1, :, :1]], dim=1)])
        blk = mta_kernels.mta_attention(qb, k[:, :, :3], v[:, :, :3], *w, q_prev=qp, seqlens=lens,
                                        kernel_options={"path": path})
        assert (blk[0] - whole[0, :, 2:3]).abs().max().item() < 1e-5
        assert (blk[1] - whole[1, :, 1:2]).abs().max().item() < 1e-5
        with pytest.raises(ValueError, match="q_prev must hold the 2 queries"):
            mta_kernels.mta_attention(qb, k[:, :, :3], v[:, :, :3], *w, q_prev=qp[:, :, 1:], seqlens=lens)


def test_block_errors(device):
    case = Case(B=2, H=4, L=20, D=16, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    with torch.no_grad():
        with pytest.raises(ValueError, match="q_prev"):
            mta_kernels.mta_attention(q[:, :, -1:], k, v, *w)
        with pytest.raises(ValueError, match="q_prev"):
            mta_kernels.mta_attention(q[:, :, -1:], k, v, *w, q_prev=q[:, :, :2])
        with pytest.raises(ValueError, match="seqlens"):
            mta_kernels.mta_attention(q[:, :, -1:], k, v, *w, q_prev=q[:, :, :5], seqlens=torch.tensor([3, 30]))
        with pytest.raises(TypeError, match="seqlens"):
            mta_kernels.mta_attention(q[:, :, -1:], k, v, *w, q_prev=q[:, :, :5], seqlens=torch.tensor([3.0, 4.0]))
        with pytest.raises(ValueError, match="path"):
            mta_kernels.mta_attention(q[:, :, -1:], k, v, *w, q_prev=q[:, :, :5],
                                      kernel_options={"path": "talking_heads"})
    qg = q[:, :, -1:].detach().requires_grad_()
    with pytest.raises(RuntimeError, match="forward only"):
        mta_kernels.mta_attention(qg, k, v, *w, q_prev=q[:, :, :5])


PACKED_DOCS = [[0, 1, 7, 20, 45], [0, 45], [0, 3, 4, 5, 45]]


@pytest.mark.parametrize("offsets", PACKED_DOCS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("parts, causal", [(FULL, True), (dict(pre_mix=4, post_mix=4), True), ({}, True),
                                           (dict(pre_conv=(3, 5), post_conv=(2, 3)), False)],
                         ids=["full", "talking_heads", "none", "convs-noncausal"])
def test_packed_equals_each_document_alone(offsets, parts, causal, device):
    case = Case(B=1, H=4, Hkv=2, L=45, D=16, causal=causal, **parts)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    inputs = [x if x is None else x.requires_grad_() for x in (q, k, v, *w)]
    present = [x for x in inputs if x is not None]
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device)
    packed = mta_kernels.mta_attention(*inputs, causal=causal, cu_seqlens=cu)
    got = torch.autograd.grad(packed, present, grad)
    pieces = [mta_kernels.mta_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], *inputs[3:], causal=causal)
              for s, e in zip(offsets, offsets[1:])]
    alone = torch.cat(pieces, dim=2)
    want = torch.autograd.grad(alone, present, grad)
    assert (packed - alone).abs().max().item() < 1e-5
    for g, e in zip(got, want):
        assert (g - e).abs().max().item() < 1e-4


def test_packed_documents_do_not_see_each_other(device):
    """Perturbing document n+1 leaves document n's outputs and gradients bit for bit."""
    case = Case(B=1, H=4, L=40, D=16, **FULL)
    q, k, v, *w = make_inputs(case, torch.float32, device)
    cu = torch.tensor([0, 13, 40], dtype=torch.int32, device=device)

    def run(q, k, v):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = mta_kernels.mta_attention(*xs, *w, cu_seqlens=cu)
        (out[:, :, :13] ** 2).sum().backward()
        return out[:, :, :13].detach(), [x.grad[:, :, :13] for x in xs]

    out, grads = run(q, k, v)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 13:] = torch.randn_like(x[:, :, 13:]) * 5
    out2, grads2 = run(q2, k2, v2)
    assert torch.equal(out, out2)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g, g2)


def test_packed_errors(device):
    case = Case(B=1, H=4, L=20, D=16)
    q, k, v, *_ = make_inputs(case, torch.float32, device)
    for bad, err in (([0, 5, 19], ValueError), ([1, 20], ValueError), ([0, 5, 5, 20], ValueError)):
        with pytest.raises(err, match="cu_seqlens"):
            mta_kernels.mta_attention(q, k, v, cu_seqlens=torch.tensor(bad, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="cu_seqlens"):
        mta_kernels.mta_attention(q, k, v, cu_seqlens=torch.tensor([0.0, 20.0], device=device))
    with pytest.raises(ValueError, match="max_seqlen"):
        mta_kernels.mta_attention(q, k, v, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32, device=device),
                                  max_seqlen=10)
    qq, kk, vv, *_ = make_inputs(Case(B=2, H=4, L=20, D=16), torch.float32, device)
    with pytest.raises(ValueError, match="batch 1"):
        mta_kernels.mta_attention(qq, kk, vv, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_step_gpu(dtype):
    """A decode step over a long cache, the paper's layer, every sequence its own length."""
    case = Case(B=4, H=16, L=4096, D=128, pre_conv=(6, 11), pre_mix=16, post_conv=(6, 11), post_mix=16)
    q, k, v, *w = make_inputs(case, dtype, "cuda")
    lens = torch.tensor([4096, 3000, 1025, 17], device="cuda")
    qb = torch.stack([q[b, :, n - 1:n] for b, n in enumerate(lens.tolist())])
    qp = torch.stack([q[b, :, n - 11:n - 1] for b, n in enumerate(lens.tolist())])
    with torch.no_grad():
        got = mta_kernels.mta_attention(qb, k, v, *w, q_prev=qp, seqlens=lens)
    ref = mta_reference.mta_attention(qb, k, v, *w, q_prev=qp, seqlens=lens, compute_dtype=torch.float32)
    low = mta_reference.mta_attention(qb, k, v, *w, q_prev=qp, seqlens=lens, compute_dtype=dtype)
    check_rule("decode", got, ref, low, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("parts", ["full", "talking_heads", "none"])
def test_decode_step_in_a_cuda_graph_gpu(parts):
    """A decode step with lengths on the device, captured once and replayed after the lengths
    and the query change, equals the step run eagerly on the new values; a path that reads the
    lengths on the host refuses to be captured."""
    weights = dict(full=dict(pre_conv=(6, 11), pre_mix=16, post_conv=(6, 11), post_mix=16),
                   talking_heads=dict(pre_mix=16, post_mix=16), none={})[parts]
    case = Case(B=3, H=16, L=2048, D=128, **weights)
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda")
    qb, qp = q[:, :, -1:].clone(), q[:, :, -11:-1].clone()
    lens = torch.tensor([2048, 1500, 300], device="cuda")
    step = lambda: mta_kernels.mta_attention(qb, k, v, *w, q_prev=qp, seqlens=lens)   # noqa: E731
    with torch.no_grad():
        step()                                 # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        lens.copy_(torch.tensor([1999, 2048, 41]))
        qb.copy_(q[:, :, -2:-1])
        graph.replay()
        assert torch.equal(out, step())
        if parts == "full":
            with pytest.raises(RuntimeError, match="seqlens"):
                with torch.cuda.graph(torch.cuda.CUDAGraph()):
                    mta_kernels.mta_attention(qb, k, v, *w, q_prev=qp, seqlens=lens, kernel_options={"path": "chunked"})


def _varlen_stand_in(calls):
    """A varlen_attn of torch >= 2.11's signature, per document through SDPA, recording its calls."""
    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        calls.append(dict(cu=cu_q, max_q=max_q, window_size=window_size, enable_gqa=enable_gqa, scale=scale))
        out = torch.empty_like(q)
        for s, e in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
            out[s:e] = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
        return out
    return varlen_attn


@pytest.mark.parametrize("causal", [True, False])
def test_plain_packed_through_varlen(causal, monkeypatch, request):
    """sdpa_varlen's plumbing (token-first views, int32 offsets, the causal window, GQA, scale)
    against a stand-in varlen_attn; and where it cannot take a call it says so with None."""
    import torch.nn.attention.varlen as varlen
    from mta_kernels.flash import attention, sdpa_varlen
    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", _varlen_stand_in(calls))
    attention._varlen_api.cache_clear()         # read the stand-in, and forget it afterwards
    request.addfinalizer(attention._varlen_api.cache_clear)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 30, 16, generator=g, dtype=torch.float16)
    k, v = (torch.randn(1, 2, 30, 16, generator=g, dtype=torch.float16) for _ in range(2))
    cu = torch.tensor([0, 7, 8, 30])
    out = sdpa_varlen(q, k, v, cu, 22, causal, 0.3)
    assert calls[0]["cu"].dtype == torch.int32 and calls[0]["max_q"] == 22 and calls[0]["enable_gqa"]
    assert calls[0]["window_size"] == ((-1, 0) if causal else (-1, -1)) and calls[0]["scale"] == 0.3
    for s, e in ((0, 7), (7, 8), (8, 30)):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e].float(), k[:, :, s:e].float(), v[:, :, s:e].float(), is_causal=causal, scale=0.3,
            enable_gqa=True)
        assert (out[:, :, s:e].float() - alone).abs().max() < 2e-2
    assert sdpa_varlen(q.float(), k.float(), v.float(), cu, 22, causal, 0.3) is None      # fp32: no flash kernel


@pytest.mark.gpu
@pytest.mark.parametrize("parts", [{}, dict(pre_mix=4, post_mix=4), FULL], ids=["none", "talking_heads", "full"])
def test_packed_gpu(parts):
    """Packed documents in bf16 on the GPU (plain attention through torch's varlen kernel) against
    the reference run on each document alone, output and gradients, under the 2x rule."""
    offsets = [0, 1, 100, 357, 1000, 1200]
    case = Case(B=1, H=8, Hkv=4, L=1200, D=64, **parts)
    q, k, v, *w = make_inputs(case, torch.bfloat16, "cuda")
    inputs = [x.requires_grad_() for x in (q, k, v)]
    grad = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(4))
    cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")

    def alone(dtype):
        pieces = [mta_reference.mta_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], *w, compute_dtype=dtype)
                  for s, e in zip(offsets, offsets[1:])]
        out = torch.cat(pieces, dim=2)
        return [out, *torch.autograd.grad(out, inputs, grad)]
    packed = mta_kernels.mta_attention(*inputs, *w, cu_seqlens=cu)
    got = [packed, *torch.autograd.grad(packed, inputs, grad)]
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, alone(torch.float32), alone(torch.bfloat16)):
        check_rule(f"packed {name}", a, r, lo, torch.bfloat16)
