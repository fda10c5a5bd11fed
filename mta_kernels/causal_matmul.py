"""The two matmuls of a causal slab that skip the tiles in every row's future.

Talking heads' row-chunked forward makes, per chunk of rows [r0, r1), the scores S = Q K^T
over keys [0, r1) and, after the mix-softmax, A V. As batched matmuls (cuBLAS) both run over
the whole rectangle, though for the last rows' chunk at L=4096 a quarter of it, and for the
first rows' chunk half, lies in the causal future (key j > row i): a third of both matmuls
and of the slab bytes they write and read. Here

    causal_scores:  S[h, i, j] = sum_d x[h, i, d] y[h, j, d]   tiles with a key <= i + zero_above
    causal_pv:      out[h, i, :] = sum_{j <= i + zero_above} a[h, i, j] y[h, j, :]

skip those tiles: causal_scores leaves the skipped tiles of S unwritten (what reads S masks
the future, reading up to slab_mix.load_end, which stays in a written tile), and causal_pv
reads a only where a key is in a row's past (its future may hold anything, NaN included).
"""
import torch
import triton
import triton.language as tl

from .forward import _next_pow2, cdiv, tl_acc_dtype

# Tiles [BM, BN] and warps; BD: the head dim's step in causal_scores.
SCORES_CONFIG = dict(BM=128, BN=64, BD=64, num_warps=4, num_stages=3)
PV_CONFIG = dict(BM=64, BN=64, num_warps=4, num_stages=3)


@triton.jit
def causal_scores_kernel(x, y, out, sxh, sxi, sxd, syh, syj, syd, soh, soi, soj, R, K, D, ZERO_ABOVE,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr):
    """out (H, R, K) = x (H, R, D) y (H, K, D)^T per head, in out's dtype with sums in ACC;
    the tiles whose first key is past the block's last row's last key (i + ZERO_ABOVE) are not
    written (ZERO_ABOVE >= K: none skipped). Grid (cdiv(R, BM), cdiv(K, BN), H)."""
    m, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if n * BN <= m * BM + BM - 1 + ZERO_ABOVE:
        rows = m * BM + tl.arange(0, BM)
        cols = n * BN + tl.arange(0, BN)
        ds = tl.arange(0, BD)
        x_at = x + h.to(tl.int64) * sxh + rows[:, None].to(tl.int64) * sxi
        y_at = y + h.to(tl.int64) * syh + cols[:, None].to(tl.int64) * syj
        acc = tl.zeros([BM, BN], dtype=ACC)
        for d0 in range(0, D, BD):
            d_ok = d0 + ds < D
            xs = tl.load(x_at + (d0 + ds)[None, :] * sxd, mask=(rows[:, None] < R) & d_ok[None, :], other=0.0)
            ys = tl.load(y_at + (d0 + ds)[None, :] * syd, mask=(cols[:, None] < K) & d_ok[None, :], other=0.0)
            if UPCAST:
                xs, ys = xs.to(ACC), ys.to(ACC)
            acc += tl.dot(xs, tl.trans(ys), input_precision=PREC)
        o_at = out + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * soi + cols[None, :] * soj
        tl.store(o_at, acc.to(out.dtype.element_ty), mask=(rows[:, None] < R) & (cols[None, :] < K))


