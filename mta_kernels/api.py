"""The public function: validate, choose the path, and run the op through autograd."""
from typing import Optional

import torch
import triton

from mta_reference.validate import conv_row_halo, is_bool, validate, validate_block, validate_packed

from .autograd import MTAFunction, mta_fwd, pack_options
from .blocks import block_forward
from .dispatch import choose_block_path, choose_path
from .flash import sdpa, sdpa_varlen
from .options import KernelOptions, resolve
from .packed import run_packed
from .utils import captured_on_device

MAX_HEAD_DIM = 256
# The convs' halos the slab kernels take: (cq-1)+(cq'-1) rows and (ck-1)+(ck'-1) keys.
MAX_ROW_HALO = 32
MAX_KEY_HALO = 64


# Triton reads TRITON_INTERPRET when it decorates the kernels, at import: so does this (once,
# so that torch.compile traces no call into Triton's environment reader).
_INTERPRETING = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """Whether Triton runs the kernels in its interpreter (TRITON_INTERPRET, as Triton read it)."""
    return _INTERPRETING


def _check_conv_sizes(pre_conv, post_conv):
    convs = [w for w in (pre_conv, post_conv) if w is not None]
    row_halo = sum(w.shape[1] - 1 for w in convs)
    key_halo = sum(w.shape[2] - 1 for w in convs)
    if row_halo > MAX_ROW_HALO or key_halo > MAX_KEY_HALO:
        raise ValueError(
            f"pre_conv/post_conv sizes {[tuple(w.shape[1:]) for w in convs]} are too large for the fused "
            f"kernels: they support (cq-1)+(cq'-1) <= {MAX_ROW_HALO} and (ck-1)+(ck'-1) <= {MAX_KEY_HALO}")


def _check_backend(q: torch.Tensor, D: int):
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on {q.device}; mta_kernels supports CUDA (and CPU under the Triton interpreter)")
    if q.device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                "mta_kernels runs Triton kernels: CPU tensors need the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing mta_kernels), or use "
                "mta_reference.mta_attention for the plain-PyTorch path")
        if q.dtype == torch.bfloat16:
            raise TypeError("q is bfloat16 on the CPU: the Triton interpreter's bfloat16 dot is wrong; "
                            "use float16 or float32 there, or mta_reference.mta_attention")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim D={D}; the fused kernels support D <= {MAX_HEAD_DIM}")


