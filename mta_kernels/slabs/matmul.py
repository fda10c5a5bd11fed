"""Host side of the slabs' matmuls: causal talking heads' score and A V kernels
(matmul_kernels.py), and the batched torch matmuls into dq, dk, dv.

causal_scores and causal_pv take (N, R, K) slabs whose N runs over flattened (batch, head)
pairs, with operands (N or N / rep, L, D) for rep query heads per kv head. Descriptors need
16-byte aligned bases and strides and a unit last stride: tma_ok says whether tensors
qualify (callers take torch.bmm where they do not), and scores_buffer allocates S with its
rows padded to 16 bytes.
"""
import contextlib

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import configs
from ..utils import acc_dtype, cdiv, dot_precision, next_pow2, operand_precision, tl_acc_dtype
from .matmul_kernels import causal_pv_kernel, causal_scores_kernel


def scores_tiles(itemsize, DP):
    """(BM, BN) of causal_scores for operands of ``itemsize`` bytes and head dim DP: the config's,
    halved in both for operands wider than 256 bytes a row (fp32 beyond D=64, 16-bit beyond 128),
    whose tiles with the output's would outgrow shared memory."""
    cfg = configs.CAUSAL_SCORES
    wide = itemsize * DP > 256
    return (cfg["BM"] // 2, cfg["BN"] // 2) if wide else (cfg["BM"], cfg["BN"])


def pv_tiles(itemsize, DP):
    """(BM, BN, stages) of causal_pv: the config's, BM halved beyond D=128, and as many stages
    (2 at least) as SMEM_BYTES holds of an A tile and a V tile."""
    cfg = configs.CAUSAL_PV
    BM, BN = (cfg["BM"] if DP <= 128 else cfg["BM"] // 2), cfg["BN"]
    stage = (BM * BN + BN * DP) * itemsize
    return BM, BN, max(2, min(cfg["num_stages"], configs.CAUSAL_SMEM_BYTES // stage))


def _tma_strides(t: torch.Tensor) -> list:
    """t's strides for a tensor descriptor: a dimension of size 1 is never stepped over, so its
    stride (which views may set to anything) is taken as the next dimension's extent rounded up
    to 16 bytes, as a row of a padded buffer would be."""
    strides = list(t.stride())
    per16 = max(1, 16 // t.element_size())
    for i in range(len(strides) - 2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = cdiv(t.shape[i + 1] * strides[i + 1], per16) * per16
    return strides


def tma_ok(*tensors) -> bool:
    """Whether every tensor can be read or written through a TMA descriptor: unit last stride,
    16-byte aligned base and other strides."""
    for t in tensors:
        size = t.element_size()
        strides = _tma_strides(t)
        if strides[-1] != 1 or t.data_ptr() % 16 or any((s * size) % 16 for s in strides[:-1]):
            return False
    return True


def scores_buffer(H, R, K, dtype, device) -> torch.Tensor:
    """An (H, R, K) tensor whose rows are padded to 16 bytes (for causal_scores' descriptor)."""
    per16 = 16 // torch.empty((), dtype=dtype).element_size()
    return torch.empty(H, R, cdiv(K, per16) * per16, device=device, dtype=dtype)[:, :, :K]


def _descriptor(t: torch.Tensor, block) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), _tma_strides(t), list(block))


def _check(zero_above, x, y, name):
    if zero_above is not None and zero_above < 0:
        raise ValueError(f"zero_above must be >= 0 (every row keeps its first key), got {zero_above}")
    if x.shape[0] % y.shape[0]:
        raise ValueError(f"{name}'s heads ({y.shape[0]}) must divide the {x.shape[0]} heads")


def _dot_options(x: torch.Tensor, precision):
    """tl.dot's precision, and whether 16-bit operands go to the dot in fp32: under the
    interpreter bf16 tl.dot is wrong (the products of 16-bit values are exact in fp32)."""
    return operand_precision(x, precision), x.device.type != "cuda" and x.element_size() == 2


def causal_scores(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, row0=0, zero_above=None,
                  precision="ieee") -> torch.Tensor:
    """out (H, R, K) = x[:, row0:row0 + R] (x (H, L, D)) times y[:, :K] (y (Hkv, >= K, D))
    transposed, per head (head h takes kv head h // (H // Hkv)), sums in fp32 (fp64 for fp64),
    in out's dtype. With zero_above (a causal slab of rows lo.. has zero_above = lo), tiles lying
    wholly where col - row > zero_above are skipped and left unwritten; the rest is exact.
    precision: tl.dot's for fp32 inputs ("tf32", "tf32x3" or "ieee"). All three must pass tma_ok (out
    from scores_buffer does). Returns out."""
    H, R, K = out.shape
    D = x.shape[2]
    if x.shape[0] != H or y.shape[2] != D or y.shape[1] < K or x.shape[1] < row0 + R:
        raise ValueError(f"x must be ({H}, >= {row0 + R}, D) and y (Hkv, >= {K}, D) for out {tuple(out.shape)}, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    _check(zero_above, x, y, "y")
    if out.numel() == 0:
        return out
    cfg = configs.CAUSAL_SCORES
    DP = max(16, next_pow2(D))
    BM, BN = scores_tiles(x.element_size(), DP)
    prec, upcast = _dot_options(x, precision)
    n_blocks = cdiv(K, BN)
    n_groups = cdiv(n_blocks, cfg["TILES"])
    causal_scores_kernel[(cdiv(R, BM) * n_groups, H)](
        _descriptor(x, (1, BM, DP)), _descriptor(y, (1, BN, DP)), _descriptor(out, (1, BM, BN)), row0, R, K,
        K if zero_above is None else zero_above, H // y.shape[0], n_blocks, n_groups, BM=BM, BN=BN, DP=DP,
        TILES=cfg["TILES"], PREC=prec, UPCAST=upcast, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def pv_splits(programs: int, key_blocks: int, device) -> int:
    """How many parts causal_pv splits each row block's keys into: 1 where its (row block, head)
    programs fill the GPU, else as many as fill it once, each part at least 8 key blocks (a
    slab of few rows over many keys ran 16 programs on 132 SMs at L = 131072)."""
    sms = configs.sm_count(device) if device.type == "cuda" else 4
    return max(1, min(sms // max(programs, 1), key_blocks // 8))


def causal_pv_splits(a: torch.Tensor, y: torch.Tensor) -> int:
    """The parts causal_pv(a, y, ...) splits the keys into by default: pv_splits of its grid."""
    H, R, K = a.shape
    BM, BN, _ = pv_tiles(a.element_size(), max(16, next_pow2(y.shape[2])))
    return pv_splits(cdiv(R, BM) * H, cdiv(K, BN), a.device)


def causal_pv(a: torch.Tensor, y: torch.Tensor, out: torch.Tensor, zero_above=None, precision="ieee",
              splits=None) -> torch.Tensor:
    """out (H, R, D), any strides and dtype, = a (H, R, K) times y[:, :K] (y (Hkv, >= K, D)) per
    head (head h takes kv head h // (H // Hkv)), sums in fp32 (fp64 for fp64); with zero_above,
    a counts as zero where col - row > zero_above, whatever it holds there (causal_scores'
    skipped tiles, or a mix-softmax that left the future unwritten). precision: tl.dot's for
    fp32 inputs. a and y must pass tma_ok. The keys are split into ``splits`` parts (default
    causal_pv_splits) whose sums are added in a fixed order. Returns out."""
    H, R, K = a.shape
    D = y.shape[2]
    if y.shape[1] < K or out.shape != (H, R, D):
        raise ValueError(f"y must be (Hkv, >= {K}, D) and out ({H}, {R}, D) for a {tuple(a.shape)}, got "
                         f"{tuple(y.shape)} and {tuple(out.shape)}")
    _check(zero_above, a, y, "y")
    if out.numel() == 0:
        return out
    cfg = configs.CAUSAL_PV
    DP = max(16, next_pow2(D))
    BM, BN, stages = pv_tiles(a.element_size(), DP)
    prec, upcast = _dot_options(a, precision)
    S = splits or causal_pv_splits(a, y)
    # with splits, each part's fp32 (fp64) sums go to its own slice; summed once below
    dest = out.unsqueeze(0) if S == 1 else torch.empty(S, H, R, D, device=a.device, dtype=acc_dtype(a))
    causal_pv_kernel[(cdiv(R, BM), H, S)](
        _descriptor(a, (1, BM, BN)), _descriptor(y, (1, BN, DP)), dest, *dest.stride(), R, K, D,
        0 if zero_above is None else zero_above, H // y.shape[0], CAUSAL=zero_above is not None, BM=BM, BN=BN,
        DP=DP, ACC=tl_acc_dtype(a), PREC=prec, UPCAST=upcast, num_warps=cfg["num_warps"], num_stages=stages)
    if S > 1:
        out.copy_(dest.sum(0))
    return out


def rows_times_values(a: torch.Tensor, y: torch.Tensor, out: torch.Tensor, zero_above=None, precision="ieee"):
    """out (H, R, D) = a (H, R, K) y[:, :K] (y (H, >= K, D)), as a batched matmul, or through
    causal_pv where that would split its keys: a chunk of few rows over many keys has one
    output tile per head, too few programs for the GPU (with zero_above, a's future is skipped
    there; it must hold zeros for the matmul)."""
    K = a.shape[2]
    splits = causal_pv_splits(a, y) if tma_ok(a, y) else 1
    if splits > 1:
        causal_pv(a, y, out, zero_above=zero_above, precision=precision, splits=splits)
    else:
        matmul_into(out, a, y[:, :K], accumulate=False)
    return out


@contextlib.contextmanager
def matmul_precision(q):
    """torch's fp32 matmuls inside the block on CUDA: TF32 when q is bf16 (its 10 mantissa bits
    round the slabs' fp32 operands far less than the bf16 reference rounds its own), full fp32
    when q is fp16 (TF32 would round them as coarsely as fp16 itself; see dot_precision)."""
    want = {"tf32": "tf32", "tf32x3": "ieee"}.get(dot_precision(q)) if q.is_cuda else None
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    if want:
        matmul.fp32_precision = want
    try:
        yield
    finally:
        matmul.fp32_precision = old


def matmul_into(out, a, b, accumulate):
    """out = a @ b, or out += a @ b, for batched 3-d a, b. 16-bit a and b with an fp32 out go
    through out_dtype on CUDA (16-bit tensor cores with fp32 sums), through fp32 copies
    elsewhere (the CPU build lacks out_dtype)."""
    extra = {}
    if a.dtype != out.dtype:
        if a.is_cuda:
            extra = dict(out_dtype=out.dtype)
        else:
            a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        torch.baddbmm(out, a, b, out=out, **extra)
    else:
        torch.bmm(a, b, out=out, **extra)
