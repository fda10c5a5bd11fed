"""Host (Python) time per launch of the slab kernels, measured without a GPU: Triton's launch
path runs for real (argument binding and specialization, the cache key, launch metadata, the
TMA descriptors' argument handling) up to the driver's launch call, which a fake driver turns
into a no-op; the kernels compile for sm_90a as on the H200. Each wrapper is timed on small
CPU slabs (its torch work is then negligible) and against a bare torch op. Prints microseconds
per call, and with --profile the top of cProfile for one wrapper.

    python scripts/host_launch_cost.py [--profile NAME]

Must run without TRITON_INTERPRET. The CPU is this machine's, not the H200 host's: compare the
rows with each other (and with `bare torch op`), not with the H200's wall times."""
import cProfile
import os
import pstats
import sys
import timeit

assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import driver as nvidia_driver


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return object(), 0, 0, 0, 1024      # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return dict(max_shared_mem=232448, multiprocessor_count=132, max_num_regs=65536, warpSize=32)

    def fill_tma_descriptor(self, *args):
        return bytes(128)                   # the CUtensorMap the real driver encodes


class _Launcher:
    """The CUDA launcher's Python side (scratch checks, TMA descriptor arguments) around a no-op."""

    def __init__(self, src, metadata):
        signature = {idx: value for idx, value in src.signature.items()}
        self.launch = nvidia_driver.wrap_handle_tensordesc(lambda *args: None, signature,
                                                           getattr(metadata, "tensordesc_meta", None))

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.launch(gridX, gridY, gridZ, stream, function, False, False, None, None, *args)


class FakeCudaDriver:
    utils = _Utils()
    launcher_cls = _Launcher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


triton.runtime.driver.set_active(FakeCudaDriver())

import mta_reference as R                                   # noqa: E402
from mta_kernels import slab_conv, slab_mix, slab_mix_backward, slab_softmax   # noqa: E402
from mta_kernels.chunked_talking_heads import talking_heads_backward           # noqa: E402

H, rows, keys = 16, 64, 256
g = torch.Generator().manual_seed(0)
x16 = torch.randn(1, H, rows, keys, generator=g).to(torch.bfloat16)
mix, conv = R.identity_mix(H, H), R.identity_conv(H, 6, 11)
lse = torch.zeros(1, H, rows)
buffer = torch.zeros(1, 1, rows, H, H)
sums = slab_conv.ConvWeightGradSums(conv, H, rows, keys, "both", 1 << 20, "cpu", torch.float32)
a = torch.randn(1, H, rows, keys, generator=g)
m1, m2 = torch.randn(H, 64, 128, generator=g), torch.randn(H, 128, 64, generator=g)
# a whole talking-heads backward in two chunks on tiny bf16 tensors (its torch work small)
th_q, th_k, th_v, th_do = (torch.randn(1, H, 128, 16, generator=g).to(torch.bfloat16) for _ in range(4))
th_lse = torch.zeros(1, H, 128)
import mta_kernels                                          # noqa: E402
from mta_kernels import causal_matmul, chunked_forward as cf   # noqa: E402
th_out = torch.empty(H, 128, 16, dtype=torch.bfloat16)
th_s = causal_matmul.scores_buffer(H, 64, 128, torch.bfloat16, "cpu")


def th_forward(causal_matmuls):
    cf.CAUSAL_MATMULS = causal_matmuls
    return cf.chunked_forward(th_q, th_k, th_v, None, mix, None, mix, causal=True, pad_key="both", scale=0.25, rows=64)


def th_api_forward(causal_matmuls):
    """The whole call as a user makes it (validation, autograd function, the chunked forward)."""
    cf.CAUSAL_MATMULS, cf.CHUNKED_TALKING_HEADS = causal_matmuls, "1"
    mta_kernels.api.INTERPRETER = True          # CPU tensors past the backend check (the fake driver runs nothing)
    with torch.no_grad():
        return mta_kernels.mta_attention(th_q, th_k, th_v, pre_mix=mix, post_mix=mix, causal=True)


calls = {
    "bare torch op (x.add_(1))": lambda: a.add_(1),
    "talking heads chunked_forward (L=128, 2 chunks), cuBLAS": lambda: th_forward("0"),
    "talking heads chunked_forward (L=128, 2 chunks), causal": lambda: th_forward("auto"),
    "mta_attention talking heads forward (L=128, 1 chunk)": lambda: th_api_forward("auto"),
    "mta_attention talking heads forward, cuBLAS": lambda: th_api_forward("0"),
    "causal_scores (TMA)": lambda: causal_matmul.causal_scores(th_q[0], th_k[0], th_s, row0=64, zero_above=64),
    "causal_pv (TMA)": lambda: causal_matmul.causal_pv(th_s, th_v[0], th_out[:, :64], zero_above=64),
    "talking_heads_backward (B=1, H=16, L=128, D=16, 2 chunks)": lambda: talking_heads_backward(
        th_do, th_q, th_k, th_v, mix, mix, th_lse, causal=True, scale=0.25, rows=64),
    "torch.bmm 16x64x128 @ 128x64": lambda: torch.bmm(m1, m2),
    "mix_softmax_rows (post mix, lse out)": lambda: slab_softmax.mix_softmax_rows(
        x16, mix, 5, want_lse=True, precision="tf32", post_mix=mix, out_dtype=torch.bfloat16),
    "mix_rows": lambda: slab_mix.mix_rows(x16, mix, 5, precision="tf32", out_dtype=torch.bfloat16),
    "mix_backward_rows (softmax, dw rows)": lambda: slab_mix_backward.mix_backward_rows(
        x16, mix, x=x16, probs=x16, zero_above=5, rows=(2, rows), precision="tf32", out=x16, dw_rows=(buffer, 0)),
    "talking_heads_backward_rows": lambda: slab_mix_backward.talking_heads_backward_rows(
        x16, x16, lse, mix, mix, 5, precision="tf32", out=x16, dw_pre_rows=buffer, dw_post_rows=buffer),
    "key_query_conv (strip, TMA)": lambda: slab_conv.key_query_conv(x16, conv, "both", zero_above=5, precision="tf32"),
    "key_query_conv_input_grad (strip, TMA)": lambda: slab_conv.key_query_conv_input_grad(
        x16, conv, "both", zero_above=5, mask_output=True, precision="tf32"),
    "key_query_conv_weight_grad (strip, TMA, own sums)": lambda: slab_conv.key_query_conv_weight_grad(
        x16, x16, conv, "both", zero_above=5, rows=(2, rows), precision="tf32"),
    "key_query_conv_weight_grad (into ConvWeightGradSums)": lambda: slab_conv.key_query_conv_weight_grad(
        x16, x16, conv, "both", zero_above=5, rows=(2, rows), precision="tf32", partial=sums.buffer[0]),
}

if __name__ == "__main__":
    profile = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--profile" else None
    for name, fn in calls.items():
        fn()                                  # compiles
        n, best = 200, float("inf")
        for _ in range(5):
            best = min(best, timeit.timeit(fn, number=n) / n)
        print(f"{name:55s} {best * 1e6:8.1f} us per call", flush=True)
    if profile:
        fn = next(f for name, f in calls.items() if name.startswith(profile))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "18")))
