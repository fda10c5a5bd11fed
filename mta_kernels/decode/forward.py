"""Host side of the fused decode step (kernels.py): a query block of a few rows at the end of
long sequences, forward only, with each sequence's key count read on the device (no host
synchronisation, so a decode step can be captured in a CUDA graph)."""
import math

import torch

from mta_reference.validate import left_pad

from .. import configs
from ..utils import cdiv, dot_precision, next_pow2, padded
from .kernels import decode_probs_kernel, decode_stats_kernel

MAX_WINDOW = 16        # the block's rows plus the convs' row halo
MAX_REACH = 16         # how far the pre conv reaches along the keys, either side
MAX_POST_REACH = 8     # how far the post conv does (its halo widens every frame of every head)
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
    the convs' row halo fit one tile, the pre conv reaches at most MAX_REACH keys either side and
    the post conv MAX_POST_REACH, and a program can hold the mixing groups."""
    pre_conv, pre_mix, post_conv, post_mix = weights
    halo = sum(w.shape[1] - 1 for w in (pre_conv, post_conv) if w is not None)
    return (halo + Lq <= MAX_WINDOW and _reach(pre_conv, pad_key) <= MAX_REACH
            and _reach(post_conv, pad_key) <= MAX_POST_REACH and heads_per_program(pre_mix, post_mix) <= MAX_HEADS)


def key_tiles(post_reach: int):
    """(BN, PH): the keys a program's tile owns and the columns beside them that the post conv
    reads (0 without one), with the frame width PW = BN + 2 PH a power of two (tl.arange). The
    frames of all NH heads pass through tl.dot as one [NH, WP * PW] operand: PW = 32 keeps it
    within an SM's shared memory (64 overflowed it with a 16-head mix)."""
    return (32, 0) if post_reach == 0 else (16, MAX_POST_REACH)


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
    n_blocks = H // NH
    dev = q.device
    BN, PH = key_tiles(_reach(post_conv, pad_key))
    PW = BN + 2 * PH
    SH = _reach(pre_conv, pad_key)
    SW = next_pow2(PW + 2 * SH)
    WP = padded(W)
    NHP = padded(NH)
    ns = _split_count(B * n_blocks, cdiv(Lk, BN), dev)
    stats = torch.empty(ns, 2, B, H, WP, device=dev, dtype=torch.float32)
    scratch = torch.empty(ns * B * n_blocks * 2 * NHP * WP * PW, device=dev, dtype=torch.float32)
    a_out = torch.zeros(B, H, Lq, Lk, device=dev, dtype=torch.float32)
    placeholder = torch.zeros(1, device=dev)

    def conv(w):
        return (placeholder, 1, 1, 0) if w is None else (w.float().contiguous(), w.shape[1], w.shape[2],
                                                         left_pad(w.shape[2], pad_key))

    w_pre, cq, ck, pl = conv(pre_conv)
    w_post, cq2, ck2, pl2 = conv(post_conv)
    m_pre = placeholder if pre_mix is None else block_diagonal(pre_mix, H, NH)
    m_post = placeholder if post_mix is None else block_diagonal(post_mix, H, NH)
    lens_arg = placeholder if lens is None else lens
    common = dict(HAS_LENS=lens is not None, CAUSAL=causal, PRE_CONV=pre_conv is not None, PRE_MIX=pre_mix is not None,
                  CQ=cq, CK=ck, PL=pl, NH=NH, NHP=NHP, WP=WP, BN=BN, PW=PW, PH=PH, SH=SH, SW=SW,
                  PREC=dot_precision(q), num_warps=8)
    grid = (ns, B * n_blocks)
    decode_stats_kernel[grid](s, lens_arg, w_pre, m_pre, stats, scratch, W, Lk, H, scale, n_blocks, **common)
    decode_probs_kernel[grid](s, lens_arg, w_pre, m_pre, w_post, m_post, stats, scratch, a_out, W, Lk, H, scale,
                              n_blocks, Lq, POST_CONV=post_conv is not None, POST_MIX=post_mix is not None,
                              CQ2=cq2, CK2=ck2, PL2=pl2, **common)
    a = a_out.view(B * Hkv, rep * Lq, Lk)
    vf = v.flatten(0, 1)
    out = torch.bmm(a.to(v.dtype), vf) if q.is_cuda or v.dtype == torch.float32 else torch.bmm(a, vf.float())
    return out.view(B, H, Lq, D).to(q.dtype)
