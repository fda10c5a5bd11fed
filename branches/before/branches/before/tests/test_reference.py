"""Independent checks of the plain-PyTorch reference ``mta_reference.mta_attention``.

The expected values here never come from the reference's own helpers: they come from
SDPA (identity weights), from explicit Python loops over the spec's section-2 formulas,
from numbers worked out by hand, or from the authors' layouts written out directly.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import mta_reference
from mta_reference import (conv_from_official, conv_to_official, identity_conv, identity_mix,
                           mix_from_official_head_kernel, mix_from_official_linear,
                           mix_to_official_head_kernel, mta_attention)

F64 = torch.float64
PADS = ("both", "left", "right")
COMPONENTS = ("pre_conv", "pre_mix", "post_conv", "post_mix")


# ----------------------------------------------------------------------------- helpers

def qkv(B, H, Hkv, L, D, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=F64).to(dtype)
    return q, k, v


def rand_weights(H, cq=2, ck=3, ch=None, dtype=F64, seed=1, which=COMPONENTS):
    """Random non-identity weights for the named components (others None)."""
    g = torch.Generator().manual_seed(seed)
    ch = H if ch is None else ch
    w = {
        "pre_conv": torch.randn(H, cq, ck, generator=g, dtype=F64),
        "pre_mix": torch.randn(H // ch, ch, ch, generator=g, dtype=F64),
        "post_conv": torch.randn(H, cq, ck, generator=g, dtype=F64),
        "post_mix": torch.randn(H // ch, ch, ch, generator=g, dtype=F64),
    }
    return {name: (w[name].to(dtype) if name in which else None) for name in COMPONENTS}


def spec_pl(ck, pad_key):
    """pL from the spec, written out independently."""
    return {"both": (ck - 1) / 2, "left": ck - 1, "right": 0}[pad_key]


def loop_mta(q, k, v, pre_conv=None, pre_mix=None, post_conv=None, post_mix=None,
             causal=True, pad_key="both", scale=None):
    """Spec section 2, index by index, with Python floats and explicit loops."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    Q, K, V = q.tolist(), k.tolist(), v.tolist()

    def fut(i, j):
        return causal and j > i

    def read(X, h, i, j):
        return X[h][i][j] if 0 <= i < L and 0 <= j < L else 0.0

    def conv(X, W, h, i, j):
        _, cq, ck = W.shape
        pl = int(spec_pl(ck, pad_key))
        Wl = W.tolist()
        return sum(Wl[h][a][t] * read(X, h, i + a - (cq - 1), j + t - pl)
                   for a in range(cq) for t in range(ck))

    def mix(X, W):
        G, ch, _ = W.shape
        Wl = W.tolist()
        Y = [[[0.0] * L for _ in range(L)] for _ in range(H)]
        for g in range(G):
            for o in range(ch):
                for i in range(L):
                    for j in range(L):
                        Y[g * ch + o][i][j] = sum(Wl[g][o][c] * X[g * ch + c][i][j] for c in range(ch))
        return Y

    out = [[[[0.0] * D for _ in range(L)] for _ in range(H)] for _ in range(B)]
    for b in range(B):
        S = [[[scale * sum(Q[b][h][i][d] * K[b][h // rep][j][d] for d in range(D))
               for j in range(L)] for i in range(L)] for h in range(H)]
        if pre_conv is not None:
            S0 = [[[0.0 if fut(i, j) else S[h][i][j] for j in range(L)] for i in range(L)] for h in range(H)]
            C = [[[conv(S0, pre_conv, h, i, j) for j in range(L)] for i in range(L)] for h in range(H)]
        else:
            C = S
        M = mix(C, pre_mix) if pre_mix is not None else C
        P = [[[0.0] * L for _ in range(L)] for _ in range(H)]
        for h in range(H):
            for i in range(L):
                allowed = [j for j in range(L) if not fut(i, j)]
                m = max(M[h][i][j] for j in allowed)
                e = {j: math.exp(M[h][i][j] - m) for j in allowed}
                z = sum(e.values())
                for j in allowed:
                    P[h][i][j] = e[j] / z
        if post_conv is not None:
            A1 = [[[0.0 if fut(i, j) else conv(P, post_conv, h, i, j) for j in range(L)]
                   for i in range(L)] for h in range(H)]
        else:
            A1 = P
        A = mix(A1, post_mix) if post_mix is not None else A1
        for h in range(H):
            for i in range(L):
                for d in range(D):
                    out[b][h][i][d] = sum(A[h][i][j] * V[b][h // rep][j][d] for j in range(L))
    return torch.tensor(out, dtype=F64)


def ref64(q, k, v, **kw):
    return mta_attention(q, k, v, compute_dtype=F64, **kw)


# ------------------------------------------------------------ identity weights == SDPA

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("pad_key", PADS)
@pytest.mark.parametrize("cq,ck", [(3, 5), (6, 11), (1, 1), (2, 3)], ids=["3x5", "6x11", "1x1", "2x3"])
def test_identity_weights_equal_sdpa(cq, ck, pad_key, causal):
    """Identity convs and mixes (full and grouped) give plain softmax attention."""
    torch.manual_seed(0)
    B, H, L, D = 2, 4, 7, 5
    q, k, v = qkv(B, H, H, L, D, seed=1)
    out = ref64(q, k, v,
                pre_conv=identity_conv(H, cq, ck, pad_key, dtype=F64),
                pre_mix=identity_mix(H, H, dtype=F64),
                post_conv=identity_conv(H, cq, ck, pad_key, dtype=F64),
                post_mix=identity_mix(H, 2, dtype=F64),
                causal=causal, pad_key=pad_key)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pad_key", ["left", "right"])
def test_identity_even_ck_equal_sdpa(pad_key):
    """Even key sizes are fine with one-sided padding; identity still gives SDPA."""
    torch.manual_seed(0)
    H = 2
    q, k, v = qkv(1, H, H, 6, 4, seed=2)
    w = identity_conv(H, 2, 4, pad_key, dtype=F64)
    out = ref64(q, k, v, pre_conv=w, post_conv=w, pad_key=pad_key)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_no_weights_equal_sdpa_custom_scale(causal):
    """With every part absent and an explicit scale, the reference is SDPA with that scale."""
    torch.manual_seed(0)
    q, k, v = qkv(2, 3, 3, 6, 4, seed=3)
    out = ref64(q, k, v, causal=causal, scale=0.37)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.37)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_identity_weights_fp32_default_compute():
    """Default compute dtype (fp32) on fp32 inputs: identity weights match SDPA closely."""
    torch.manual_seed(0)
    H = 4
    q, k, v = qkv(1, H, H, 9, 8, dtype=torch.float32, seed=4)
    out = mta_attention(q, k, v, pre_conv=identity_conv(H, 3, 5), pre_mix=identity_mix(H, H),
                        post_conv=identity_conv(H, 3, 5), post_mix=identity_mix(H, H))
    assert out.dtype == torch.float32
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


# ------------------------------------------------------------- loops from the spec

LOOP_CASES = [pytest.param(comp, pad, True, id=f"{comp}-{pad}") for comp in COMPONENTS for pad in PADS]
LOOP_CASES += [pytest.param(comp, pad, False, id=f"{comp}-{pad}-noncausal")
               for comp in ("pre_conv", "post_conv") for pad in PADS]
LOOP_CASES += [pytest.param(comp, "both", False, id=f"{comp}-noncausal") for comp in ("pre_mix", "post_mix")]


@pytest.mark.parametrize("component,pad_key,causal", LOOP_CASES)
def test_single_component_matches_loops(component, pad_key, causal):
    """Each component alone, random weights: reference equals the spec written as loops."""
    torch.manual_seed(0)
    H, L, D = 2, 5, 3
    q, k, v = qkv(1, H, H, L, D, seed=5)
    w = rand_weights(H, cq=2, ck=3, which=(component,), seed=6)
    expected = loop_mta(q, k, v, **w, causal=causal, pad_key=pad_key)
    out = ref64(q, k, v, **w, causal=causal, pad_key=pad_key)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("pad_key", PADS)
def test_all_components_matches_loops(pad_key, causal):
    """All four parts at once, different conv sizes, GQA, batch 2, explicit scale."""
    torch.manual_seed(0)
    H, L, D = 4, 4, 2
    q, k, v = qkv(2, H, 2, L, D, seed=7)
    pre = rand_weights(H, cq=3, ck=3, ch=2, seed=8)
    post = rand_weights(H, cq=2, ck=1, ch=4, seed=9)
    kw = dict(pre_conv=pre["pre_conv"], pre_mix=pre["pre_mix"],
              post_conv=post["post_conv"], post_mix=post["post_mix"],
              causal=causal, pad_key=pad_key, scale=0.8)
    torch.testing.assert_close(ref64(q, k, v, **kw), loop_mta(q, k, v, **kw), rtol=0, atol=1e-12)


@pytest.mark.parametrize("L", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("pad_key", PADS)
def test_short_sequences_match_loops(L, pad_key):
    """L = 1 and L smaller than cq and ck (3x5 convs), all four parts, against the loops."""
    torch.manual_seed(0)
    H = 2
    q, k, v = qkv(1, H, H, L, 3, seed=30)
    w = rand_weights(H, cq=3, ck=5, seed=31)
    for causal in (True, False):
        kw = dict(**w, pad_key=pad_key, causal=causal)
        torch.testing.assert_close(ref64(q, k, v, **kw), loop_mta(q, k, v, **kw), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pad_key", ["left", "right"])
def test_even_ck_matches_loops(pad_key):
    """Even ck with one-sided padding, pre and post conv, against the loops."""
    torch.manual_seed(0)
    H = 2
    q, k, v = qkv(1, H, 1, 5, 3, seed=10)
    w = rand_weights(H, cq=2, ck=4, which=("pre_conv", "post_conv"), seed=11)
    kw = dict(**w, pad_key=pad_key)
    torch.testing.assert_close(ref64(q, k, v, **kw), loop_mta(q, k, v, **kw), rtol=0, atol=1e-12)


def test_loop_oracle_agrees_with_sdpa():
    """Sanity check of the loop oracle itself: no weights is SDPA."""
    q, k, v = qkv(1, 2, 2, 4, 3, seed=12)
    for causal in (True, False):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(loop_mta(q, k, v, causal=causal), expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------ numbers worked by hand

def test_pre_conv_first_rows_read_zero_padding():
    """Pre conv reading only 2 rows back: rows 0 and 1 see all-zero logits.

    Row 0 can only attend to key 0 (output v0); row 1 has logits [0, 0] -> uniform ->
    (v0 + v1) / 2. Row 2 reads row 0's logits, masked: C[2, j] = w * S0[0, j] = w*S[0,0]
    for j = 0 and 0 for j = 1, 2.
    """
    torch.manual_seed(0)
    H, L, D = 1, 3, 2
    q, k, v = qkv(1, H, H, L, D, seed=13)
    w = torch.zeros(H, 3, 1, dtype=F64)
    w[0, 0, 0] = 0.7
    out = ref64(q, k, v, pre_conv=w)[0, 0]
    vv = v[0, 0]
    s00 = (q[0, 0, 0] @ k[0, 0, 0]).item() / math.sqrt(D)
    logits = torch.tensor([0.7 * s00, 0.0, 0.0], dtype=F64)
    p = torch.softmax(logits, 0)
    torch.testing.assert_close(out[0], vv[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], (vv[0] + vv[1]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[2], p[0] * vv[0] + p[1] * vv[1] + p[2] * vv[2], rtol=0, atol=1e-12)


def test_post_conv_first_rows_not_renormalized():
    """Post conv reading only 2 rows back: rows 0 and 1 become exactly 0, row 2 is w * v0."""
    torch.manual_seed(0)
    H, L, D = 1, 4, 3
    q, k, v = qkv(1, H, H, L, D, seed=14)
    w = torch.zeros(H, 3, 1, dtype=F64)
    w[0, 0, 0] = 0.5
    out = ref64(q, k, v, post_conv=w)[0, 0]
    assert torch.equal(out[:2], torch.zeros(2, D, dtype=F64))
    torch.testing.assert_close(out[2], 0.5 * v[0, 0, 0], rtol=0, atol=1e-12)


def test_post_conv_rows_need_not_sum_to_one():
    """Half of the current row plus half of the previous: row 0 has mass 0.5, no renormalization."""
    torch.manual_seed(0)
    H, L, D = 1, 4, 3
    q, k, v = qkv(1, H, H, L, D, seed=15)
    w = torch.full((H, 2, 1), 0.5, dtype=F64)
    out = ref64(q, k, v, post_conv=w)[0, 0]
    torch.testing.assert_close(out[0], 0.5 * v[0, 0, 0], rtol=0, atol=1e-12)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0]
    torch.testing.assert_close(out[1:], 0.5 * (sdpa[1:] + sdpa[:-1]), rtol=0, atol=1e-12)


def causal_probs(q, k, b, h, hk):
    """Plain causal softmax probabilities of head h reading kv head hk."""
    L, D = q.shape[2], q.shape[3]
    s = q[b, h] @ k[b, hk].T / math.sqrt(D)
    return torch.softmax(s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")), -1)


def test_negative_post_mix_gives_negative_rows():
    """post_mix [[0, -1], [1, 0]]: head 0 gets minus head 1's probabilities (negative rows)."""
    torch.manual_seed(0)
    q, k, v = qkv(1, 2, 2, 4, 3, seed=16)
    w = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]], dtype=F64)  # out0 = -in1, out1 = in0
    out = ref64(q, k, v, post_mix=w)
    p0, p1 = causal_probs(q, k, 0, 0, 0), causal_probs(q, k, 0, 1, 1)
    # mixing happens on probabilities; each output head still reads its own v head
    torch.testing.assert_close(out[0, 0], -(p1 @ v[0, 0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, 1], p0 @ v[0, 1], rtol=0, atol=1e-12)


def test_pre_conv_right_shift_reads_future_as_zero():
    """pad 'right', ck=2, kernel [0, 1] on the current row: logit (i, j) becomes S0(i, j+1).

    The diagonal then reads the zeroed future, so its logit is exactly 0.
    """
    torch.manual_seed(0)
    H, L, D = 1, 3, 2
    q, k, v = qkv(1, H, H, L, D, seed=17)
    w = torch.tensor([[[0.0, 1.0]]], dtype=F64)
    out = ref64(q, k, v, pre_conv=w, pad_key="right")[0, 0]
    S = q[0, 0] @ k[0, 0].T / math.sqrt(D)
    vv = v[0, 0]
    # row 1: logits [S[1,1], 0]; row 2: [S[2,1], S[2,2], 0]
    p1 = torch.softmax(torch.stack([S[1, 1], torch.zeros((), dtype=F64)]), 0)
    p2 = torch.softmax(torch.stack([S[2, 1], S[2, 2], torch.zeros((), dtype=F64)]), 0)
    torch.testing.assert_close(out[0], vv[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], p1[0] * vv[0] + p1[1] * vv[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[2], p2 @ vv, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- causality

CAUSAL_CASES = [pytest.param((comp,), pad, id=f"{comp}-{pad}") for comp in COMPONENTS for pad in PADS]
CAUSAL_CASES += [pytest.param(COMPONENTS, pad, id=f"all-{pad}") for pad in PADS]


@pytest.mark.parametrize("t", [1, 3, 5])
@pytest.mark.parametrize("which,pad_key", CAUSAL_CASES)
def test_causality(which, pad_key, t):
    """Perturbing q, k, v at positions >= t leaves outputs at positions < t unchanged."""
    torch.manual_seed(0)
    H, L, D = 4, 7, 3
    q, k, v = qkv(2, H, 2, L, D, seed=18)
    w = rand_weights(H, cq=3, ck=5, ch=2, which=which, seed=19)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    gen = torch.Generator().manual_seed(20)
    for x in (q2, k2, v2):
        x[:, :, t:] += 3.0 * torch.randn(x[:, :, t:].shape, generator=gen, dtype=F64)
    a = ref64(q, k, v, **w, pad_key=pad_key)
    b = ref64(q2, k2, v2, **w, pad_key=pad_key)
    torch.testing.assert_close(b[:, :, :t], a[:, :, :t], rtol=0, atol=1e-12)
    assert (b[:, :, t:] - a[:, :, t:]).abs().max() > 1e-3  # the perturbation is visible
    # Control: without the causal mask the same perturbation reaches the early rows.
    a_nc = ref64(q, k, v, **w, pad_key=pad_key, causal=False)
    b_nc = ref64(q2, k2, v2, **w, pad_key=pad_key, causal=False)
    assert (b_nc[:, :, :t] - a_nc[:, :, :t]).abs().max() > 1e-6


@pytest.mark.parametrize("pad_key", ["both", "right"])
def test_post_conv_spill_is_masked(pad_key):
    """A post conv reading the key one to the right spills onto the diagonal; the final mask stops it.

    With weight 1 at t = pL+1 of the current row, A1[i, j] = P[i, j+1]; on j > i it is
    zeroed, so row i gets sum_{j<i} P[i, j+1] v[j] (row 0 gets nothing).
    """
    torch.manual_seed(0)
    H, L, D = 1, 5, 2
    q, k, v = qkv(1, H, H, L, D, seed=21)
    ck = 3
    w = torch.zeros(H, 1, ck, dtype=F64)
    w[0, 0, int(spec_pl(ck, pad_key)) + 1] = 1.0
    out = ref64(q, k, v, post_conv=w, pad_key=pad_key)[0, 0]
    P = causal_probs(q, k, 0, 0, 0)
    vv = v[0, 0]
    expected = torch.zeros(L, D, dtype=F64)
    for i in range(L):
        for j in range(i):
            expected[i] += P[i, j + 1] * vv[j]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # non-causal: no final mask, so the diagonal keeps P[i, i+1] (which is then nonzero)
    out_nc = ref64(q, k, v, post_conv=w, pad_key=pad_key, causal=False)[0, 0]
    S = q[0, 0] @ k[0, 0].T / math.sqrt(D)
    Pn = torch.softmax(S, -1)
    expected_nc = torch.zeros(L, D, dtype=F64)
    for i in range(L):
        for j in range(L - 1):
            expected_nc[i] += Pn[i, j + 1] * vv[j]
    torch.testing.assert_close(out_nc, expected_nc, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- GQA / MQA

@pytest.mark.parametrize("Hkv", [1, 2], ids=["mqa", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gqa_equals_repeated_kv(Hkv, causal):
    """k, v with Hkv < H equal the same call with k, v repeat_interleave'd to H heads."""
    torch.manual_seed(0)
    H = 4
    q, k, v = qkv(2, H, Hkv, 6, 3, seed=22)
    w = rand_weights(H, cq=2, ck=3, ch=2, seed=23)
    rep = H // Hkv
    a = ref64(q, k, v, **w, causal=causal)
    b = ref64(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), **w, causal=causal)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # and not the other layout (repeat instead of repeat_interleave), which differs
    c = ref64(q, k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1), **w, causal=causal)
    if Hkv > 1:
        assert (a - c).abs().max() > 1e-6


# --------------------------------------------------------------------------- converters

def test_conv_from_official_matches_authors_conv2d():
    """Authors' mta_kernel (H,1,cq,ck) applied with conv2d(groups=H) on padded scores."""
    torch.manual_seed(0)
    H, cq, ck, L = 3, 2, 5, 6
    mk = torch.randn(H, 1, cq, ck, dtype=F64)
    x = torch.randn(2, H, L, L, dtype=F64)
    ours = conv_from_official(mk)
    assert ours.shape == (H, cq, ck)
    for pad_key in PADS:
        pl = int(spec_pl(ck, pad_key))
        theirs = F.conv2d(F.pad(x, (pl, ck - 1 - pl, cq - 1, 0)), mk, groups=H)
        torch.testing.assert_close(mta_reference.key_query_conv(x, ours, pad_key), theirs, rtol=0, atol=1e-12)
        # the same thing by the spec's loop formula
        loop = torch.zeros_like(x)
        for b in range(2):
            for h in range(H):
                for i in range(L):
                    for j in range(L):
                        s = 0.0
                        for a in range(cq):
                            for t in range(ck):
                                ii, jj = i + a - (cq - 1), j + t - pl
                                if 0 <= ii < L and 0 <= jj < L:
                                    s += ours[h, a, t].item() * x[b, h, ii, jj].item()
                        loop[b, h, i, j] = s
        torch.testing.assert_close(theirs, loop, rtol=0, atol=1e-12)


def test_pre_conv_pipeline_matches_authors_style():
    """End to end: authors-style masked conv2d pre-softmax == reference with converted kernel."""
    torch.manual_seed(0)
    H, L, D, cq, ck = 2, 6, 3, 3, 3
    q, k, v = qkv(1, H, H, L, D, seed=24)
    mk = torch.randn(H, 1, cq, ck, dtype=F64)
    fut = torch.ones(L, L, dtype=torch.bool).triu(1)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(fut, 0.0)
    s = F.conv2d(F.pad(s, ((ck - 1) // 2, (ck - 1) // 2, cq - 1, 0)), mk, groups=H)
    theirs = torch.softmax(s.masked_fill(fut, float("-inf")), -1) @ v
    ours = ref64(q, k, v, pre_conv=conv_from_official(mk))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_mix_from_official_linear_is_nn_linear_over_heads():
    """wpsm / wposm are nn.Linear(H, H) over the head axis."""
    torch.manual_seed(0)
    H, L = 5, 4
    lin = torch.nn.Linear(H, H, bias=False).double()
    x = torch.randn(2, H, L, L, dtype=F64)
    theirs = lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    w = mix_from_official_linear(lin.weight.detach())
    assert w.shape == (1, H, H)
    torch.testing.assert_close(mta_reference.mix_heads(x, w), theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("G,ch", [(1, 4), (2, 2), (3, 2)], ids=["G1", "G2", "G3"])
def test_mix_from_official_head_kernel_in_out_order(G, ch):
    """head_kernel[g, in, out]: out[g*ch+o] = sum_c head_kernel[g, c, o] * in[g*ch+c]."""
    torch.manual_seed(0)
    H, L = G * ch, 3
    hk = torch.randn(G, ch, ch, dtype=F64)
    x = torch.randn(2, H, L, L, dtype=F64)
    expected = torch.zeros_like(x)
    for g in range(G):
        for o in range(ch):
            for c in range(ch):
                expected[:, g * ch + o] += hk[g, c, o] * x[:, g * ch + c]
    got = mta_reference.mix_heads(x, mix_from_official_head_kernel(hk))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # the untransposed kernel is a different map (the test can tell the two apart)
    assert (mta_reference.mix_heads(x, hk) - expected).abs().max() > 1e-6


def test_converters_round_trip():
    """to_official(from_official(x)) is x, for convs and head kernels; shapes as in the spec."""
    torch.manual_seed(0)
    mk = torch.randn(4, 1, 6, 11)
    assert conv_from_official(mk).shape == (4, 6, 11)
    assert torch.equal(conv_to_official(conv_from_official(mk)), mk)
    assert torch.equal(conv_from_official(mk), mk[:, 0])
    hk = torch.randn(2, 3, 3)
    assert torch.equal(mix_to_official_head_kernel(mix_from_official_head_kernel(hk)), hk)
    assert torch.equal(mix_from_official_head_kernel(hk)[1, 0, 2], hk[1, 2, 0])
    lin = torch.randn(5, 5)
    assert torch.equal(mix_from_official_linear(lin)[0], lin)


@pytest.mark.parametrize("fn,bad", [
    pytest.param(conv_from_official, torch.zeros(4, 2, 3, 3), id="conv-channels"),
    pytest.param(conv_from_official, torch.zeros(4, 3, 3), id="conv-rank"),
    pytest.param(mix_from_official_linear, torch.zeros(4, 5), id="linear-nonsquare"),
    pytest.param(mix_from_official_head_kernel, torch.zeros(2, 3, 4), id="head-nonsquare"),
])
def test_converters_reject_bad_shapes(fn, bad):
    """Converters refuse layouts that are not the authors'."""
    with pytest.raises(ValueError):
        fn(bad)


# ---------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("Hkv", [2, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("causal,pad_key", [(True, "both"), (False, "both"), (True, "left"), (False, "right")],
                         ids=["causal-both", "noncausal-both", "causal-left", "noncausal-right"])
def test_gradcheck(causal, pad_key, Hkv):
    """fp64 gradcheck through the reference for q, k, v and all four weights."""
    torch.manual_seed(0)
    H, L, D = 2, 5, 3
    q, k, v = qkv(1, H, Hkv, L, D, seed=25)
    w = rand_weights(H, cq=2, ck=3, seed=26)
    for name in w:
        w[name] = 0.5 * w[name]
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v, *w.values())]

    def f(q, k, v, pre_conv, pre_mix, post_conv, post_mix):
        return mta_attention(q, k, v, pre_conv, pre_mix, post_conv, post_mix,
                             causal=causal, pad_key=pad_key, compute_dtype=F64)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    # every input actually receives a nonzero gradient
    f(*inputs).square().sum().backward()
    for x in inputs:
        assert x.grad is not None and x.grad.abs().max() > 0


# ------------------------------------------------------------------------ compute dtype

def test_compute_dtype_fp16_is_low_precision_baseline():
    """compute_dtype=fp16 on fp16 inputs is close to the fp64 result but not identical."""
    torch.manual_seed(0)
    H = 4
    q, k, v = qkv(2, H, H, 16, 8, dtype=torch.float16, seed=27)
    w = {n: (0.5 * x).float() for n, x in rand_weights(H, cq=3, ck=3, ch=2, seed=28).items()}
    for n in ("pre_conv", "post_conv"):
        w[n][:, -1, 1] += 1.0  # near identity, keeps values O(1)
    for n in ("pre_mix", "post_mix"):
        w[n] += torch.eye(2)
    low = mta_attention(q, k, v, **w, compute_dtype=torch.float16)
    ref = mta_attention(q.double(), k.double(), v.double(), **w, compute_dtype=F64)
    assert low.dtype == torch.float16
    assert torch.isfinite(low).all()
    diff = (low.double() - ref).abs().max().item()
    assert diff < 5e-2 * max(ref.abs().max().item(), 1.0)
    assert diff > 0
    # fp32 compute on the same fp16 inputs is closer to fp64 than fp16 compute is
    mid = mta_attention(q, k, v, **w, compute_dtype=torch.float32)
    assert (mid.double() - ref).abs().max().item() <= diff


def test_output_dtype_follows_q():
    """The output is returned in q's dtype whatever the compute dtype."""
    torch.manual_seed(0)
    q, k, v = qkv(1, 2, 2, 4, 3, dtype=torch.bfloat16, seed=29)
    assert mta_attention(q, k, v).dtype == torch.bfloat16
    assert mta_attention(q, k, v, compute_dtype=F64).dtype == torch.bfloat16
