"""Launch configurations of every kernel, in one place. Each was tuned on an H100/H200 at the
shapes named in docs/performance.md; the one-line comments say what a field means."""
import functools

import torch

# Plain attention (flash/): [BM, BN] tiles; heads wider than 128 take BN = 32.
FLASH_FWD = dict(BM=64, BN=64, num_warps=4, num_stages=3)
FLASH_BWD_DKDV = dict(BM=64, BN=64, num_warps=4, num_stages=2)
FLASH_BWD_DQ = dict(BM=64, BN=64, num_warps=4, num_stages=2)

# Row kernels over slabs (slabs/): a program per row of a mixing group; `elements` is the key
# block's size in heads x keys (elements_16bit for 16-bit slabs).
SOFTMAX = dict(max_block=2048)
MIX_SOFTMAX = dict(elements=2048, elements_16bit=4096, num_warps=4, num_stages=3)
MIX = dict(elements=2048, elements_16bit=4096, num_warps=4, num_stages=3)
MIX_BACKWARD = dict(elements=2048, elements_16bit=4096, num_warps=4, num_stages=1)
TALKING_HEADS_BACKWARD = dict(elements=1024, num_warps=1, num_stages=3)

# Causal talking heads' matmuls through tensor descriptors (slabs/matmul.py): TILES key
# tiles per scores program; SMEM_BYTES caps A V's pipeline stages.
CAUSAL_SCORES = dict(BM=128, BN=128, TILES=4, num_warps=4, num_stages=1)
CAUSAL_PV = dict(BM=128, BN=64, num_warps=8, num_stages=5)
CAUSAL_SMEM_BYTES = 160 * 1024

# Key-query conv on slabs (mta/conv.py). CONV: the output tile [BR, BC]; unroll "full" unrolls
# the loop over query offsets up to MAX_FULL_UNROLL of them (beyond that it spills).
CONV = dict(BR=64, BC=32, num_warps=4, num_stages=1, unroll="full")
MAX_FULL_UNROLL = 8
# 16-bit slabs: a program per strip of TILES column tiles, clear tiles loaded by TMA where the
# device has it (registers capped at maxnreg), else by pointers (maxnreg_without_tma).
STRIP_CONV = dict(TILES=8, tma=True, maxnreg=96, maxnreg_without_tma=128, group=1, clean_stages=1)
# The conv's weight gradient: row tile BR, TILES column tiles per program.
WEIGHT_GRAD = dict(BR=64, num_warps=4, num_stages=1, TILES=16, maxnreg=96)
WEIGHT_GRAD_STRIP = dict(on=True, tma=True, maxnreg=96, maxnreg_without_tma=128)

# The pre conv as one matmul of width cq * D (mta/pre_conv.py) and its K~ operand.
PRE_CONV_MATMUL = dict(BM=128, BN=256, BD=64, num_warps=8, num_stages=3)
CONV_KEYS = dict(elements=8192, num_warps=4)


@functools.lru_cache(maxsize=None)
def has_tma(device: torch.device) -> bool:
    """Whether a CUDA device has the tensor memory accelerator (sm_90 on); asked once per device."""
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, read once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count
