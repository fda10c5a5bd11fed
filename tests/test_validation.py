"""Bad input (spec section 5): a clear ValueError or TypeError naming the argument.

Every case runs against both the reference and the fused entry point; both validate
before doing any work, so no kernel runs here.
"""
import math

import numpy as np
import pytest
import torch

import mta_kernels
import mta_kernels.api
import mta_reference

B, H, HKV, L, D = 1, 4, 2, 5, 4

IMPLS = [
    pytest.param(mta_reference.mta_attention, id="reference"),
    pytest.param(mta_kernels.mta_attention, id="kernels"),
]


def base_args():
    """A valid call: q, k, v and all four weights, as a kwargs dict."""
    torch.manual_seed(0)
    return dict(
        q=torch.randn(B, H, L, D), k=torch.randn(B, HKV, L, D), v=torch.randn(B, HKV, L, D),
        pre_conv=torch.randn(H, 3, 3), pre_mix=torch.randn(1, H, H),
        post_conv=torch.randn(H, 2, 5), post_mix=torch.randn(2, 2, 2),
    )


def call(fn, **changes):
    args = base_args()
    args.update(changes)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return fn(q, k, v, **args)


def test_base_args_are_valid():
    """The unmodified arguments pass validation and run through the reference."""
    args = base_args()
    p = mta_reference.validate(args["q"], args["k"], args["v"], args["pre_conv"], args["pre_mix"],
                               args["post_conv"], args["post_mix"])
    assert (p.B, p.H, p.Hkv, p.L, p.D) == (B, H, HKV, L, D)
    assert p.scale == pytest.approx(1 / math.sqrt(D))
    out = call(mta_reference.mta_attention)
    assert out.shape == (B, H, L, D) and torch.isfinite(out).all()


def kv(shape, **kw):
    return dict(k=torch.randn(*shape, **kw), v=torch.randn(*shape, **kw))


