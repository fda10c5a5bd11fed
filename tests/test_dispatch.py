"""kernel_options and the choice of path: options.resolve, dispatch.applicable_paths and
choose_path, and what mta_attention does with a path that cannot run a call."""
from types import SimpleNamespace

import pytest
import torch

import mta_kernels
from cases import Case, make_inputs
from mta_kernels.autograd import pack_options, unpack_options
from mta_kernels.dispatch import applicable_paths, choose_block_path, choose_path
from mta_kernels.options import DEFAULT_CHUNK_BYTES, PATHS, Options, resolve

H = 4
CONV = torch.empty(H, 3, 5, device="meta")
MIX = torch.empty(1, H, H, device="meta")
PAIRS = torch.empty(2, 2, 2, device="meta")


def weights(pre_conv=None, pre_mix=None, post_conv=None, post_mix=None):
    return (pre_conv, pre_mix, post_conv, post_mix)


def cpu_q(dtype=torch.float32):
    return torch.empty(1, H, 8, 16, dtype=dtype)


def cuda_q(dtype=torch.bfloat16):
    """What dispatch reads of a CUDA q (is_cuda, dtype), on a machine without one."""
    return SimpleNamespace(is_cuda=True, dtype=dtype)


# ---- options.resolve

def test_resolve_defaults():
    assert resolve(None) == Options() == resolve({})
    o = Options()
    assert (o.path, o.chunk_rows, o.chunk_bytes) == ("", 0, DEFAULT_CHUNK_BYTES)
    assert o.slab_dtype is None and o.pre_conv_matmul is None and o.causal_matmuls is None


def test_resolve_keeps_every_field():
    given = dict(path="chunked", chunk_rows=7, chunk_bytes=1 << 20, slab_dtype=torch.float16,
                 pre_conv_matmul=False, causal_matmuls=True)
    assert resolve(given) == Options(**given)
    assert set(given) == set(mta_kernels.KernelOptions.__annotations__)


BAD_OPTIONS = [
    (dict(chunk_row=4), ValueError, r"unknown keys \['chunk_row'\]"),
    (dict(path="chunked", backend="triton"), ValueError, "backend"),
    (dict(path="fused"), ValueError, r"kernel_options\['path'\]"),
    (dict(path="Flash"), ValueError, r"kernel_options\['path'\]"),
    (dict(chunk_rows=0), ValueError, r"kernel_options\['chunk_rows'\]"),
    (dict(chunk_rows=-3), ValueError, r"kernel_options\['chunk_rows'\]"),
    (dict(chunk_rows=2.0), ValueError, r"kernel_options\['chunk_rows'\]"),
    (dict(chunk_rows=True), ValueError, r"kernel_options\['chunk_rows'\]"),
    (dict(chunk_bytes=0), ValueError, r"kernel_options\['chunk_bytes'\]"),
    (dict(chunk_bytes="1GiB"), ValueError, r"kernel_options\['chunk_bytes'\]"),
    (dict(slab_dtype=torch.int32), ValueError, r"kernel_options\['slab_dtype'\]"),
    (dict(slab_dtype="float16"), ValueError, r"kernel_options\['slab_dtype'\]"),
    (dict(pre_conv_matmul=1), TypeError, r"kernel_options\['pre_conv_matmul'\]"),
    (dict(causal_matmuls="yes"), TypeError, r"kernel_options\['causal_matmuls'\]"),
]


@pytest.mark.parametrize("options, exc, match", [
    pytest.param(*bad, id="-".join(f"{k}={v}" for k, v in bad[0].items())) for bad in BAD_OPTIONS])
def test_resolve_refuses_bad_options(options, exc, match):
    with pytest.raises(exc, match=match):
        resolve(options)


@pytest.mark.parametrize("options", [[("path", "flash")], "chunked", Options()], ids=["list", "str", "Options"])
def test_resolve_refuses_non_dicts(options):
    with pytest.raises(TypeError, match="kernel_options must be a dict"):
        resolve(options)


@pytest.mark.parametrize("tri", [None, False, True])
def test_options_survive_the_custom_ops_packing(tri):
    o = Options("talking_heads", 16, 1 << 20, torch.float16, tri, not tri if tri is not None else None)
    packed = pack_options(o)
    assert all(isinstance(x, (int, torch.dtype, type(None))) for x in packed)
    assert unpack_options(o.path, *packed) == o


# ---- applicable_paths and choose_path

