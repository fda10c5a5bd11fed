"""One fused forward call of an op at B=1, H=16, L=4096, D=128, bf16: a target for ncu."""
import sys

import torch

import mta_kernels
from gpu_smoke import weights

op = sys.argv[1] if len(sys.argv) > 1 else "talking"
q, k, v = (torch.randn(1, 16, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
w = weights(16, op)
mta_kernels.mta_attention(q, k, v, **w)
torch.cuda.synchronize()