def mta_attention(q, k, v, pre_conv=None, pre_mix=None, post_conv=None, post_mix=None, *,
                  causal: bool = True, pad_key: str = "both", scale: Optional[float] = None,
                  q_prev: Optional[torch.Tensor] = None, seqlens: Optional[torch.Tensor] = None,
                  cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                  kernel_options: Optional[KernelOptions] = None) -> torch.Tensor:
    """Multi-Token Attention through the fused Triton kernels.

    Args:
        q: (B, H, L, D); k, v: (B, Hkv, L, D), H % Hkv == 0; any strides; fp16, bf16 or fp32
            (fp64 too, for gradchecks).
        pre_conv, post_conv: (H, cq, ck) key-query kernels (row cq-1 is the current query,
            column pL the current key), before and after the softmax.
        pre_mix, post_mix: (G, ch, ch) head mixing, W[g, out, in], H = G * ch.
        causal: mask keys after each query. pad_key: 'both', 'left' or 'right'.
        scale: the softmax scale (default 1/sqrt(D)).
        q_prev, seqlens: a query block at the end of each sequence (chunked prefill,
            decoding; forward only): q (B, H, Lq, D) with Lq <= Lk for k, v (B, Hkv, Lk, D),
            row r at position Lk - Lq + r (seqlens[b] - Lq + r with seqlens (B,) ints: sequence
            b's number of keys); q_prev (B, H, P, D), the queries just before the block, needed
            with P >= (cq-1) + (cq'-1) when a conv is present and Lq < Lk (or as many as there
            are positions above the block, where that is fewer).
        cu_seqlens, max_seqlen: documents packed along the sequence: cu_seqlens (N+1,) int
            offsets [0, ..., T] with q (1, H, T, D), k, v (1, Hkv, T, D); each document is an
            independent sequence (convs and the causal mask restart at its first row).
        kernel_options: see ``mta_kernels.KernelOptions`` (force a path, a chunk height, ...).

    Each part is optional; with none this is plain softmax attention. Returns q's shape in
    q's dtype. Differentiable in q, k, v and every weight (not for query blocks). The MTA paths
    are deterministic (bitwise identical run to run); plain attention on CUDA goes through
    torch SDPA unless torch.use_deterministic_algorithms is on or kernel_options picks 'flash'.

    Example::

        q, k, v = (torch.randn(2, 4, 128, 32) for _ in range(3))
        w = mta_reference.identity_conv(4, 3, 5) + 0.1 * torch.randn(4, 3, 5)
        out = mta_kernels.mta_attention(q, k, v, pre_conv=w)     # (2, 4, 128, 32)
    """
    causal = _as_bool(causal)
    weights = (pre_conv, pre_mix, post_conv, post_mix)
    p = validate(q, k, v, *weights, causal, pad_key, scale, block=True)
    _check_backend(q, p.D)
    _check_conv_sizes(pre_conv, post_conv)
    options = resolve(kernel_options)
    if cu_seqlens is not None or max_seqlen is not None:
        docs = validate_packed(q, k, cu_seqlens, max_seqlen, q_prev, seqlens)
        options = options._replace(path=choose_path(q, weights, options))
        if options.path == "sdpa":      # plain attention: torch's varlen kernel where it can take the call
            longest = max(e - s for s, e in docs)
            out = sdpa_varlen(q, k, v, cu_seqlens, longest, causal, p.scale)
            if out is not None:
                return out
        return run_packed(lambda qb, kb, vb: _dense(qb, kb, vb, weights, causal, pad_key, p.scale, options),
                          q, k, v, docs, causal)
    if q_prev is None and seqlens is None and q.shape[2] == k.shape[2]:
        return _dense(q, k, v, weights, causal, pad_key, p.scale, options._replace(path=choose_path(q, weights, options)))
    _validate_block(q, k, pre_conv, post_conv, q_prev, seqlens)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, q_prev, *weights)):
        raise RuntimeError("mta_attention with a query block (q shorter than k, q_prev or seqlens) is forward "
                           "only: run it under torch.no_grad(), or pass the whole sequence for gradients")
    path = choose_block_path(q, weights, pad_key, options)
    return block_forward(q, k, v, weights, causal=causal, pad_key=pad_key, scale=p.scale, q_prev=q_prev,
                         seqlens=seqlens, halo=conv_row_halo(pre_conv, post_conv), path=path,
                         options=options._replace(path=path))


def _dense(q, k, v, weights, causal, pad_key, scale, options):
    """The op on whole sequences (Lq == Lk), through autograd."""
    if options.path == "sdpa":
        return sdpa(q, k, v, causal, scale)
    args = (q, k, v, *weights, causal, pad_key, scale)
    if torch.compiler.is_compiling():
        return mta_fwd(*args, options.path, *pack_options(options))[0]   # the custom op, traced
    return MTAFunction.apply(*args, options)


def _as_bool(causal):
    """causal as a Python bool: bools and numpy bools pass, anything else is a TypeError."""
    if not is_bool(causal):
        raise TypeError(f"causal must be a bool, got {type(causal).__module__}.{type(causal).__qualname__}")
    return bool(causal)


def _validate_block(q, k, pre_conv, post_conv, q_prev, seqlens):
    """validate_block's checks; while a CUDA graph is captured the values of a CUDA seqlens
    cannot be read, so only its kind and shape are checked then."""
    if captured_on_device(seqlens):
        if seqlens.dtype not in (torch.int32, torch.int64) or seqlens.shape != (q.shape[0],):
            raise ValueError(f"seqlens must be a ({q.shape[0]},) int32 or int64 tensor, got "
                             f"{tuple(seqlens.shape)} {seqlens.dtype}")
        seqlens = None
    validate_block(q, k, pre_conv, post_conv, q_prev, seqlens)