@pytest.mark.parametrize("w, cpu, cuda", [
    (weights(), ("flash",), ("sdpa", "flash")),
    (weights(pre_mix=MIX, post_mix=MIX), ("talking_heads", "chunked"), ("talking_heads", "chunked")),
    (weights(pre_mix=MIX), ("chunked",), ("chunked",)),
    (weights(post_mix=MIX), ("chunked",), ("chunked",)),
    (weights(pre_mix=MIX, post_mix=PAIRS), ("chunked",), ("chunked",)),          # two group sizes
    (weights(pre_conv=CONV, pre_mix=MIX, post_mix=MIX), ("chunked",), ("chunked",)),
    (weights(post_conv=CONV), ("chunked",), ("chunked",)),
], ids=["none", "talking-heads", "pre_mix", "post_mix", "two-group-sizes", "conv-and-mixes", "post_conv"])
def test_applicable_paths(w, cpu, cuda):
    assert applicable_paths(cpu_q(), w) == cpu
    assert applicable_paths(cuda_q(), w) == cuda
    assert choose_path(cpu_q(), w, Options()) == cpu[0]
    assert choose_path(cuda_q(), w, Options()) == cuda[0]
    assert set(cpu) <= set(PATHS)


def test_sdpa_takes_only_its_dtypes():
    """fp64 on CUDA (gradchecks) has only the flash path."""
    assert applicable_paths(cuda_q(torch.float64), weights()) == ("flash",)
    assert applicable_paths(cuda_q(torch.float16), weights()) == ("sdpa", "flash")
    assert applicable_paths(cuda_q(torch.float32), weights()) == ("sdpa", "flash")


def test_deterministic_algorithms_take_flash_over_sdpa():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert choose_path(cuda_q(), weights(), Options()) == "flash"
        assert choose_path(cuda_q(), weights(), Options(path="sdpa")) == "sdpa"    # forced: as asked
        assert choose_path(cuda_q(), weights(pre_mix=MIX, post_mix=MIX), Options()) == "talking_heads"
        torch.use_deterministic_algorithms(False)
        assert choose_path(cuda_q(), weights(), Options()) == "sdpa"
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("path", ["flash", "talking_heads", "chunked"])
def test_forcing_an_applicable_path(path):
    w = {"flash": weights(), "talking_heads": weights(pre_mix=MIX, post_mix=MIX),
         "chunked": weights(pre_mix=MIX, post_mix=MIX)}[path]
    assert choose_path(cpu_q(), w, Options(path=path)) == path


@pytest.mark.parametrize("q, w, path", [
    (cpu_q(), weights(), "sdpa"),                                   # SDPA: CUDA only
    (cpu_q(), weights(), "chunked"),
    (cpu_q(), weights(pre_conv=CONV), "flash"),
    (cpu_q(), weights(pre_conv=CONV, pre_mix=MIX, post_mix=MIX), "talking_heads"),
    (cpu_q(), weights(pre_mix=MIX), "talking_heads"),
    (cuda_q(), weights(post_mix=MIX), "sdpa"),
    (cuda_q(), weights(), "talking_heads"),
], ids=["sdpa-on-cpu", "chunked-plain", "flash-conv", "talking-heads-conv", "talking-heads-one-mix",
        "sdpa-mta", "talking-heads-plain"])
def test_forcing_a_path_that_cannot_run_the_call(q, w, path):
    with pytest.raises(ValueError, match=r"kernel_options\['path'\]='%s' cannot run this call" % path):
        choose_path(q, w, Options(path=path))


@pytest.mark.parametrize("w", [weights(), weights(pre_conv=CONV)], ids=["none", "pre_conv"])
def test_decode_is_for_query_blocks_only(w):
    """'decode' runs a query block at the end of the keys, never a whole sequence."""
    with pytest.raises(ValueError, match=r"kernel_options\['path'\]='decode'"):
        choose_path(cpu_q(), w, Options(path="decode"))


@pytest.mark.parametrize("pad_key, post_ck, path", [("both", 11, "decode"), ("left", 17, "decode"),
                                                    ("left", 18, "chunked"), ("right", 33, "chunked")])
