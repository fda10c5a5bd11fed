"""The reference on a query block at the end of a sequence (spec section 8: q_prev, seqlens)
and on packed documents (section 9: cu_seqlens).

Expected values come from the reference's dense path on whole sequences (itself checked
against loops and SDPA in test_reference.py), or from SDPA with a block-diagonal mask.
"""
import pytest
import torch
import torch.nn.functional as F

import mta_reference
from cases import Case, make_inputs
from mta_reference import conv_row_halo, identity_conv, identity_mix, mta_attention
from mta_reference.mta import forward_intermediates

F64 = torch.float64
PADS = ("both", "left", "right")
NAN = float("nan")

# Conv sizes and mixes; halos 3, 5, 2, 2, 0 and 0 (1-row convs).
PARTS = [
    dict(pre_conv=(3, 5), pre_mix=2, post_conv=(2, 3), post_mix=4),
    dict(pre_conv=(4, 3), post_conv=(3, 1)),
    dict(pre_conv=(3, 3), pre_mix=4),
    dict(post_conv=(3, 5), post_mix=2),
    dict(pre_mix=4, post_mix=2),
    dict(pre_conv=(1, 3), post_conv=(1, 5), post_mix=4),
]
FULL = PARTS[0]


def parts_id(parts):
    return "-".join(f"{n}{'x'.join(map(str, s)) if isinstance(s, tuple) else s}" for n, s in parts.items())


def inputs(case, seed=0, requires_grad=False):
    """q, k, v in fp64 and the four weights (None where absent) as a list."""
    q, k, v, *w = make_inputs(case, F64, "cpu", seed=seed)
    w = [None if x is None else x.double() for x in w]
    if requires_grad:
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        w = [None if x is None else x.requires_grad_(True) for x in w]
    return q, k, v, w


def ref(case, q, k, v, w, **kw):
    return mta_attention(q, k, v, *w, causal=case.causal, pad_key=case.pad_key, compute_dtype=F64, **kw)


def prev_rows(q, start, P, fill=NAN):
    """q_prev for a block starting at position ``start`` of the full q (B, H, L, D): the P rows
    before it; those at negative positions (which do not exist) are filled with ``fill``."""
    B, H, _, D = q.shape
    have = q[:, :, max(0, start - P):start]
    return torch.cat([q.new_full((B, H, P - have.shape[2], D), fill), have], dim=2)


def halo_of(w):
    return conv_row_halo(w[0], w[2])


def grads(tensors):
    return [None if x is None else x.grad.clone() for x in tensors]


def grad_or_zeros(x):
    return torch.zeros_like(x) if x.grad is None else x.grad


def assert_grads_close(got, expected, atol=1e-11):
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, rtol=0, atol=atol)


# ------------------------------------------------------------------------- conv_row_halo

def test_conv_row_halo():
    """(cq-1) + (cq'-1) over the convs present, 0 without."""
    assert conv_row_halo(None, None) == 0
    assert conv_row_halo(torch.zeros(4, 3, 5), None) == 2
    assert conv_row_halo(None, torch.zeros(4, 6, 11)) == 5
    assert conv_row_halo(torch.zeros(4, 3, 5), torch.zeros(4, 2, 3)) == 3
    assert conv_row_halo(torch.zeros(4, 1, 5), torch.zeros(4, 1, 1)) == 0


# ------------------------------------------------------------------ block at the end

BLOCK_CASES = [pytest.param(Case(B=2, H=4, Hkv=2, L=7, D=3, causal=causal, pad_key=pad, **parts),
                            id=f"{parts_id(parts)}-{pad}-{'causal' if causal else 'noncausal'}")
               for parts in PARTS for pad in PADS for causal in (True, False)]


