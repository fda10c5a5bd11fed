"""The slab kernels of the row-chunked paths on their own: the row kernels (softmax, head
mixes and their backward, talking heads' backward), the key-query conv, its gradients and
band, and the pre conv as a matmul, each against PyTorch or the reference (mostly fp64)."""
import pytest
import torch

import mta_reference
from mta_kernels import configs
from mta_kernels.mta import conv as slab_conv
from mta_kernels.mta.conv import _unroll, band_first_column
from mta_kernels.mta.pre_conv import conv_keys, pre_conv_matmul
from mta_kernels.slabs.rows import (mix_backward_rows, mix_rows, mix_softmax_rows, softmax_rows_,
                                    talking_heads_backward_rows)
from mta_reference import backward as ref_bwd
from mta_reference.backward import mix_heads_backward
from mta_reference.mta import key_query_conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, zero_above", [((1, 2, 5, 37), None), ((2, 3, 7, 40), 3), ((1, 2, 9, 3000), 0),
                                               ((1, 1, 4, 2049), 2100), ((1, 2, 6, 16), 1)])
def test_slab_softmax_matches_torch(shape, zero_above, dtype, device):
    """The slab softmax kernel against torch.softmax of the masked slab, in place on a
    strided view (a row slice of a larger slab), with its log-sum-exp: masked entries
    (col - row > zero_above) come out exactly zero whatever they held; rows longer than one
    2048-column block; a mask beyond the last column. On the GPU too (fp64 included, which
    the fp64 gradchecks take through the chunked paths)."""
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


@pytest.mark.parametrize("shape, groups, zero_above, in_place", [
    ((1, 16, 5, 1100), 1, None, False), ((1, 16, 5, 1100), 1, 7, True), ((2, 6, 4, 37), 3, None, True),
    ((2, 6, 4, 37), 3, 0, False), ((1, 4, 3, 20), 1, 7, False), ((1, 4, 3, 20), 1, 0, True)])
def test_mix_softmax_rows_matches_torch(shape, groups, zero_above, in_place, device):
    """The fused pre-mix and softmax kernel against mix_heads then torch.softmax of the masked
    slab (fp64): all 16 heads in one group with rows longer than one key block, three groups of
    two heads at B=2, a strided view as input; in place or into a new tensor; the log-sum-exp;
    masked entries exactly zero whatever the input held there. On the GPU too."""
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
@pytest.mark.parametrize("zero_above, out_dtype", [(None, torch.float64), (0, torch.float16), (7, torch.float64)],
                         ids=["all-fp64", "zero_above0-fp16", "zero_above7-fp64"])
def test_mix_softmax_rows_with_the_post_mix(shape, groups, zero_above, out_dtype, device):
    """The pre mix, softmax and post mix in one kernel against mix_heads(softmax(mix_heads(x)))
    of the masked slab (fp64 slabs), written in fp64 or rounded to fp16 (as the forward writes
    A in q's dtype): all 16 heads in one group over rows longer than a key block, three groups
    at B=2, ten heads padded to 16 (the padding heads' softmax must not leak into the mix); the
    log-sum-exp; exact zeros on the masked entries; a post mix of another shape is refused."""
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
@pytest.mark.parametrize("zero_above, softmax, in_place", [(None, False, False), (0, True, True), (7, False, True),
                                                           (7, True, False)])
def test_mix_backward_rows_matches_torch(shape, groups, zero_above, softmax, in_place, device):
    """The fused backward of a slab's head mix (with the softmax's backward before it, or
    not) against PyTorch's softmax backward and the reference's mix_heads_backward, the
    weight gradient over a row range (fp64): the incoming gradient counts as zero above the
    diagonal, inputs are strided views, in place or into a new tensor. On the GPU too."""
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
@pytest.mark.parametrize("zero_above, in_place", [(None, False), (0, True), (7, False)])
def test_talking_heads_backward_rows_matches_autograd(shape, groups, zero_above, in_place, device):
    """Talking heads' backward kernel (dA to the scores through the post mix, the softmax
    from a given lse and the pre mix, with both weight gradients into row buffers) against
    autograd through mix_heads(softmax(mix_heads(s))) of a masked slab (fp64): all 16 heads in
    a group over rows longer than a key block, three groups at B=2, ten heads padded to 16;
    strided inputs, in place or not; exact zeros in the causal future; bad buffers refused.
    Out of place, A itself goes to a strided a_out on the way (zeros in the future too)."""
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