def test_block_path_by_the_post_convs_reach(pad_key, post_ck, path):
    """The fused decode step unrolls a conv reaching at most 16 keys either side; a wider one
    takes the chunked path, and forcing 'decode' then names the limit."""
    post_conv = torch.empty(H, 6, post_ck, device="meta")
    w = weights(pre_conv=torch.empty(H, 6, 11, device="meta"), pre_mix=MIX, post_conv=post_conv, post_mix=MIX)
    q = torch.empty(1, H, 1, 16)
    assert choose_block_path(q, w, pad_key, Options()) == path
    if path == "chunked":
        with pytest.raises(ValueError, match="each conv reach at most 16 keys"):
            choose_block_path(q, w, pad_key, Options(path="decode"))


# ---- through mta_attention

def test_mta_attention_refuses_bad_options_before_any_kernel(device, monkeypatch):
    """Bad kernel_options raise from mta_attention naming the key, before any kernel runs."""
    from mta_kernels import autograd
    monkeypatch.setattr(autograd, "forward_impl", lambda *a, **kw: pytest.fail("a kernel ran"))
    q, k, v, *w = make_inputs(Case(L=8, D=16, pre_conv=(2, 3)), torch.float32, device)
    with pytest.raises(ValueError, match=r"kernel_options\['path'\]='talking_heads'"):
        mta_kernels.mta_attention(q, k, v, *w, kernel_options={"path": "talking_heads"})
    with pytest.raises(ValueError, match=r"kernel_options\['path'\]='flash'"):
        mta_kernels.mta_attention(q, k, v, *w, kernel_options={"path": "flash"})
    if device == "cpu":
        with pytest.raises(ValueError, match=r"kernel_options\['path'\]='sdpa'"):
            mta_kernels.mta_attention(q, k, v, kernel_options={"path": "sdpa"})
    with pytest.raises(ValueError, match="unknown keys"):
        mta_kernels.mta_attention(q, k, v, *w, kernel_options={"rows": 4})
    with pytest.raises(ValueError, match=r"kernel_options\['chunk_rows'\]"):
        mta_kernels.mta_attention(q, k, v, *w, kernel_options={"chunk_rows": 0})


@pytest.mark.parametrize("parts, forced, default", [
    ({}, "flash", "flash"),
    (dict(pre_mix=4, post_mix=4), "talking_heads", "talking_heads"),
    (dict(pre_mix=4, post_mix=4), "chunked", "talking_heads"),
    (dict(post_conv=(2, 3)), "chunked", "chunked"),
], ids=["none-flash", "talking-heads", "talking-heads-chunked", "post_conv-chunked"])
def test_mta_attention_runs_the_chosen_path(parts, forced, default, device, monkeypatch):
    """forward_impl gets the forced path with the other options as given, and by default the
    first applicable one (SDPA, which needs no forward_impl, for a plain CUDA call)."""
    from mta_kernels import autograd
    seen = []
    real = autograd.forward_impl

    def spy(q, k, v, w, causal, pad_key, scale, options):
        seen.append(options)
        return real(q, k, v, w, causal, pad_key, scale, options)

    monkeypatch.setattr(autograd, "forward_impl", spy)
    q, k, v, *w = make_inputs(Case(H=4, L=8, D=16, **parts), torch.float32, device)
    mta_kernels.mta_attention(q, k, v, *w, kernel_options=dict(path=forced, chunk_rows=5))
    mta_kernels.mta_attention(q, k, v, *w)
    by_default = [] if device == "cuda" and not parts else [Options(path=default)]
    assert seen == [Options(path=forced, chunk_rows=5)] + by_default


@pytest.mark.gpu
def test_deterministic_cuda_plain_call_takes_flash(monkeypatch):
    """With torch.use_deterministic_algorithms(True) a plain CUDA call runs the flash kernels,
    not torch SDPA (whose backward may not be deterministic); without it, SDPA."""
    from mta_kernels import api
    sdpa_calls = []
    real = api.sdpa
    monkeypatch.setattr(api, "sdpa", lambda *a: sdpa_calls.append(1) or real(*a))
    q, k, v, *_ = make_inputs(Case(H=16, L=1024, D=128), torch.bfloat16, "cuda", requires_grad=True)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = mta_kernels.mta_attention(q, k, v)
        assert sdpa_calls == [] and out.grad_fn is not None and "MTAFunction" in type(out.grad_fn).__name__
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        again = torch.autograd.grad(mta_kernels.mta_attention(q, k, v), (q, k, v), torch.ones_like(out))
        assert all(torch.equal(a, b) for a, b in zip(grads, again))
    finally:
        torch.use_deterministic_algorithms(before)
    mta_kernels.mta_attention(q, k, v)
    assert sdpa_calls == [1]