@pytest.mark.parametrize("Lq", [1, 3, 7])
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_equals_last_rows(case, Lq):
    """The last Lq rows with q_prev = the true previous queries equal the full call's rows.

    L = 7 and halos up to 5: with Lq = 3 or 7 some q_prev rows sit at negative positions
    (they hold NaN here: they must never be read)."""
    q, k, v, w = inputs(case)
    full = ref(case, q, k, v, w)
    start = case.L - Lq
    P = halo_of(w)
    out = ref(case, q[:, :, start:], k, v, w, q_prev=prev_rows(q, start, P))
    assert out.shape == (case.B, case.H, Lq, case.D)
    torch.testing.assert_close(out, full[:, :, start:], rtol=0, atol=1e-12)
    if P == 0:  # no row above the block is read: q_prev may be left out
        torch.testing.assert_close(ref(case, q[:, :, start:], k, v, w), full[:, :, start:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_full_length_block_is_the_dense_call(causal):
    """Lq == Lk: without q_prev it is the dense forward, bit for bit; with q_prev (all rows
    at negative positions, NaN) the same bits."""
    case = Case(B=2, H=4, Hkv=2, L=6, D=3, causal=causal, **FULL)
    q, k, v, w = inputs(case)
    dense = ref(case, q, k, v, w)
    t = forward_intermediates(q, k, v, *w, causal=causal, compute_dtype=F64)
    assert torch.equal(dense, torch.matmul(t.a, t.v))
    with_prev = ref(case, q, k, v, w, q_prev=q.new_full((2, 4, halo_of(w) + 2, 3), NAN))
    assert torch.equal(with_prev, dense)


@pytest.mark.parametrize("Lq", [1, 4])
def test_q_prev_extra_earlier_rows_ignored(Lq):
    """q_prev with extra rows before the P needed gives the same bits as exactly P rows."""
    case = Case(B=2, H=4, Hkv=2, L=12, D=3, **FULL)
    q, k, v, w = inputs(case)
    start, P = case.L - Lq, halo_of(w)
    exact = ref(case, q[:, :, start:], k, v, w, q_prev=q[:, :, start - P:start])
    longer = ref(case, q[:, :, start:], k, v, w, q_prev=q[:, :, 1:start])
    garbage = torch.cat([torch.full_like(q[:, :, :4], 1e30), q[:, :, start - P:start]], dim=2)
    assert torch.equal(longer, exact)
    assert torch.equal(ref(case, q[:, :, start:], k, v, w, q_prev=garbage), exact)


@pytest.mark.parametrize("parts", PARTS, ids=parts_id)
def test_wrong_q_prev_matters_only_with_conv_rows(parts):
    """Changing q_prev, even only its oldest needed row, changes the block when the convs
    read rows above it; without that (no convs, or 1-row convs) q_prev is ignored."""
    case = Case(B=1, H=4, L=10, D=3, **parts)
    q, k, v, w = inputs(case)
    Lq, P = 2, halo_of(w)
    start = case.L - Lq
    prev = q[:, :, start - 5:start]  # 5 rows: enough for every halo here
    right = ref(case, q[:, :, start:], k, v, w, q_prev=prev)
    zeros = ref(case, q[:, :, start:], k, v, w, q_prev=torch.zeros_like(prev))  # a K/V-only cache
    older = prev.clone()
    older[:, :, :5 - P] += 1.0
    if P > 0:
        oldest = prev.clone()
        oldest[:, :, 5 - P] += 1.0
        assert (zeros - right).abs().max() > 1e-6
        assert (ref(case, q[:, :, start:], k, v, w, q_prev=oldest) - right).abs().max() > 1e-6
    else:
        assert torch.equal(zeros, right)
        assert torch.equal(ref(case, q[:, :, start:], k, v, w), right)
    assert torch.equal(ref(case, q[:, :, start:], k, v, w, q_prev=older), right)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("Lq", [1, 3])
def test_block_gradients_equal_full_gradients(Lq, causal):
    """Autograd through the block: with the upstream gradient zero outside the block's rows,
    the full call's gradients are the block's (dq split between q and q_prev; older rows 0)."""
    case = Case(B=2, H=4, Hkv=2, L=8, D=3, causal=causal, **FULL)
    q, k, v, w = inputs(case, requires_grad=True)
    start, P = case.L - Lq, halo_of(w)
    dout = torch.randn(2, 4, Lq, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    full = ref(case, q, k, v, w)
    (full[:, :, start:] * dout).sum().backward()
    g_full = grads([q, k, v, *w])
    for x in (q, k, v, *w):
        x.grad = None
    qb = q[:, :, start:].detach().clone().requires_grad_(True)
    qp = q[:, :, start - P:start].detach().clone().requires_grad_(True)
    (ref(case, qb, k, v, w, q_prev=qp) * dout).sum().backward()
    assert_grads_close([qb.grad, qp.grad, *grads([k, v, *w])],
                       [g_full[0][:, :, start:], g_full[0][:, :, start - P:start], *g_full[1:]])
    assert torch.equal(g_full[0][:, :, :start - P], torch.zeros_like(g_full[0][:, :, :start - P]))


def test_block_gradcheck():
    """fp64 gradcheck of a block with q_prev, GQA, every part present."""
    case = Case(B=1, H=2, Hkv=1, L=5, D=2, pre_conv=(2, 3), pre_mix=2, post_conv=(2, 3), post_mix=2)
    q, k, v, w = inputs(case)
    leaves = [x.clone().requires_grad_(True) for x in (q[:, :, 3:], q[:, :, 1:3], k, v, *w)]

    def f(qb, qp, k, v, *w):
        return mta_attention(qb, k, v, *w, q_prev=qp, compute_dtype=F64)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("pad_key", PADS)
def test_decoding_token_by_token_reproduces_full_forward(pad_key):
    """Lq = 1 at every position with the right q_prev reproduces the full forward there,
    both with k, v cut at the position and with a cache buffer, NaN beyond, and seqlens."""
    case = Case(B=2, H=4, Hkv=2, L=9, D=3, pad_key=pad_key, **FULL)
    q, k, v, w = inputs(case)
    P = halo_of(w)
    full = ref(case, q, k, v, w)
    for i in range(case.L):
        step = ref(case, q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], w, q_prev=prev_rows(q, i, P))
        torch.testing.assert_close(step[:, :, 0], full[:, :, i], rtol=0, atol=1e-12)
        kc, vc = k.clone(), v.clone()
        kc[:, :, i + 1:], vc[:, :, i + 1:] = NAN, NAN
        cached = ref(case, q[:, :, i:i + 1], kc, vc, w, q_prev=prev_rows(q, i, P),
                     seqlens=torch.full((2,), i + 1, dtype=torch.int32))
        torch.testing.assert_close(cached, step, rtol=0, atol=1e-12)


def test_chunked_prefill_reproduces_full_forward():
    """Chunks of 3, 1 and 5 rows, each with the rows before it as q_prev, concatenate to
    the full forward."""
    case = Case(B=1, H=4, L=9, D=3, **FULL)
    q, k, v, w = inputs(case)
    P = halo_of(w)
    chunks, start = [], 0
    for n in (3, 1, 5):
        end = start + n
        q_prev = prev_rows(q, start, P)
        chunks.append(ref(case, q[:, :, start:end], k[:, :, :end], v[:, :, :end], w, q_prev=q_prev))
        start = end
    torch.testing.assert_close(torch.cat(chunks, dim=2), ref(case, q, k, v, w), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- seqlens

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("parts", [FULL, PARTS[4]], ids=parts_id)
def test_seqlens_ragged_batch_equals_each_sequence_alone(parts, causal, dtype):
    """seqlens [8, 5, 2] with Lq = 2: each sequence equals its own full call's last rows and
    its call alone on k, v cut at its length (output and gradients); NaN and 1e30 beyond
    the lengths never reach the output, and their gradients are exactly 0."""
    case = Case(B=3, H=4, Hkv=2, L=8, D=3, causal=causal, **parts)
    qf, k, v, w = inputs(case)
    lens, Lq = [8, 5, 2], 2
    P = halo_of(w)
    with torch.no_grad():
        for b, n in enumerate(lens):
            k[b, :, n:], v[b, :, n:] = NAN, 1e30
    q = torch.stack([qf[b, :, n - Lq:n] for b, n in enumerate(lens)]).requires_grad_(True)
    q_prev = torch.stack([prev_rows(qf[b:b + 1, :, :n], n - Lq, P + 1)[0] for b, n in enumerate(lens)])
    q_prev.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    w = [None if x is None else x.requires_grad_(True) for x in w]
    dout = torch.randn(3, 4, Lq, 3, generator=torch.Generator().manual_seed(3), dtype=F64)

    out = ref(case, q, k, v, w, q_prev=q_prev, seqlens=torch.tensor(lens, dtype=dtype))
    assert torch.isfinite(out).all()
    (out * dout).sum().backward()
    got = grads([q, k, v, *w])
    got.insert(1, grad_or_zeros(q_prev))  # q_prev is read only through the convs
    for b, n in enumerate(lens):
        whole = ref(case, qf[b:b + 1, :, :n], k[b:b + 1, :, :n].detach(), v[b:b + 1, :, :n].detach(),
                    [None if x is None else x.detach() for x in w])
        torch.testing.assert_close(out[b:b + 1], whole[:, :, n - Lq:], rtol=0, atol=1e-12)
        assert torch.equal(got[2][b, :, n:], torch.zeros_like(got[2][b, :, n:]))
        assert torch.equal(got[3][b, :, n:], torch.zeros_like(got[3][b, :, n:]))

    for x in (k, v, *w):
        if x is not None:
            x.grad = None
    alone = []
    leaves = []
    for b, n in enumerate(lens):
        qb, pb = q[b:b + 1].detach().requires_grad_(True), q_prev[b:b + 1].detach().requires_grad_(True)
        kb, vb = k[b:b + 1, :, :n].detach().requires_grad_(True), v[b:b + 1, :, :n].detach().requires_grad_(True)
        ob = ref(case, qb, kb, vb, w, q_prev=pb)
        (ob * dout[b:b + 1]).sum().backward()
        alone.append(ob)
        leaves.append((qb, pb, kb, vb))
    torch.testing.assert_close(out, torch.cat(alone), rtol=0, atol=0)
    for b, (qb, pb, kb, vb) in enumerate(leaves):
        n = lens[b]
        assert_grads_close([got[0][b:b + 1], got[1][b:b + 1], got[2][b:b + 1, :, :n], got[3][b:b + 1, :, :n]],
                           [qb.grad, grad_or_zeros(pb), kb.grad, vb.grad], atol=0)
    assert_grads_close(got[4:], grads(w))  # summed over the sequences


def test_seqlens_full_length_is_the_dense_call():
    """seqlens all equal to Lk = Lq: the dense call."""
    case = Case(B=2, H=4, L=5, D=3, **FULL)
    q, k, v, w = inputs(case)
    out = ref(case, q, k, v, w, seqlens=torch.tensor([5, 5]))
    torch.testing.assert_close(out, ref(case, q, k, v, w), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- cu_seqlens

DOCS = [1, 2, 6, 3]  # one token; shorter than the 3x5 conv; several documents
PACKED_CASES = [pytest.param(Case(B=1, H=4, Hkv=hkv, L=sum(DOCS), D=3, causal=causal, pad_key=pad, **parts),
                             id=f"{parts_id(parts)}-kv{hkv}-{pad}-{'causal' if causal else 'noncausal'}")
                for parts in (FULL, PARTS[1], PARTS[4]) for hkv in (4, 2) for pad in PADS
                for causal in (True, False)
                if hkv == 2 or parts is FULL]


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype)


@pytest.mark.parametrize("case", PACKED_CASES)
def test_packed_equals_per_document_calls(case):
    """Output and every gradient of a packed call equal those of the documents run one by
    one (weight gradients summed over the documents)."""
    q, k, v, w = inputs(case, requires_grad=True)
    cu = offsets(DOCS)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = ref(case, q, k, v, w, cu_seqlens=cu, max_seqlen=max(DOCS))
    (out * dout).sum().backward()
    got = grads([q, k, v, *w])
    for x in (q, k, v, *w):
        if x is not None:
            x.grad = None
    bounds = list(zip(cu.tolist(), cu.tolist()[1:]))
    docs = [ref(case, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], w) for s, e in bounds]
    torch.testing.assert_close(out, torch.cat(docs, dim=2), rtol=0, atol=0)
    sum((d * dout[:, :, s:e]).sum() for d, (s, e) in zip(docs, bounds)).backward()
    assert_grads_close(got, grads([q, k, v, *w]))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_packed_identity_weights_equal_block_diagonal_sdpa(causal):
    """Identity weights: SDPA with a block-diagonal (and causal) mask, an independent oracle."""
    H, T, D = 4, sum(DOCS), 3
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, H, T, D, generator=g, dtype=F64) for _ in range(3))
    doc = torch.repeat_interleave(torch.arange(len(DOCS)), torch.tensor(DOCS))
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out = mta_attention(q, k, v, identity_conv(H, 3, 5, dtype=F64), identity_mix(H, 2, dtype=F64),
                        identity_conv(H, 2, 3, dtype=F64), identity_mix(H, 4, dtype=F64),
                        causal=causal, compute_dtype=F64, cu_seqlens=offsets(DOCS, torch.int64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("pad_key", PADS)
def test_packed_documents_are_independent(pad_key, causal):
    """Perturbing document n+1's q, k, v leaves every other document's outputs and q, k, v
    gradients bit for bit unchanged, at each boundary."""
    case = Case(B=1, H=4, Hkv=2, L=sum(DOCS), D=3, causal=causal, pad_key=pad_key, **FULL)
    q, k, v, w = inputs(case)
    cu = offsets(DOCS)
    bounds = list(zip(cu.tolist(), cu.tolist()[1:]))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=F64)

    def run(q, k, v):
        q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = ref(case, q, k, v, w, cu_seqlens=cu)
        (out * dout).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    base = run(q, k, v)
    gen = torch.Generator().manual_seed(8)
    for n in range(1, len(DOCS)):
        s, e = bounds[n]
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, s:e] += 3.0 * torch.randn(x[:, :, s:e].shape, generator=gen, dtype=F64)
        other = run(q2, k2, v2)
        for got, expected in zip(other, base):
            assert torch.equal(got[:, :, :s], expected[:, :, :s])
            assert torch.equal(got[:, :, e:], expected[:, :, e:])
        assert (other[0][:, :, s:e] - base[0][:, :, s:e]).abs().max() > 1e-6