@pytest.mark.parametrize("shape, cq, ck, pad_key, zero_above", [
    ((1, 2, 7, 13), 3, 5, "both", None), ((1, 2, 7, 13), 3, 5, "both", 0), ((2, 3, 20, 70), 6, 11, "both", 37),
    ((1, 2, 5, 9), 2, 4, "left", 0), ((1, 1, 33, 40), 4, 3, "right", None), ((1, 1, 33, 40), 4, 3, "right", 0),
    ((1, 2, 20, 200), 6, 11, "both", None), ((1, 2, 20, 200), 6, 11, "both", 37), ((1, 1, 9, 200), 3, 4, "left", 0),
    ((1, 1, 20, 90), 2, 35, "both", 37), ((1, 1, 17, 80), 3, 20, "left", None), ((1, 1, 17, 80), 3, 20, "left", 0)])
def test_slab_convs_match_reference(shape, cq, ck, pad_key, zero_above, device):
    """The Triton slab convs of the chunked backward against the reference's conv2d versions:
    the conv, its input gradient and its weight gradient (fp64, non-contiguous input; kernels
    wider than 33 taps need 32-column halos). With zero_above, the kernels get inputs that are
    *not* zero above that diagonal and must read them as zero (the reference gets them zeroed):
    the weight gradient both of its inputs."""
    g = torch.Generator().manual_seed(0)
    x_raw, grad_raw = (torch.randn(shape, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    x, grad = x_raw, grad_raw
    if zero_above is not None:
        rows, cols = torch.arange(shape[2], device=device)[:, None], torch.arange(shape[3], device=device)[None, :]
        x, grad = (t.masked_fill(cols - rows > zero_above, 0.0) for t in (x_raw, grad_raw))
    w = torch.randn(shape[1], cq, ck, generator=g, dtype=torch.float64).to(device)
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


# keys: rows of 16-byte multiples (TMA on sm_90 / the interpreter) or not
@pytest.mark.parametrize("strip, keys", [
    pytest.param(dict(TILES=0), 288, id="per_tile"),
    pytest.param(dict(), 288, id="strip"),
    pytest.param(dict(), 270, id="strip-unaligned-rows"),
    pytest.param(dict(tma=False), 288, id="strip_pointers"),
    pytest.param(dict(group=2), 288, id="strip_two_offsets_per_dot")])
def test_strip_conv_kernel_on_16bit_slabs(strip, keys, device, monkeypatch):
    """The conv and its input gradient on 16-bit slabs through each kernel (a program per tile;
    per strip of column tiles, the tiles clear of the causal diagonal loaded by TMA where x's
    strides allow, or by pointers, one or two query offsets per dot): several row tiles and
    strips, causal slabs whose tiles are clear, on the diagonal and beyond it, a row-offset
    view, the band beside the pre-conv matmul; each within one unit in the last place of the
    exact result of the 16-bit operands, plus the error bound of summing its cq * ck products
    in fp32 (entries that nearly cancel, which a GPU's fp32 accumulation gets to about 1e-6)."""
    monkeypatch.setattr(configs, "STRIP_CONV", dict(configs.STRIP_CONV, **strip))
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 83, keys, generator=g).to(device, dtype)
    w = torch.randn(1, 6, 11, generator=g).to(device)
    w16 = w.to(dtype).double()
    ulp = torch.finfo(dtype).eps
    rows, cols = torch.arange(80, device=device)[:, None], torch.arange(keys, device=device)[None, :]
    xs = x[:, :, 3:]                    # a view that starts 3 rows in

    def assert_rounded_once(got, exact, magnitude, what):
        """got within one ulp of exact plus fp32 summation's bound over magnitude (the sum of
        the products' absolute values)."""
        excess = (got.double() - exact).abs() - ulp * exact.abs() - 66 * 2.0 ** -24 * magnitude
        assert got.dtype == dtype
        assert (excess <= 0).all(), (f"{what}: {(excess > 0).sum().item()} entries off, the worst by "
                                     f"{excess.max().item():.3g} at {tuple((excess > 0).nonzero()[0].tolist())}")

    for zero_above in (None, 3, 80):
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
    lo = 80
    first = slab_conv.band_first_column(lo, 6, 11, "both")
    assert first > 0
    xz = xs.masked_fill(cols - rows > lo, 0.0).double()
    out = torch.full_like(xs, float("nan"))     # NaN marks what the band leaves unwritten
    slab_conv.key_query_conv(xs[..., first:], w, "both", zero_above=lo, out=out, band=True, x_col0=first,
                             precision="ieee")
    written = ~out.isnan()
    assert written[..., cols - rows > lo - 5 - 5].all()
    assert_rounded_once(out[written], key_query_conv(xz, w16, "both")[written],
                        key_query_conv(xz.abs(), w16.abs(), "both")[written], "band")


@pytest.mark.parametrize("strip, keys", [
    pytest.param(dict(on=False), 288, id="per_offset"),
    pytest.param(dict(on=True), 288, id="strip"),
    pytest.param(dict(on=True), 270, id="strip-unaligned-rows"),
    pytest.param(dict(on=True, tma=False), 288, id="strip_pointers")])
def test_conv_weight_grad_kernels_on_16bit_slabs(strip, keys, device, monkeypatch):
    """The conv weight gradient of 16-bit slabs through either kernel (the committed one; the
    transposed-product kernel with the tiles clear of the causal diagonal loaded by TMA or by
    pointers): causal slabs with clear, diagonal and future tiles, the gradient's rows limited,
    a row-offset view; within fp32 summation of the exact result of the 16-bit operands."""
    monkeypatch.setattr(configs, "WEIGHT_GRAD_STRIP", dict(configs.WEIGHT_GRAD_STRIP, **strip))
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    g = torch.Generator().manual_seed(3)
    x, grad = (torch.randn(1, 1, 83, keys, generator=g).to(device, dtype)[:, :, 3:] for _ in range(2))
    w = torch.randn(1, 6, 11, generator=g).to(device)
    rows, cols = torch.arange(80, device=device)[:, None], torch.arange(keys, device=device)[None, :]
    for zero_above, own_rows in ((None, None), (3, (5, 80)), (50, (20, 70))):
        future = (cols - rows > zero_above) if zero_above is not None else torch.zeros_like(cols - rows, dtype=bool)
        lo, hi = own_rows or (0, 80)
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
    assert _unroll(6, dict(unroll="full")) == 6 and _unroll(1, dict(unroll="full")) == 1
    assert _unroll(configs.MAX_FULL_UNROLL, dict(unroll="full")) == configs.MAX_FULL_UNROLL
    assert _unroll(configs.MAX_FULL_UNROLL + 1, dict(unroll="full")) == 1
    assert _unroll(6, dict(unroll=2)) == 2 and _unroll(6, {}) == 1


@pytest.mark.parametrize("transpose", [False, True])
def test_slab_conv_masked_output_and_weight_grad_rows(transpose, device):
    """mask_output zeroes the result above the diagonal (and nothing else); the weight gradient
    with rows=(lo, hi) counts only those rows of the gradient."""
    g = torch.Generator().manual_seed(2)
    shape, z = (1, 2, 70, 100), 5
    rows, cols = torch.arange(shape[2], device=device)[:, None], torch.arange(shape[3], device=device)[None, :]
    future = cols - rows > z
    x, grad = (torch.randn(shape, generator=g, dtype=torch.float64).to(device).masked_fill(future, 0.0)
               for _ in range(2))
    w = torch.randn(2, 4, 7, generator=g, dtype=torch.float64).to(device)
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


@pytest.mark.parametrize("pad_key, ck", [("both", 5), ("left", 4), ("right", 4)])
def test_slab_convs_skip_exactly_the_zero_tiles(pad_key, ck, device):
    """Tiles at the diagonal bound: for every Z near a tile corner's column-minus-row (65
    here: rows 0..63 by columns 128..159), a tap that reads the last nonzero entry must not
    be skipped. An under-estimate of how far taps reach by one fails here."""
    g = torch.Generator().manual_seed(1)
    shape = (1, 1, 64, 160)
    rows, cols = torch.arange(shape[2], device=device)[:, None], torch.arange(shape[3], device=device)[None, :]
    w = torch.randn(1, 3, ck, generator=g, dtype=torch.float64).to(device)
    for z in range(57, 67):
        x, grad = (torch.randn(shape, generator=g, dtype=torch.float64).to(device).masked_fill(cols - rows > z, 0.0)
                   for _ in range(2))
        pairs = [(slab_conv.key_query_conv(x, w, pad_key, z), key_query_conv(x, w, pad_key)),
                 (slab_conv.key_query_conv_input_grad(grad, w, pad_key, z),
                  ref_bwd.key_query_conv_input_grad(grad, w, pad_key)),
                 (slab_conv.key_query_conv_weight_grad(grad, x, w, pad_key, z),
                  ref_bwd.key_query_conv_weight_grad(grad, x, w, pad_key))]
        for i, (got, expected) in enumerate(pairs):
            assert torch.allclose(got, expected, atol=1e-12, rtol=1e-10), (z, i)


@pytest.mark.parametrize("pad_key, causal", [("both", True), ("left", True), ("right", True), ("both", False)])
def test_pre_conv_matmul_matches_the_conv(pad_key, causal, device):
    """The pre conv as one matmul (q against K~, cq x D wide; GQA, D = 24, two batch elements)
    with the slab conv kernel redoing the tiles near the diagonal, against the reference's conv
    of the masked scores on a slab of rows [lo, hi) (fp64: exact); rows from lo + cq - 1 on
    (above them the slab conv reads zeros), the causal future excluded. Without the band
    tiles the causal result is wrong, so both kernels are checked; the band tiles read the
    same from scores of only the columns right of band_first_column."""
    g = torch.Generator().manual_seed(11)
    B, H, Hkv, L, D, lo, hi = 2, 2, 1, 160, 24, 80, 160
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
        slab_conv.key_query_conv(scores[:, :, lo:hi], w, pad_key, zero_above=lo, out=band, band=True)
        assert not torch.equal(band, c)
        # the band tiles from the scores of the columns they read only: the same bits
        first = band_first_column(lo, 3, 5, pad_key)
        assert 0 < first < lo
        narrow = c.clone()
        slab_conv.key_query_conv(scores[:, :, lo:hi, first:].contiguous(), w, pad_key, zero_above=lo, out=narrow,
                                 band=True, x_col0=first)
        assert torch.equal(narrow, band)
        with pytest.raises(ValueError, match="x_col0"):
            slab_conv.key_query_conv(scores[:, :, lo:hi, first + 16:], w, pad_key, zero_above=lo, out=narrow,
                                     band=True, x_col0=first + 16)
        c = band
    valid = (rows[lo:hi] >= lo + 2) & ((cols <= rows[lo:hi]) if causal else True)
    assert torch.allclose(c * valid, expected * valid, atol=1e-11, rtol=1e-10)
    if causal:
        assert (c[:, :, :, lo + 64:].masked_select(cols[:, lo + 64:] - rows[lo:hi] > lo + 63) == 0).all()