@triton.jit
def causal_pv_kernel(a, y, out, sah, sai, saj, syh, syj, syd, soh, soi, sod, R, K, D, ZERO_ABOVE,
                     CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
                     ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """out (H, R, D) = a (H, R, K) y (H, K, D) per head, in out's dtype with sums in ACC; with
    CAUSAL, a[h, i, j] counts as zero for j > i + ZERO_ABOVE and is not read past the row
    block's last key. DP: D rounded up to a power of two >= 16. Grid (cdiv(R, BM), H)."""
    m, h = tl.program_id(0), tl.program_id(1)
    rows = m * BM + tl.arange(0, BM)
    ds = tl.arange(0, DP)
    a_at = a + h.to(tl.int64) * sah + rows[:, None].to(tl.int64) * sai
    y_at = y + h.to(tl.int64) * syh + ds[None, :] * syd
    last = K
    if CAUSAL:
        last = tl.minimum(K, m * BM + BM + ZERO_ABOVE)     # keys [0, last) reach a row of the block
    acc = tl.zeros([BM, DP], dtype=ACC)
    for n0 in range(0, last, BN):
        cols = n0 + tl.arange(0, BN)
        at = tl.load(a_at + cols[None, :] * saj, mask=(rows[:, None] < R) & (cols[None, :] < K), other=0.0)
        if CAUSAL:
            at = tl.where(cols[None, :] <= rows[:, None] + ZERO_ABOVE, at, 0.0)
        ys = tl.load(y_at + cols[:, None].to(tl.int64) * syj, mask=(cols[:, None] < K) & (ds[None, :] < D), other=0.0)
        if UPCAST:
            at, ys = at.to(ACC), ys.to(ACC)
        acc += tl.dot(at, ys, input_precision=PREC)
    o_at = out + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * soi + ds[None, :] * sod
    tl.store(o_at, acc.to(out.dtype.element_ty), mask=(rows[:, None] < R) & (ds[None, :] < D))


def _check_zero_above(zero_above):
    if zero_above is not None and zero_above < 0:
        raise ValueError(f"zero_above must be >= 0 (every row keeps its first key), got {zero_above}")


def _dot_precision(x, precision):
    return "ieee" if x.dtype == torch.float64 else precision


def _upcast(x) -> bool:
    """16-bit operands go to the dot in fp32 off the GPU: the interpreter's bf16 tl.dot is wrong
    (the products of 16-bit values are exact in fp32 either way)."""
    return x.device.type != "cuda" and x.element_size() == 2


def causal_scores(x: torch.Tensor, y: torch.Tensor, zero_above=None, precision="ieee", out=None) -> torch.Tensor:
    """x (H, R, D) times y (H, K, D) transposed, per head: (H, R, K) in x's dtype (or ``out``,
    any strides), sums in fp32 (fp64 for fp64). With zero_above (a causal slab of rows lo.. has zero_above = lo),
    tiles lying wholly where col - row > zero_above are skipped and left unwritten; the rest
    of the result is exact. precision: tl.dot's for fp32 inputs ("tf32" or "ieee")."""
    H, R, D = x.shape
    K = y.shape[1]
    if y.shape[0] != H or y.shape[2] != D:
        raise ValueError(f"y must be ({H}, K, {D}) for x {tuple(x.shape)}, got {tuple(y.shape)}")
    _check_zero_above(zero_above)
    out = torch.empty(H, R, K, device=x.device, dtype=x.dtype) if out is None else out
    if out.shape != (H, R, K):
        raise ValueError(f"out must be ({H}, {R}, {K}), got {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    cfg = SCORES_CONFIG
    grid = (cdiv(R, cfg["BM"]), cdiv(K, cfg["BN"]), H)
    causal_scores_kernel[grid](
        x, y, out, *x.stride(), *y.stride(), *out.stride(), R, K, D, K if zero_above is None else zero_above,
        BM=cfg["BM"], BN=cfg["BN"], BD=min(cfg["BD"], max(16, _next_pow2(D))), ACC=tl_acc_dtype(x),
        PREC=_dot_precision(x, precision), UPCAST=_upcast(x), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def causal_pv(a: torch.Tensor, y: torch.Tensor, out: torch.Tensor, zero_above=None, precision="ieee") -> torch.Tensor:
    """out (H, R, D), any strides and dtype, = a (H, R, K) times y (H, K, D) per head, sums in
    fp32 (fp64 for fp64); with zero_above, a counts as zero where col - row > zero_above, whatever it holds
    there (causal_scores' skipped tiles, or a mix-softmax that left the future unwritten).
    precision: tl.dot's for fp32 inputs. Returns out."""
    H, R, K = a.shape
    D = y.shape[2]
    if y.shape[:2] != (H, K) or out.shape != (H, R, D):
        raise ValueError(f"y must be ({H}, {K}, D) and out ({H}, {R}, D) for a {tuple(a.shape)}, got "
                         f"{tuple(y.shape)} and {tuple(out.shape)}")
    _check_zero_above(zero_above)
    if out.numel() == 0:
        return out
    cfg = PV_CONFIG
    BM = cfg["BM"] if D <= 128 else cfg["BM"] // 2
    causal_pv_kernel[(cdiv(R, BM), H)](
        a, y, out, *a.stride(), *y.stride(), *out.stride(), R, K, D, 0 if zero_above is None else zero_above,
        CAUSAL=zero_above is not None, BM=BM, BN=cfg["BN"], DP=max(16, _next_pow2(D)), ACC=tl_acc_dtype(a),
        PREC=_dot_precision(a, precision), UPCAST=_upcast(a), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