# (id, changes, exception, match)
CASES = [
    # ranks and shapes of q, k, v
    ("q-rank3", dict(q=torch.randn(H, L, D)), ValueError, r"\bq\b"),
    ("q-rank5", dict(q=torch.randn(1, B, H, L, D)), ValueError, r"\bq\b"),
    ("k-rank3", dict(k=torch.randn(HKV, L, D)), ValueError, r"\bk\b"),
    ("v-rank5", dict(v=torch.randn(1, B, HKV, L, D)), ValueError, r"\bv\b"),
    ("k-v-shape-mismatch", dict(v=torch.randn(B, HKV, L, D + 1)), ValueError, r"\bk\b.*\bv\b"),
    ("k-batch", kv((B + 1, HKV, L, D)), ValueError, r"\bk\b.*batch"),
    ("k-length", kv((B, HKV, L + 1, D)), ValueError, r"\bk\b.*length"),
    ("k-head-dim", kv((B, HKV, L, D + 2)), ValueError, r"\bk\b.*head dim"),
    ("H-not-multiple-of-Hkv", kv((B, 3, L, D)), ValueError, r"Hkv"),
    ("Hkv-larger-than-H", kv((B, 2 * H, L, D)), ValueError, r"Hkv"),
    # ranks of the weights
    ("pre_conv-rank2", dict(pre_conv=torch.randn(H, 3)), ValueError, "pre_conv"),
    ("pre_conv-rank4", dict(pre_conv=torch.randn(H, 1, 3, 3)), ValueError, "pre_conv"),
    ("post_conv-rank4", dict(post_conv=torch.randn(H, 1, 3, 3)), ValueError, "post_conv"),
    ("pre_mix-rank2", dict(pre_mix=torch.randn(H, H)), ValueError, "pre_mix"),
    ("post_mix-rank4", dict(post_mix=torch.randn(1, 2, 2, 2)), ValueError, "post_mix"),
    # conv with the wrong number of heads
    ("pre_conv-wrong-H", dict(pre_conv=torch.randn(H - 1, 3, 3)), ValueError, "pre_conv"),
    ("post_conv-wrong-H", dict(post_conv=torch.randn(H + 1, 3, 3)), ValueError, "post_conv"),
    # group size not dividing H / groups not multiplying to H
    ("pre_mix-ch-not-dividing-H", dict(pre_mix=torch.randn(1, 3, 3)), ValueError, "pre_mix"),
    ("post_mix-ch-not-dividing-H", dict(post_mix=torch.randn(1, 3, 3)), ValueError, "post_mix"),
    ("pre_mix-wrong-G", dict(pre_mix=torch.randn(1, 2, 2)), ValueError, "pre_mix"),
    ("post_mix-wrong-G", dict(post_mix=torch.randn(3, 2, 2)), ValueError, "post_mix"),
    # non-square mixes
    ("pre_mix-nonsquare", dict(pre_mix=torch.randn(2, 2, 3)), ValueError, "pre_mix"),
    ("post_mix-nonsquare", dict(post_mix=torch.randn(1, 4, 2)), ValueError, "post_mix"),
    # even ck with pad 'both'
    ("pre_conv-even-ck-both", dict(pre_conv=torch.randn(H, 3, 4)), ValueError, "pre_conv"),
    ("post_conv-even-ck-both", dict(post_conv=torch.randn(H, 1, 2)), ValueError, "post_conv"),
    # mismatched devices ('meta' gives a second device on a CPU-only machine)
    ("k-meta-device", dict(k=torch.randn(B, HKV, L, D, device="meta")), ValueError, r"\bk\b.*device"),
    ("v-meta-device", dict(v=torch.randn(B, HKV, L, D, device="meta")), ValueError, r"\bv\b.*device"),
    ("pre_conv-meta-device", dict(pre_conv=torch.randn(H, 3, 3, device="meta")), ValueError, "pre_conv"),
    ("pre_mix-meta-device", dict(pre_mix=torch.randn(1, H, H, device="meta")), ValueError, "pre_mix"),
    ("post_conv-meta-device", dict(post_conv=torch.randn(H, 2, 5, device="meta")), ValueError, "post_conv"),
    ("post_mix-meta-device", dict(post_mix=torch.randn(2, 2, 2, device="meta")), ValueError, "post_mix"),
    # mismatched dtypes among q, k, v
    ("k-dtype", dict(k=torch.randn(B, HKV, L, D, dtype=torch.float16)), TypeError, r"\bk\b.*dtype"),
    ("v-dtype", dict(v=torch.randn(B, HKV, L, D, dtype=torch.bfloat16)), TypeError, r"\bv\b.*dtype"),
    # unknown pad_key
    ("pad_key-unknown", dict(pad_key="middle"), ValueError, "pad_key"),
    ("pad_key-case", dict(pad_key="Both"), ValueError, "pad_key"),
    ("pad_key-None", dict(pad_key=None), (ValueError, TypeError), "pad_key"),
    # empty tensors
    ("q-empty-L", dict(q=torch.randn(B, H, 0, D), **kv((B, HKV, 0, D))), ValueError, r"\bq\b.*empty"),
    ("q-empty-B", dict(q=torch.randn(0, H, L, D), **kv((0, HKV, L, D))), ValueError, r"\bq\b.*empty"),
    ("k-empty", dict(k=torch.randn(B, HKV, L, 0)), ValueError, r"\bk\b.*empty"),
    ("v-empty", dict(v=torch.randn(B, 0, L, D)), ValueError, r"\bv\b.*empty"),
    ("pre_conv-empty", dict(pre_conv=torch.randn(H, 0, 3)), ValueError, "pre_conv"),
    ("post_conv-empty", dict(post_conv=torch.randn(H, 2, 0), pad_key="left"), ValueError, "post_conv"),
    ("pre_mix-empty", dict(pre_mix=torch.randn(0, 2, 2)), ValueError, "pre_mix"),
    ("post_mix-empty", dict(post_mix=torch.randn(H, 0, 0)), ValueError, "post_mix"),
    # non-bool causal
    ("causal-int", dict(causal=1), TypeError, "causal"),
    ("causal-str", dict(causal="yes"), TypeError, "causal"),
    ("causal-None", dict(causal=None), TypeError, "causal"),
    ("causal-tensor", dict(causal=torch.tensor(True)), TypeError, "causal"),
    # non-numeric / non-finite scale
    ("scale-str", dict(scale="0.5"), TypeError, "scale"),
    ("scale-bool", dict(scale=True), TypeError, "scale"),
    ("scale-tensor", dict(scale=torch.tensor(0.5)), TypeError, "scale"),
    ("scale-nan", dict(scale=float("nan")), ValueError, "scale"),
    ("scale-inf", dict(scale=float("inf")), ValueError, "scale"),
    ("scale-neg-inf", dict(scale=-math.inf), ValueError, "scale"),
    # non-tensor inputs
    ("q-list", dict(q=[[[[0.0]]]]), TypeError, r"\bq\b"),
    ("k-numpy", dict(k=np.zeros((B, HKV, L, D), dtype=np.float32)), TypeError, r"\bk\b"),
    ("v-None", dict(v=None), TypeError, r"\bv\b"),
    ("pre_conv-list", dict(pre_conv=[[[1.0]]] * H), TypeError, "pre_conv"),
    ("pre_mix-numpy", dict(pre_mix=np.eye(H)[None]), TypeError, "pre_mix"),
    ("post_conv-float", dict(post_conv=1.0), TypeError, "post_conv"),
    ("post_mix-list", dict(post_mix=[[[1.0]]]), TypeError, "post_mix"),
    # integer (and other non-float) dtypes
    ("q-int", dict(q=torch.ones(B, H, L, D, dtype=torch.int32)), TypeError, r"\bq\b"),
    ("k-int64", dict(k=torch.ones(B, HKV, L, D, dtype=torch.int64)), TypeError, r"\bk\b"),
    ("v-bool", dict(v=torch.ones(B, HKV, L, D, dtype=torch.bool)), TypeError, r"\bv\b"),
    ("q-complex", dict(q=torch.ones(B, H, L, D, dtype=torch.complex64)), TypeError, r"\bq\b"),
    ("pre_conv-int", dict(pre_conv=torch.ones(H, 3, 3, dtype=torch.int32)), TypeError, "pre_conv"),
    ("pre_mix-int", dict(pre_mix=torch.ones(1, H, H, dtype=torch.int64)), TypeError, "pre_mix"),
    ("post_conv-int", dict(post_conv=torch.ones(H, 2, 5, dtype=torch.int16)), TypeError, "post_conv"),
    ("post_mix-bool", dict(post_mix=torch.ones(2, 2, 2, dtype=torch.bool)), TypeError, "post_mix"),
]


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("changes,exc,match", [pytest.param(c, e, m, id=i) for i, c, e, m in CASES])
def test_bad_input(fn, changes, exc, match):
    """Each bad argument raises the documented exception, and the message names it."""
    with pytest.raises(exc, match=match):
        call(fn, **changes)


