"""The two matmuls of a causal slab of talking heads, skipping the tiles in every row's future,
with tiles moved by the Hopper copy engine (TMA tensor descriptors).

Talking heads' row-chunked forward makes, per chunk of rows [r0, r1), the scores S = Q K^T
over keys [0, r1) and, after the mix-softmax, A V. As batched cuBLAS matmuls both run over
the whole rectangle, of which a third lies in the causal future (key j > row i) at L=4096 in
two chunks. Here

    causal_scores:  S[h, i, j] = sum_d x[h, i, d] y[h / rep, j, d]   tiles with a key <= i + zero_above
    causal_pv:      out[h, i, :] = sum_{j <= i + zero_above} a[h, i, j] y[h / rep, j, :]

skip those tiles: causal_scores leaves the skipped tiles of S unwritten (what reads S masks
the future, reading up to slab_mix.load_end, which stays in a written tile), and causal_pv
reads ``a`` only up to each row block's last key and selects zero past a row's own (the
future may hold anything, NaN included). ``rep`` > 1 reads the kv heads of GQA in place.

Session 19 (notes/causalmm_h200_6b2952e.log) had these with pointer loads and stores: the
tiles ran at half cuBLAS's speed (the score tiles' stores, 4 bytes per thread from the MMA
layout), losing the third they saved. Descriptors store a tile from shared memory in one
bulk copy and load the operands asynchronously, as cuBLAS does.

Descriptors need 16-byte aligned bases and strides and a unit last stride: ``tma_ok`` says
whether tensors qualify (callers keep the batched matmuls where they do not), and
``scores_buffer`` allocates S with its rows padded to 16 bytes.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .forward import _next_pow2, cdiv, tl_acc_dtype

# Tiles [BM, BN], warps and stages for 16-bit operands up to D=128; TILES: the key tiles a
# scores program makes. H200, B=1, H=16, L=4096 in one chunk, bf16 (scripts/causal_matmul_tune.py
# one, notes/causal_tune_one_h200_*.log): scores 0.117 ms with 4 tiles per program (1: 0.132, 8:
# 0.122, pipelined over the tiles 0.172; cuBLAS over the rectangle 0.175); A V 0.100 with 5 stages
# (4: 0.108, 3: 0.127; BM=64 with 4 warps and 4 stages 0.101; cuBLAS 0.153).
SCORES_CONFIG = dict(BM=128, BN=128, TILES=4, num_warps=4, num_stages=1)
PV_CONFIG = dict(BM=128, BN=64, num_warps=8, num_stages=5)
# shared memory the operand tiles may take (the H200 has 227 KB per block; the rest is slack
# for the compiler's own buffers)
SMEM_BYTES = 160 * 1024


def scores_tiles(itemsize, DP):
    """(BM, BN) of causal_scores for operands of ``itemsize`` bytes and head dim DP: the config's,
    halved in both for operands wider than 256 bytes a row (fp32 beyond D=64, 16-bit beyond 128),
    whose tiles with the output's would outgrow shared memory."""
    cfg = SCORES_CONFIG
    wide = itemsize * DP > 256
    return (cfg["BM"] // 2, cfg["BN"] // 2) if wide else (cfg["BM"], cfg["BN"])


def pv_tiles(itemsize, DP):
    """(BM, BN, stages) of causal_pv: the config's, BM halved beyond D=128, and as many stages
    (2 at least) as SMEM_BYTES holds of an A tile and a V tile."""
    cfg = PV_CONFIG
    BM, BN = (cfg["BM"] if DP <= 128 else cfg["BM"] // 2), cfg["BN"]
    stage = (BM * BN + BN * DP) * itemsize
    return BM, BN, max(2, min(cfg["num_stages"], SMEM_BYTES // stage))


def tma_ok(*tensors) -> bool:
    """Whether every tensor can be read or written through a TMA descriptor: unit last stride,
    16-byte aligned base and other strides (on CUDA; the interpreter takes any layout)."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def scores_buffer(H, R, K, dtype, device) -> torch.Tensor:
    """An (H, R, K) tensor whose rows are padded to 16 bytes (for causal_scores' descriptor)."""
    per16 = 16 // torch.empty((), dtype=dtype).element_size()
    return torch.empty(H, R, cdiv(K, per16) * per16, device=device, dtype=dtype)[:, :, :K]


def _descriptor(t: torch.Tensor, block) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


@triton.jit
def causal_scores_kernel(x_desc, y_desc, s_desc, X_ROW0, R, K, ZERO_ABOVE, REP, N_BLOCKS, N_GROUPS,
                         BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, TILES: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr):
    """s (H, R, K) = x[:, X_ROW0:X_ROW0 + R] y^T per head (x (H, L, D), y (Hkv, K', D), head h
    reading kv head h // REP), in s's dtype with fp32 sums (fp64 for fp64); the tiles whose first
    key is past the block's last row's last key (i + ZERO_ABOVE) are not written. A program
    makes up to TILES consecutive key tiles of one row block, its x tile loaded once. Grid
    (cdiv(R, BM) * N_GROUPS, H), N_GROUPS = cdiv(N_BLOCKS, TILES), N_BLOCKS = cdiv(K, BN)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    m, group = pid // N_GROUPS, pid % N_GROUPS
    n_end = tl.minimum(N_BLOCKS, (m * BM + BM - 1 + ZERO_ABOVE) // BN + 1)   # tiles [0, n_end) reach the past
    n_lo = group * TILES
    if n_lo < n_end:
        xs = x_desc.load([h, X_ROW0 + m * BM, 0]).reshape(BM, DP)
        if UPCAST:
            xs = xs.to(tl.float32)
        for n in range(n_lo, tl.minimum(n_end, n_lo + TILES)):
            ys = y_desc.load([h // REP, n * BN, 0]).reshape(BN, DP)
            if UPCAST:
                ys = ys.to(tl.float32)
            s = tl.dot(xs, tl.trans(ys), input_precision=PREC)
            s_desc.store([h, m * BM, n * BN], s.to(s_desc.dtype).reshape(1, BM, BN))


@triton.jit
def causal_pv_kernel(a_desc, y_desc, out, soh, soi, sod, R, K, D, ZERO_ABOVE, REP, CAUSAL: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr):
    """out (H, R, D) = a (H, R, K) y[:, :K] per head (y (Hkv, L, D), head h reading kv head
    h // REP), in out's dtype with fp32 sums (fp64 for fp64); with CAUSAL, a[h, i, j] counts as
    zero for j > i + ZERO_ABOVE and is not read past the row block's last key. ACC: the sums'
    dtype. Grid (cdiv(R, BM), H), the longest rows first."""
    m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    rows = m * BM + tl.arange(0, BM)
    last = K
    past = K           # key blocks [0, past) lie in the past of every row of the block
    if CAUSAL:
        last = tl.minimum(K, m * BM + BM + ZERO_ABOVE)
        past = tl.minimum(K, (m * BM + ZERO_ABOVE + 1) // BN * BN)
    acc = tl.zeros([BM, DP], dtype=ACC)
    for n0 in range(0, past, BN):
        at = a_desc.load([h, m * BM, n0]).reshape(BM, BN)
        ys = y_desc.load([h // REP, n0, 0]).reshape(BN, DP)
        if UPCAST:
            at, ys = at.to(tl.float32), ys.to(tl.float32)
        acc += tl.dot(at, ys, input_precision=PREC)
    for n0 in range(past, last, BN):
        cols = n0 + tl.arange(0, BN)
        at = a_desc.load([h, m * BM, n0]).reshape(BM, BN)
        at = tl.where((cols[None, :] <= rows[:, None] + ZERO_ABOVE) & (cols[None, :] < K), at, 0.0)
        ys = y_desc.load([h // REP, n0, 0]).reshape(BN, DP)
        if UPCAST:
            at, ys = at.to(tl.float32), ys.to(tl.float32)
        acc += tl.dot(at, ys, input_precision=PREC)
    ds = tl.arange(0, DP)
    o_at = out + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * soi + ds[None, :] * sod
    tl.store(o_at, acc.to(out.dtype.element_ty), mask=(rows[:, None] < R) & (ds[None, :] < D))


def _check(zero_above, x, y, name):
    if zero_above is not None and zero_above < 0:
        raise ValueError(f"zero_above must be >= 0 (every row keeps its first key), got {zero_above}")
    if x.shape[0] % y.shape[0]:
        raise ValueError(f"{name}'s heads ({y.shape[0]}) must divide the {x.shape[0]} heads")


def _dot_options(x: torch.Tensor, precision):
    """tl.dot's precision, and whether 16-bit operands go to the dot in fp32: under the
    interpreter bf16 tl.dot is wrong (the products of 16-bit values are exact in fp32)."""
    prec = "ieee" if x.dtype == torch.float64 else precision
    return prec, x.device.type != "cuda" and x.element_size() == 2


def causal_scores(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, row0=0, zero_above=None,
                  precision="ieee") -> torch.Tensor:
    """out (H, R, K) = x[:, row0:row0 + R] (x (H, L, D)) times y[:, :K] (y (Hkv, >= K, D))
    transposed, per head (head h takes kv head h // (H // Hkv)), sums in fp32 (fp64 for fp64),
    in out's dtype. With zero_above (a causal slab of rows lo.. has zero_above = lo), tiles lying
    wholly where col - row > zero_above are skipped and left unwritten; the rest is exact.
    precision: tl.dot's for fp32 inputs ("tf32" or "ieee"). All three must pass tma_ok (out
    from scores_buffer does). Returns out."""
    H, R, K = out.shape
    D = x.shape[2]
    if x.shape[0] != H or y.shape[2] != D or y.shape[1] < K or x.shape[1] < row0 + R:
        raise ValueError(f"x must be ({H}, >= {row0 + R}, D) and y (Hkv, >= {K}, D) for out {tuple(out.shape)}, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    _check(zero_above, x, y, "y")
    if out.numel() == 0:
        return out
    cfg = SCORES_CONFIG
    DP = max(16, _next_pow2(D))
    BM, BN = scores_tiles(x.element_size(), DP)
    prec, upcast = _dot_options(x, precision)
    n_blocks = cdiv(K, BN)
    n_groups = cdiv(n_blocks, cfg["TILES"])
    causal_scores_kernel[(cdiv(R, BM) * n_groups, H)](
        _descriptor(x, (1, BM, DP)), _descriptor(y, (1, BN, DP)), _descriptor(out, (1, BM, BN)), row0, R, K,
        K if zero_above is None else zero_above, H // y.shape[0], n_blocks, n_groups, BM=BM, BN=BN, DP=DP,
        TILES=cfg["TILES"], PREC=prec, UPCAST=upcast, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def causal_pv(a: torch.Tensor, y: torch.Tensor, out: torch.Tensor, zero_above=None, precision="ieee") -> torch.Tensor:
    """out (H, R, D), any strides and dtype, = a (H, R, K) times y[:, :K] (y (Hkv, >= K, D)) per
    head (head h takes kv head h // (H // Hkv)), sums in fp32 (fp64 for fp64); with zero_above,
    a counts as zero where col - row > zero_above, whatever it holds there (causal_scores'
    skipped tiles, or a mix-softmax that left the future unwritten). precision: tl.dot's for
    fp32 inputs. a and y must pass tma_ok. Returns out."""
    H, R, K = a.shape
    D = y.shape[2]
    if y.shape[1] < K or out.shape != (H, R, D):
        raise ValueError(f"y must be (Hkv, >= {K}, D) and out ({H}, {R}, D) for a {tuple(a.shape)}, got "
                         f"{tuple(y.shape)} and {tuple(out.shape)}")
    _check(zero_above, a, y, "y")
    if out.numel() == 0:
        return out
    cfg = PV_CONFIG
    DP = max(16, _next_pow2(D))
    BM, BN, stages = pv_tiles(a.element_size(), DP)
    prec, upcast = _dot_options(a, precision)
    causal_pv_kernel[(cdiv(R, BM), H)](
        _descriptor(a, (1, BM, BN)), _descriptor(y, (1, BN, DP)), out, *out.stride(), R, K, D,
        0 if zero_above is None else zero_above, H // y.shape[0], CAUSAL=zero_above is not None, BM=BM, BN=BN,
        DP=DP, ACC=tl_acc_dtype(a), PREC=prec, UPCAST=upcast, num_warps=cfg["num_warps"], num_stages=stages)
    return out
