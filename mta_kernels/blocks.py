"""A query block at the end of each sequence (chunked prefill and decoding), forward only.

q (B, H, Lq, D) holds the last Lq positions of sequences whose keys are k, v (B, Hkv, Lk, D)
(or the first seqlens[b] of them); q_prev holds the queries just before the block, whose
scores the convs read. The block runs as its own short sequence of rows over all the keys,
with those earlier rows prepended as the convs' halo.
"""
import torch

from .autograd import flash_scale
from .decode import mta_decode_fwd
from .flash import flash_fwd, sdpa, sdpa_block
from .mta.forward import mta_chunked_fwd
from .options import Options
from .utils import captured_on_device

# Plain attention takes a ragged block of up to this many rows in one SDPA call with a mask made
# on the device (Lq x Lk per sequence); longer blocks run each length group on its own.
MASKED_SDPA_ROWS = 16


def _length_groups(lens, B):
    """[(n, batch indices)] for sequences of n keys; one group of all B (n None) without lens."""
    if lens is None:
        return [(None, list(range(B)))]
    groups = {}
    for b, n in enumerate(lens):
        groups.setdefault(n, []).append(b)
    return sorted(groups.items())


def block_forward(q, k, v, weights, *, causal: bool, pad_key: str, scale: float, q_prev, seqlens, halo: int,
                  path: str, options: Options):
    """The block's output (B, H, Lq, D) in q's dtype. seqlens: each sequence's key count ((B,)
    ints), or None for all Lk; halo: the convs' row halo (cq-1)+(cq'-1); path: the dispatcher's
    ('decode', 'sdpa', 'flash' or 'chunked'). The decode path, and SDPA for blocks of up to
    MASKED_SDPA_ROWS rows, read seqlens on the device; the others run each group of equally long
    sequences on its own, which reads seqlens on the host and so cannot be captured in a CUDA graph."""
    if path == "decode":
        lens = None if seqlens is None else seqlens.to(device=q.device, dtype=torch.int32, non_blocking=True)
        return mta_decode_fwd(q, k, v, weights, q_prev, lens, causal=causal, pad_key=pad_key, scale=scale)
    if path == "sdpa" and seqlens is not None and q.shape[2] <= MASKED_SDPA_ROWS:
        return sdpa_block(q, k, v, seqlens.to(q.device, non_blocking=True), causal, scale)
    if captured_on_device(seqlens):
        raise RuntimeError(f"seqlens: the {path!r} path reads each sequence's length on the host, which a CUDA "
                           f"graph cannot capture; only the fused decode step and plain attention of at most "
                           f"{MASKED_SDPA_ROWS} rows take seqlens on the device")
    lens = None if seqlens is None else seqlens.tolist()
    B, H, Lq, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for n, idx in _length_groups(lens, B):
        pick = slice(None) if n is None else torch.tensor(idx, device=q.device)
        keys = slice(None) if n is None else slice(0, n)
        qb, kb, vb = q[pick], k[pick][:, :, keys], v[pick][:, :, keys]
        Lk = kb.shape[2]
        if path == "sdpa":
            ob = sdpa(qb, kb, vb, causal, scale)
        elif path == "flash":
            qs, s = flash_scale(qb, scale)
            ob = flash_fwd(qs, kb, vb, causal, s)[0]
        else:
            # the rows above the block the convs read, as far as the sequence has them
            above = min(halo, Lk - Lq)
            qx = torch.cat([q_prev[pick][:, :, q_prev.shape[2] - above:], qb], dim=2) if above else qb
            ob = mta_chunked_fwd(qx, kb, vb, weights, causal=causal, pad_key=pad_key, scale=scale,
                                 options=options, q_offset=Lk - Lq - above)[0][:, :, above:]
        out[pick] = ob
    return out