@pytest.mark.parametrize("fn", IMPLS)
def test_q_device_differs_from_weights(fn):
    """q, k, v together on 'meta' while a weight stays on CPU: the weight is named."""
    meta = dict(q=torch.randn(B, H, L, D, device="meta"), **kv((B, HKV, L, D), device="meta"))
    with pytest.raises(ValueError, match="pre_conv"):
        call(fn, **meta)


@pytest.mark.parametrize("pad_key", ["left", "right"])
def test_even_ck_accepted_with_one_sided_pad(pad_key):
    """Even ck is fine for pad 'left' / 'right' in the reference (pre and post conv)."""
    torch.manual_seed(0)
    out = call(mta_reference.mta_attention, pre_conv=torch.randn(H, 3, 4),
               post_conv=torch.randn(H, 2, 2), pad_key=pad_key)
    assert out.shape == (B, H, L, D)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [2, 0.25, -1.5, np.float64(0.3)], ids=["int", "float", "negative", "numpy"])
def test_numeric_scales_accepted(scale):
    """Finite int / float scales are valid and used as given."""
    args = base_args()
    p = mta_reference.validate(args["q"], args["k"], args["v"], scale=scale)
    assert p.scale == pytest.approx(float(scale))
    assert isinstance(p.scale, float)


def test_weights_may_differ_in_dtype():
    """Weights may be in any float dtype (spec section 1): fp64 / fp16 weights with fp32 q are accepted."""
    torch.manual_seed(0)
    out = call(mta_reference.mta_attention, pre_conv=torch.randn(H, 3, 3, dtype=torch.float64),
               post_mix=torch.randn(2, 2, 2, dtype=torch.float16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_check_backend_requires_interpreter_on_cpu(monkeypatch):
    """Without the Triton interpreter, CPU tensors get a RuntimeError that says how to fix it."""
    monkeypatch.setattr(mta_kernels.api, "interpreting", lambda: False)
    q = torch.randn(B, H, L, D)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mta_kernels.api._check_backend(q, D)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        call(mta_kernels.mta_attention)


def test_check_backend_accepts_cpu_under_interpreter(monkeypatch):
    """With the interpreter on, fp32 and fp16 CPU tensors pass the backend check."""
    monkeypatch.setattr(mta_kernels.api, "interpreting", lambda: True)
    assert mta_kernels.api._check_backend(torch.randn(B, H, L, D), D) is None
    assert mta_kernels.api._check_backend(torch.randn(B, H, L, D, dtype=torch.float16), D) is None


def test_interpreting_follows_triton():
    """interpreting() reads Triton's own setting, which conftest turns on without a GPU."""
    import triton
    assert mta_kernels.api.interpreting() == bool(triton.knobs.runtime.interpret)
    if not torch.cuda.is_available():
        assert mta_kernels.api.interpreting()


@pytest.mark.parametrize("parts", [{}, dict(pre_mix=torch.randn(1, H, H), post_mix=torch.randn(1, H, H)),
                                   dict(post_conv=torch.randn(H, 2, 5))], ids=["none", "talking-heads", "post_conv"])
def test_bf16_on_cpu_is_refused(parts, monkeypatch):
    """bf16 CPU tensors raise a TypeError naming bfloat16 on every path (the interpreter's bf16
    dot is wrong), before any kernel runs."""
    from mta_kernels import autograd
    monkeypatch.setattr(autograd, "forward_impl", lambda *a, **kw: pytest.fail("a kernel ran"))
    monkeypatch.setattr(mta_kernels.api, "interpreting", lambda: True)
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(TypeError, match="bfloat16"):
        mta_kernels.mta_attention(q, k, v, **parts)
    with pytest.raises(TypeError, match="bfloat16"):
        mta_kernels.api._check_backend(q, D)


def test_head_dim_beyond_the_kernels_is_refused():
    q = torch.randn(B, H, L, 257)
    with pytest.raises(ValueError, match="D=257"):
        mta_kernels.mta_attention(q, q, q)
