"""Host side of the fused forward: block sizes, weight layouts, buffers and the two launches."""
import math

import torch
import triton.language as tl

from mta_reference.validate import left_pad
from .flash_kernels import flash_fwd_kernel
from .forward_kernels import mta_fwd_kernel
from .mix_kernels import mta_mix_fwd_kernel


# Mixing groups at least this large go to the register kernel (heads are padded to 16 there,
# so smaller groups would waste most of its work).
MIN_REGISTER_MIX_HEADS = 8
# [16, BM, D] tiles of every head must fit the H200's shared memory (checked for sm_90a with
# scripts/sm90_compile.py and tests/test_sm90_resources.py): the widest head dim (padded to a
# power of two) per input element size in bytes. On the H200, 16-bit D=96 and 128 run; fp32 D=24
# runs, while D=64 asked for 258 KB and D=96 for 394 KB of the 227 KB there (compiled for sm_90a,
# fp32 at 32 and twice 32 are checked in tests/test_sm90_resources.py); fp64 (gradchecks) scaled
# from fp32. Wider heads take the other paths.
MAX_REGISTER_MIX_DIM = {2: 128, 4: 32, 8: 16}


def uses_register_mixing(pre_conv, pre_mix, post_conv, post_mix, head_dim, itemsize=2) -> bool:
    """Head mixing without convs over blocks of >= MIN_REGISTER_MIX_HEADS heads whose dims,
    padded to a power of two, are at most MAX_REGISTER_MIX_DIM for inputs of ``itemsize``
    bytes: the register kernels of mix_kernels.py and mix_bwd_kernels.py."""
    if pre_conv is not None or post_conv is not None or (pre_mix is None and post_mix is None):
        return False
    fits = max(16, _next_pow2(head_dim)) <= MAX_REGISTER_MIX_DIM[itemsize]
    return heads_per_program(pre_mix, post_mix) >= MIN_REGISTER_MIX_HEADS and fits


def _precision(q) -> str:
    """tl.dot precision for fp32 operands: tf32 beside 16-bit inputs, exact fp32 otherwise."""
    return "tf32" if q.dtype in (torch.float16, torch.bfloat16) else "ieee"