def test_max_seqlen_changes_nothing():
    """max_seqlen equal to or above the longest document gives the same bits as none."""
    case = Case(B=1, H=4, L=sum(DOCS), D=3, **FULL)
    q, k, v, w = inputs(case)
    cu = offsets(DOCS)
    out = ref(case, q, k, v, w, cu_seqlens=cu)
    assert torch.equal(ref(case, q, k, v, w, cu_seqlens=cu, max_seqlen=max(DOCS)), out)
    assert torch.equal(ref(case, q, k, v, w, cu_seqlens=cu, max_seqlen=100), out)


# --------------------------------------------------------------------------- validation

B, H, HKV, LQ, LK, D = 2, 4, 2, 3, 6, 4


def block_args():
    """A valid block call: convs with halo 3, q_prev of 3 rows, as a kwargs dict."""
    g = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(B, H, LQ, D, generator=g), k=torch.randn(B, HKV, LK, D, generator=g),
                v=torch.randn(B, HKV, LK, D, generator=g), pre_conv=torch.randn(H, 3, 3, generator=g),
                post_conv=torch.randn(H, 2, 5, generator=g), q_prev=torch.randn(B, H, 3, D, generator=g))


def packed_args():
    """A valid packed call: documents [2, 4], all four parts."""
    g = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(1, H, 6, D, generator=g), k=torch.randn(1, HKV, 6, D, generator=g),
                v=torch.randn(1, HKV, 6, D, generator=g), pre_conv=torch.randn(H, 3, 3, generator=g),
                pre_mix=torch.randn(1, H, H, generator=g), post_conv=torch.randn(H, 2, 5, generator=g),
                post_mix=torch.randn(2, 2, 2, generator=g), cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32))


