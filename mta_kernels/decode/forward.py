"""Host side of the fused decode step (kernels.py): a query block of a few rows at the end of
long sequences, forward only, with each sequence's key count read on the device (no host
synchronisation, so a decode step can be captured in a CUDA graph)."""
import math

import torch

from mta_reference.validate import left_pad

from .. import configs
from ..utils import cdiv, dot_precision, next_pow2, padded
from .kernels import decode_logits_kernel, decode_weights_kernel

MAX_WINDOW = 16        # the block's rows plus the convs' row halo
MAX_REACH = 16         # how far a conv reaches along the keys, either side (its taps are unrolled)
MAX_HEADS = 16         # heads a program holds (whole mixing groups)


def _group(w):
    return 1 if w is None else w.shape[1]


def heads_per_program(pre_mix, post_mix) -> int:
    """NH: a program holds whole mixing groups of both mixes, so the lcm of their sizes."""
    return math.lcm(_group(pre_mix), _group(post_mix))


def _reach(w, pad_key) -> int:
    """How far a conv of w (H, cq, ck) reaches along the keys on either side (0 without it)."""
    if w is None:
        return 0
    pl = left_pad(w.shape[2], pad_key)
    return max(pl, w.shape[2] - 1 - pl)


def decode_applies(Lq: int, weights, pad_key: str) -> bool:
    """Whether the fused decode step takes a block of Lq rows with these weights: the rows and
    the convs' row halo fit one tile, each conv reaches at most MAX_REACH keys either side, and a
    program can hold the mixing groups."""
    pre_conv, pre_mix, post_conv, post_mix = weights
    halo = sum(w.shape[1] - 1 for w in (pre_conv, post_conv) if w is not None)
    return (halo + Lq <= MAX_WINDOW and max(_reach(pre_conv, pad_key), _reach(post_conv, pad_key)) <= MAX_REACH
            and heads_per_program(pre_mix, post_mix) <= MAX_HEADS)


def block_diagonal(w, H: int, NH: int):
    """(G, ch, ch) mixing weight -> (H // NH, NH, NH) fp32: the mixing matrix restricted to each
    block of NH heads (NH a multiple of ch), zero across groups."""
    ch = w.shape[1]
    if ch == NH:
        return w.float().contiguous()
    heads = torch.arange(H, device=w.device).view(H // NH, NH)
    g, o = heads // ch, heads % ch
    block = w.float()[g[:, :, None], o[:, :, None], o[:, None, :]]
    return torch.where(g[:, :, None] == g[:, None, :], block, torch.zeros((), device=w.device)).contiguous()


def _split_count(programs: int, tiles: int, device) -> int:
    """Key ranges per (batch element, head block): about two programs per SM, each >= 1 tile."""
    sms = configs.sm_count(device) if device.type == "cuda" else 4
    return max(1, min(tiles, cdiv(2 * sms, programs)))


def mta_decode_fwd(q, k, v, weights, q_prev, lens, *, causal: bool, pad_key: str, scale: float):
    """The block's output (B, H, Lq, D) in q's dtype: q (B, H, Lq, D), the last Lq positions of
    sequences of lens[b] keys (lens (B,) int32 on q's device, or None: all Lk) of k, v (B, Hkv,
    Lk, D); q_prev (B, H, P >= halo, D) the queries before the block (None without convs)."""
    pre_conv, pre_mix, post_conv, post_mix = weights
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rep = H // Hkv
    halo = sum(w.shape[1] - 1 for w in (pre_conv, post_conv) if w is not None)
    if halo:
        # the halo rows above the block; where q_prev is shorter, the block starts the sequence
        # and the missing rows lie at negative positions, which the kernels never read
        above = q_prev[:, :, max(0, q_prev.shape[2] - halo):]
        missing = halo - above.shape[2]
        qx = torch.cat([above.new_zeros(B, H, missing, D), above, q] if missing else [above, q], dim=2)
    else:
        qx = q
    W = halo + Lq
    # the window's scores, k read once: query heads of one kv head as rows of one matrix
    qg = qx.reshape(B * Hkv, rep * W, D)
    kt = k.flatten(0, 1).transpose(1, 2)
    if q.is_cuda:
        s = torch.bmm(qg, kt, out_dtype=torch.float32)
    else:
        s = torch.bmm(qg.float(), kt.float())
    NH = heads_per_program(pre_mix, post_mix)
    NHP = padded(NH)
    n_blocks = H // NH
    dev = q.device
    placeholder = torch.empty(1, device=dev)       # the pointer of an absent part, never read

    def conv(w):
        if w is None:
            return placeholder, 1, 1, 0
        return w.float().contiguous(), w.shape[1], w.shape[2], left_pad(w.shape[2], pad_key)

    w_pre, cq, ck, pl = conv(pre_conv)
    w_post, cq2, ck2, pl2 = conv(post_conv)
    m_pre = placeholder if pre_mix is None else block_diagonal(pre_mix, H, NH)
    m_post = placeholder if post_mix is None else block_diagonal(post_mix, H, NH)
    lens_arg = placeholder if lens is None else lens
    # M: the logits of the rows the post conv reads, window rows cq-1 .. W-1
    NR = W - (cq - 1)
    RP, LQP = next_pow2(NR), next_pow2(Lq)
    BN, BN2 = (max(16, min(256, next_pow2(4096 // (NHP * rows)))) for rows in (RP, LQP))
    ns = _split_count(B * n_blocks, cdiv(Lk, BN), dev)
    ns2 = _split_count(B * n_blocks, cdiv(Lk, BN2), dev)
    m = torch.empty(B, H, NR, Lk, device=dev, dtype=torch.float32)
    stats = torch.empty(ns, 2, B, H, RP, device=dev, dtype=torch.float32)
    lse_scratch = torch.empty(ns2 * B * n_blocks * NHP * RP, device=dev, dtype=torch.float32)
    a = torch.empty(B, H, Lq, Lk, device=dev, dtype=v.dtype if q.is_cuda else torch.float32)
    common = dict(HAS_LENS=lens is not None, CAUSAL=causal, NR=NR, RP=RP, NH=NH, NHP=NHP, PREC=dot_precision(q),
                  num_warps=8, num_stages=1)     # pipelining would stage every tap's tile in shared memory
    decode_logits_kernel[(ns, B * n_blocks)](
        s, lens_arg, w_pre, m_pre, m, stats, W, Lk, H, scale, n_blocks, PRE_CONV=pre_conv is not None,
        PRE_MIX=pre_mix is not None, CQ=cq, CK=ck, PL=pl, BN=BN, **common)
    decode_weights_kernel[(ns2, B * n_blocks)](
        m, lens_arg, stats, lse_scratch, w_post, m_post, a, W, Lk, H, n_blocks, ns, POST_CONV=post_conv is not None,
        POST_MIX=post_mix is not None,
        CQ0=cq, CQ2=cq2, CK2=ck2, PL2=pl2, LQ=Lq, LQP=LQP, BN=BN2, **common)
    a = a.view(B * Hkv, rep * Lq, Lk)
    vf = v.flatten(0, 1)
    out = torch.bmm(a, vf) if a.dtype == vf.dtype else torch.bmm(a, vf.float())
    return out.view(B, H, Lq, D).to(q.dtype)