def acc_dtype(q) -> torch.dtype:
    """Accumulators, statistics and weights inside the kernels: fp32, or fp64 for fp64 inputs
    (which exist for gradchecks under the interpreter)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def tl_acc_dtype(q):
    """acc_dtype(q) as a Triton dtype, for a kernel's accumulator argument."""
    return tl.float64 if acc_dtype(q) == torch.float64 else tl.float32


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's launch grids: plain integers (triton.cdiv is a constexpr
    function, whose call from Python unwraps its arguments: microseconds per launch on a
    path bound by its host time)."""
    return -(-a // b)


def _group_size(w) -> int:
    return 1 if w is None else w.shape[1]


def heads_per_program(pre_mix, post_mix) -> int:
    """NH: a program holds whole mixing groups of both mixes, so the lcm of their sizes."""
    return math.lcm(_group_size(pre_mix), _group_size(post_mix))


def block_mix_weights(pre_mix, post_mix, H, NH, dtype, device):
    """(pre, post) as (H // NH, NH, NH) block-diagonal weights; a placeholder where absent."""
    def block(w):
        return block_diagonal_mix(w, H, NH, dtype) if w is not None else torch.zeros(1, device=device)
    return block(pre_mix), block(post_mix)


def block_diagonal_mix(w: torch.Tensor, H: int, NH: int, dtype=torch.float32) -> torch.Tensor:
    """(G, ch, ch) mixing weight -> (H // NH, NH, NH) in ``dtype``: the mixing matrix
    restricted to each block of NH heads (NH a multiple of ch), zero across groups."""
    ch = w.shape[1]
    if ch == NH:   # one group per block (the usual case): the weight itself, no gather
        return w.to(dtype).contiguous()
    heads = torch.arange(H, device=w.device).view(H // NH, NH)
    g, o = heads // ch, heads % ch
    same_group = g[:, :, None] == g[:, None, :]
    block = w.to(dtype)[g[:, :, None], o[:, :, None], o[:, None, :]]
    return torch.where(same_group, block, torch.zeros((), device=w.device)).contiguous()


def _frame(length: int, halo: int) -> int:
    """Frame size along one axis: 64, or 128 when the convs' halo would take more than half
    of 64; never more than the sequence needs, never less than 16 (the smallest tl.dot)."""
    size = 64 if halo <= 32 else 128
    return max(16, min(size, _next_pow2(length + halo)))


def general_row_programs(q, pre_conv, pre_mix, post_conv, post_mix, RF=None) -> int:
    """Row-block programs of the general kernel's output pass for q (B, H, L, D), per key
    split: one per block of rows (RF rows less the convs' row halos, RF by default from
    _frame) and block of heads (heads_per_program)."""
    B, H, L, _ = q.shape
    halo_rows = sum(w.shape[1] - 1 for w in (pre_conv, post_conv) if w is not None)
    RF = RF or _frame(L, halo_rows)
    return cdiv(L, RF - halo_rows) * B * (H // heads_per_program(pre_mix, post_mix))


def mta_forward(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale, config=None):
    """Fused MTA forward. q: (B, H, L, D); k, v: (B, Hkv, L, D). Returns (out, lse):
    out (B, H, L, D) in q's dtype and lse (B, H, L) in acc_dtype(q), the log-sum-exp of each row of
    masked (pre-conv, pre-mix) logits. The backward needs lse to rebuild P = exp(M - lse)
    tile by tile without another statistics pass. config: optional dict overriding the
    general kernel's RF, W, num_warps and splits (key ranges per row block, see
    key_splits), or forcing it with general=True (for tuning)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    dev = q.device
    general = bool(config and config.get("general"))
    if not general and pre_conv is None and pre_mix is None and post_conv is None and post_mix is None:
        return flash_forward(q, k, v, causal, scale)
    if not general and uses_register_mixing(pre_conv, pre_mix, post_conv, post_mix, D, q.element_size()):
        return mix_forward(q, k, v, pre_mix, post_mix, causal, scale)
    NH = heads_per_program(pre_mix, post_mix)
    NHP = max(16, _next_pow2(NH))
    acc = acc_dtype(q)

    def conv_params(w):
        if w is None:
            return torch.zeros(1, device=dev), 1, 1, 0
        return w.to(acc).contiguous(), w.shape[1], w.shape[2], left_pad(w.shape[2], pad_key)

    w_pre, cq_pre, ck_pre, pl_pre = conv_params(pre_conv)
    w_post, cq_post, ck_post, pl_post = conv_params(post_conv)
    mix_pre, mix_post = block_mix_weights(pre_mix, post_mix, H, NH, acc, dev)

    halo_rows = (cq_pre - 1) + (cq_post - 1)
    halo_cols = (ck_pre - 1) + (ck_post - 1)
    # Short grids (mixing puts all heads of a block in one program) get parallelism from key
    # splits, not from shorter row frames, whose halos would waste more of each tile.
    # H200, full MTA, L=4096 (scripts/breakdown.py): RF=64 with 8 splits 14.4 ms, 4 splits
    # 16.7, 1 split 42.2; RF=32 with 8 splits 18.0.
    RF = _frame(L, halo_rows)
    W = _frame(L, halo_cols)
    num_warps = 4
    if config:
        RF, W, num_warps = config.get("RF", RF), config.get("W", W), config.get("num_warps", num_warps)
    DP = max(16, _next_pow2(D))
    DV = min(DP, 64)
    conv_prec = _precision(q)

    n_head_blocks = H // NH
    grid_rows = general_row_programs(q, pre_conv, pre_mix, post_conv, post_mix, RF)   # per split, pass 2
    n_splits = config.get("splits", None) if config else None
    if n_splits is None:
        n_splits = key_splits(grid_rows, cdiv(L, W - halo_cols))
    m_run = torch.full((n_splits, B, H, L), float("-inf"), device=dev, dtype=acc)
    l_run = torch.zeros(n_splits, B, H, L, device=dev, dtype=acc)
    # accumulated in memory unless one head without a post mix keeps it in registers
    in_registers = NH == 1 and post_mix is None
    o_acc = (torch.empty if in_registers else torch.zeros)(n_splits, B, H, L, D, device=dev, dtype=acc)

    common = dict(
        CAUSAL=causal,
        PRE_CONV=pre_conv is not None, PRE_MIX=pre_mix is not None,
        POST_CONV=post_conv is not None, POST_MIX=post_mix is not None,
        CQ_PRE=cq_pre, CK_PRE=ck_pre, PL_PRE=pl_pre, CQ_POST=cq_post, CK_POST=ck_post, PL_POST=pl_post,
        NH=NH, NHP=NHP, RF=RF, W=W, DP=DP, DV=DV, MIX_CHUNK=min(RF * W, 1024),
        QK_PREC=conv_prec, CONV_PREC=conv_prec, PV_PREC=conv_prec, num_warps=num_warps, num_stages=1,
    )
    lse = torch.empty(B, H, L, device=dev, dtype=acc)
    for is_stats in (True, False):
        rows_per_prog = RF - (cq_pre - 1) - (0 if is_stats else cq_post - 1)
        grid = (cdiv(L, rows_per_prog), B * n_head_blocks, n_splits)
        scratch = torch.empty(grid[0] * grid[1] * grid[2] * (NH + 2) * RF * W, device=dev, dtype=acc)
        mta_fwd_kernel[grid](
            q, k, v, lse, m_run, l_run, o_acc, scratch, w_pre, mix_pre, w_post, mix_post,
            *q.stride(), *k.stride(), *v.stride(),
            H, H // Hkv, L, D, scale, rows_per_prog, n_head_blocks, n_splits,
            IS_STATS=is_stats, **common)
        if is_stats:
            lse.copy_(_combine_lse(m_run, l_run))
    out = sum_splits(o_acc)
    return out.to(q.dtype), lse


# Programs the general kernel should have in flight: several per SM of an H200 (132 SMs).
TARGET_PROGRAMS = 8 * 132
MAX_KEY_SPLITS = 8


def key_splits(row_programs: int, key_tiles: int) -> int:
    """How many ranges to split each row block's keys into so that about TARGET_PROGRAMS
    programs run; 1 when the row blocks alone fill the GPU. Each split costs one fp32
    (B, H, L, D) output slab, so the count is capped at MAX_KEY_SPLITS (and at the number
    of key tiles)."""
    return split_count(row_programs, key_tiles, TARGET_PROGRAMS, MAX_KEY_SPLITS)


def _combine_lse(m_run, l_run):
    """lse (B, H, L) from per-split running max and sum (n_splits, B, H, L)."""
    m = m_run.amax(0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return m_safe + torch.log((l_run * torch.exp(m_run - m_safe)).sum(0))


def flash_forward(q, k, v, causal, scale, config=None):
    """Plain attention (no MTA part). Same contract as mta_forward: (out, lse).
    config: optional dict overriding BM, BN, num_warps, num_stages (for tuning)."""
    B, H, L, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, L, device=q.device, dtype=acc_dtype(q))
    DP = max(16, _next_pow2(D))
    # H200, L=4096, D=128, bf16 (scripts/tune.py): 64x64 with 4 warps 0.242 ms, 128x128 with
    # 8 warps 0.243, 128x64 with 8 warps 0.244, 128x64 with 4 warps 0.334.
    BM, BN = (64, 64) if DP <= 128 else (64, 32)
    if L <= 64:
        BM = BN = max(16, _next_pow2(L))
    cfg = dict(BM=BM, BN=BN, num_warps=4, num_stages=3)
    cfg.update(config or {})
    grid = (B * H, cdiv(L, cfg["BM"]))
    flash_fwd_kernel[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // k.shape[1], L, D, scale, CAUSAL=causal, DP=DP, PREC=_precision(q), **cfg)
    return out, lse


def mix_forward(q, k, v, pre_mix, post_mix, causal, scale, config=None):
    """Head mixing without convs, all heads of a block in registers. Returns (out, lse).
    config: optional dict overriding BM, BN, num_warps, num_stages and splits (key ranges
    per row block; by default more than one only for grids too short to fill the GPU, see
    mix_forward_splits)."""
    B, H, L, D = q.shape
    NH = heads_per_program(pre_mix, post_mix)
    NHP = max(16, _next_pow2(NH))
    dev = q.device
    acc = acc_dtype(q)
    mix_pre, mix_post = block_mix_weights(pre_mix, post_mix, H, NH, acc, dev)
    DP = max(16, _next_pow2(D))
    # H200, L=4096, H=16, D=128, bf16 (scripts/tune.py): 16x16 with 8 warps and 2 stages
    # 2.14 ms; 1 stage 2.69; 16x32 3.03; 32x16 3.62; 4 warps 5.92; 32x32 and 16x64 exceed
    # shared memory.
    cfg = dict(BM=16, BN=16, num_warps=8, num_stages=2)
    cfg.update(config or {})
    n_splits = cfg.pop("splits", None)
    n_rows = cdiv(L, cfg["BM"])
    if n_splits is None:
        n_splits = mix_forward_splits(n_rows * B * (H // NH), cdiv(L, cfg["BN"]))
    grid = (n_rows, B * (H // NH), n_splits)
    lse = torch.empty(B, H, L, device=dev, dtype=acc)
    if n_splits == 1:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        out_split, lse_split = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        out_split = torch.empty(n_splits, B, H, L, D, device=dev, dtype=acc)
        lse_split = torch.empty(n_splits, B, H, L, device=dev, dtype=acc)
    one_pass = post_mix is None
    # post-softmax mixing needs each row's lse first (pass 1); without it one pass does all
    for is_stats in ((False,) if one_pass else (True, False)):
        mta_mix_fwd_kernel[grid](
            q, k, v, out_split, lse, lse_split, mix_pre, mix_post,
            *q.stride(), *k.stride(), *v.stride(), *out_split.stride(),
            H, H // k.shape[1], L, D, scale, H // NH,
            IS_STATS=is_stats, ONE_PASS=one_pass, CAUSAL=causal,
            PRE_MIX=pre_mix is not None, POST_MIX=post_mix is not None,
            NH=NH, NHP=NHP, DP=DP, MIX_PREC=_precision(q), DOT_PREC=_precision(q), **cfg)
        if n_splits > 1 and (is_stats or one_pass):
            lse.copy_(torch.logsumexp(lse_split, 0))
    if n_splits == 1:
        return out, lse
    if one_pass:
        # each split's rows are normalised by its own sum: weight them by their share of the total
        share = torch.exp(lse_split - lse)
        out_split *= torch.where(torch.isneginf(lse_split), 0.0, share).unsqueeze(-1)
    return sum_splits(out_split).to(q.dtype), lse


# The register-mixing forward takes most of an SM's shared memory (one program per SM), so a
# grid that does not fill the H200's 132 SMs once splits each row block's keys into
# MIX_FWD_SPLITS ranges. H200, B=1, H=16, D=128, bf16, causal (scripts/tune.py mixsplits):
# L=2048 (128 row blocks) talking heads 0.854 ms with 1 split, 0.517 / 0.630 / 0.539 / 0.582
# with 2 / 3 / 4 / 8, pre_mix alone 0.549 ms, 0.839 / 0.843 / 0.425 / 0.519; L=4096 (256 row
# blocks): 1 split is fastest (1.648 ms against 1.676 with 4; pre_mix 1.043 against 1.208).
MIX_FWD_SPLIT_BELOW = 132
MIX_FWD_SPLITS = 4


def mix_forward_splits(programs: int, tiles: int) -> int:
    """Key ranges per row block of the talking-heads forward for a grid of ``programs`` row
    blocks of ``tiles`` key tiles: MIX_FWD_SPLITS when the grid is shorter than
    MIX_FWD_SPLIT_BELOW, else 1; never more than the tiles."""
    return 1 if programs >= MIX_FWD_SPLIT_BELOW else max(1, min(MIX_FWD_SPLITS, tiles))


def split_count(programs: int, tiles: int, target: int, cap: int) -> int:
    """Ranges to split each of ``programs`` programs' ``tiles`` tiles into so that about
    ``target`` programs run: at least 1, at most ``cap`` and ``tiles``."""
    want = cdiv(target, max(1, programs))
    return max(1, min(want, cap, tiles))


def sum_splits(partials: torch.Tensor) -> torch.Tensor:
    """Sum of (n_splits, ...) partial results over the splits, in order; no copy for one."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(0)