def call(base, **changes):
    args = base()
    args.update(changes)
    for name in [n for n, x in args.items() if x is None]:
        del args[name]
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return mta_attention(q, k, v, **args)


def test_base_block_and_packed_args_are_valid():
    """The unmodified arguments run; so do q_prev of 0 rows without convs and CPU seqlens."""
    assert call(block_args).shape == (B, H, LQ, D)
    assert call(packed_args).shape == (1, H, 6, D)
    assert call(block_args, pre_conv=None, post_conv=None, q_prev=torch.randn(B, H, 0, D)).shape == (B, H, LQ, D)
    assert call(block_args, seqlens=torch.tensor([6, 3])).shape == (B, H, LQ, D)


I32 = torch.int32
CASES = [
    # q_prev
    ("q_prev-missing", block_args, dict(q_prev=None), ValueError, "q_prev"),
    ("q_prev-too-short", block_args, dict(q_prev=torch.randn(B, H, 2, D)), ValueError, "q_prev"),
    ("q_prev-too-short-post-only", block_args, dict(pre_conv=None, q_prev=torch.randn(B, H, 0, D)),
     ValueError, "q_prev"),
    ("q_prev-list", block_args, dict(q_prev=[[0.0]]), TypeError, "q_prev"),
    ("q_prev-rank3", block_args, dict(q_prev=torch.randn(H, 3, D)), ValueError, "q_prev"),
    ("q_prev-batch", block_args, dict(q_prev=torch.randn(B + 1, H, 3, D)), ValueError, "q_prev"),
    ("q_prev-heads", block_args, dict(q_prev=torch.randn(B, HKV, 3, D)), ValueError, "q_prev"),
    ("q_prev-head-dim", block_args, dict(q_prev=torch.randn(B, H, 3, D + 1)), ValueError, "q_prev"),
    ("q_prev-dtype", block_args, dict(q_prev=torch.randn(B, H, 3, D, dtype=F64)), TypeError, "q_prev"),
    ("q_prev-meta-device", block_args, dict(q_prev=torch.randn(B, H, 3, D, device="meta")), ValueError, "q_prev"),
    # q longer than k
    ("q-longer-than-k", block_args, dict(q=torch.randn(B, H, LK + 1, D)), ValueError, r"\bk\b.*length"),
    # seqlens
    ("seqlens-list", block_args, dict(seqlens=[6, 6]), TypeError, "seqlens"),
    ("seqlens-float", block_args, dict(seqlens=torch.tensor([6.0, 6.0])), TypeError, "seqlens"),
    ("seqlens-bool", block_args, dict(seqlens=torch.tensor([True, True])), TypeError, "seqlens"),
    ("seqlens-2d", block_args, dict(seqlens=torch.tensor([[6, 6]])), ValueError, "seqlens"),
    ("seqlens-0d", block_args, dict(seqlens=torch.tensor(6)), ValueError, "seqlens"),
    ("seqlens-length", block_args, dict(seqlens=torch.tensor([6, 6, 6])), ValueError, "seqlens"),
    ("seqlens-zero", block_args, dict(seqlens=torch.tensor([6, 0])), ValueError, "seqlens"),
    ("seqlens-negative", block_args, dict(seqlens=torch.tensor([-1, 6])), ValueError, "seqlens"),
    ("seqlens-above-Lk", block_args, dict(seqlens=torch.tensor([6, LK + 1], dtype=I32)), ValueError, "seqlens"),
    ("seqlens-below-Lq", block_args, dict(seqlens=torch.tensor([6, LQ - 1], dtype=I32)), ValueError, "seqlens"),
    ("seqlens-meta-device", block_args, dict(seqlens=torch.tensor([6, 6], device="meta")), ValueError, "seqlens"),
    # cu_seqlens
    ("cu_seqlens-list", packed_args, dict(cu_seqlens=[0, 2, 6]), TypeError, "cu_seqlens"),
    ("cu_seqlens-float", packed_args, dict(cu_seqlens=torch.tensor([0.0, 2.0, 6.0])), TypeError, "cu_seqlens"),
    ("cu_seqlens-2d", packed_args, dict(cu_seqlens=torch.tensor([[0, 2, 6]], dtype=I32)), ValueError,
     "cu_seqlens"),
    ("cu_seqlens-one-offset", packed_args, dict(cu_seqlens=torch.tensor([6], dtype=I32)), ValueError,
     "cu_seqlens"),
    ("cu_seqlens-first-not-0", packed_args, dict(cu_seqlens=torch.tensor([1, 2, 6], dtype=I32)), ValueError,
     "cu_seqlens"),
    ("cu_seqlens-last-not-T", packed_args, dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=I32)), ValueError,
     "cu_seqlens"),
    ("cu_seqlens-past-T", packed_args, dict(cu_seqlens=torch.tensor([0, 2, 7], dtype=I32)), ValueError,
     "cu_seqlens"),
    ("cu_seqlens-empty-document", packed_args, dict(cu_seqlens=torch.tensor([0, 2, 2, 6], dtype=I32)),
     ValueError, "cu_seqlens"),
    ("cu_seqlens-decreasing", packed_args, dict(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=I32)), ValueError,
     "cu_seqlens"),
    ("cu_seqlens-meta-device", packed_args, dict(cu_seqlens=torch.tensor([0, 2, 6], device="meta")), ValueError,
     "cu_seqlens"),
    ("cu_seqlens-batch-2", packed_args, dict(q=torch.randn(2, H, 6, D), k=torch.randn(2, HKV, 6, D),
                                             v=torch.randn(2, HKV, 6, D)), ValueError, "cu_seqlens"),
    ("cu_seqlens-q-shorter-than-k", packed_args, dict(q=torch.randn(1, H, 4, D)), ValueError, "cu_seqlens"),
    ("cu_seqlens-with-q_prev", packed_args, dict(q_prev=torch.randn(1, H, 3, D)), ValueError, "cu_seqlens"),
    ("cu_seqlens-with-seqlens", packed_args, dict(seqlens=torch.tensor([6])), ValueError, "cu_seqlens"),
    # max_seqlen
    ("max_seqlen-too-small", packed_args, dict(max_seqlen=3), ValueError, "max_seqlen"),
    ("max_seqlen-float", packed_args, dict(max_seqlen=4.0), TypeError, "max_seqlen"),
    ("max_seqlen-bool", packed_args, dict(max_seqlen=True), TypeError, "max_seqlen"),
    ("max_seqlen-str", packed_args, dict(max_seqlen="4"), TypeError, "max_seqlen"),
    ("max_seqlen-without-cu_seqlens", packed_args, dict(cu_seqlens=None, max_seqlen=6), ValueError, "max_seqlen"),
]


@pytest.mark.parametrize("base,changes,exc,match", [pytest.param(b, c, e, m, id=i) for i, b, c, e, m in CASES])
def test_bad_block_or_packed_input(base, changes, exc, match):
    """Each bad argument raises the documented exception, and the message names it."""
    with pytest.raises(exc, match=match):
        call(base, **changes)


def test_hand_written_backward_refuses_blocks_and_packing():
    """mta_attention_backward covers whole sequences only: it takes no block or packing
    argument, and a q shorter than k is refused."""
    args = block_args()
    q, k, v = args["q"], args["k"], args["v"]
    dout = torch.randn_like(q)
    for name, value in (("q_prev", args["q_prev"]), ("seqlens", torch.tensor([6, 6])),
                        ("cu_seqlens", torch.tensor([0, 6])), ("max_seqlen", 6)):
        with pytest.raises(TypeError, match=name):
            mta_reference.mta_attention_backward(dout, q, k, v, **{name: value})
    with pytest.raises(ValueError, match=r"\bk\b.*length"):
        mta_reference.mta_attention_backward(dout, q, k, v)
