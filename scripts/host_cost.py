"""Host (Python) time and Triton launches of whole mta_attention calls, measured without a GPU.

Triton's launch path runs for real (argument binding and specialization, the cache key, the
TMA descriptors' argument handling) up to the driver's launch call, which a fake driver turns
into a no-op that counts; the kernels compile for sm_90a. Each call runs on tiny CPU tensors
(their torch work is then small) next to a bare torch op. Prints microseconds and Triton
launches per call, and with --profile NAME the top of cProfile for one row.

    python scripts/host_cost.py [--profile NAME] [--only SUBSTRING]

Must run without TRITON_INTERPRET. The CPU is this machine's, not a GPU host's: compare the
rows with each other, not with wall times measured elsewhere."""
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


LAUNCHES = [0]


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
        LAUNCHES[0] += 1
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
from mta_kernels import api                                 # noqa: E402
from mta_kernels.autograd import MTAFunction                # noqa: E402
from mta_kernels.options import resolve                     # noqa: E402

api.interpreting = lambda: True     # CPU tensors past the backend check: the fake driver runs nothing
g = torch.Generator().manual_seed(0)
B, H, L, D = 2, 16, 64, 16
q, k, v, do = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
MIX, CONV = R.identity_mix(H, H), R.identity_conv(H, 6, 11)
OPS = {"talking_heads": dict(pre_mix=MIX, post_mix=MIX),
       "full": dict(pre_conv=CONV, pre_mix=MIX, post_conv=CONV, post_mix=MIX),
       "pre_conv": dict(pre_conv=CONV), "post_conv": dict(post_conv=CONV)}


def call(op, backward, chunk_rows):
    """One mta_attention call as a user makes it, in chunks of chunk_rows rows (with its backward)."""
    w = {n: x.clone().requires_grad_(backward) for n, x in OPS[op].items()}
    xs = [x.clone().requires_grad_(backward) for x in (q, k, v)]
    with torch.set_grad_enabled(backward):
        out = api.mta_attention(*xs, **w, kernel_options=dict(chunk_rows=chunk_rows))
        if backward:
            out.backward(do)


def decode_op(op):
    """One decode step of the op: a query row over the L keys, the 10 queries before it."""
    with torch.no_grad():
        api.mta_attention(q[:, :, -1:], k, v, **OPS[op], q_prev=q[:, :, -11:-1])


def decode_layer(variant, static):
    """A function running one decode step of a paper-like layer ('baseline', 'talking_heads' or
    'full') over a cache holding L - 1 tokens (restored before each step)."""
    from mta_kernels.nn.cache import MTACache
    from mta_kernels.nn.layer import MTAConfig, MultiTokenAttention
    parts = dict(baseline={}, talking_heads=dict(pre_mix=H, post_mix=H),
                 full=dict(pre_conv=(6, 11), post_conv=(6, 11), pre_mix=H, post_mix=H, head_norm=True, gate=True))
    layer = MultiTokenAttention(MTAConfig(dim=H * D, n_heads=H, **parts[variant])).eval()
    cache = MTACache([layer.config], B, L + 1, static=static)
    x = torch.randn(B, L - 1, H * D, generator=g)
    with torch.no_grad():
        cache.begin(L - 1)
        layer.attention = lambda q_, k_, v_, **block: q_      # the prefill's op is not what is timed
        layer(x, cache=cache.layers[0])
        del layer.attention
        cache.end()
    lengths, window = cache.lengths.clone(), cache.layers[0].q_window.clone()
    x1 = x[:, -1:]

    def step():
        cache.lengths.copy_(lengths)
        cache.layers[0].q_window.copy_(window)
        with torch.no_grad():
            cache.begin(1)
            layer(x1, cache=cache.layers[0])
            cache.end()
    return step


calls = {"bare torch op (x.add_(1))": lambda: q.add_(0)}
for op in OPS:
    for rows in (L, L // 4):
        calls[f"{op} fwd, {L // rows} chunk(s)"] = lambda op=op, rows=rows: call(op, False, rows)
        calls[f"{op} fwd+bwd, {L // rows} chunk(s)"] = lambda op=op, rows=rows: call(op, True, rows)
for op in ("talking_heads", "full"):
    calls[f"{op} decode step (op)"] = lambda op=op: decode_op(op)
for variant in ("baseline", "talking_heads", "full"):
    for static in (False, True):
        calls[f"{variant} layer decode step{', static' if static else ''}"] = decode_layer(variant, static)

if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    profile, only = args.get("--profile"), args.get("--only", "")
    for name, fn in calls.items():
        if only not in name:
            continue
        fn()                                  # compiles
        LAUNCHES[0] = 0
        fn()
        launches = LAUNCHES[0]
        n, best = 20, float("inf")
        for _ in range(3):
            best = min(best, timeit.timeit(fn, number=n) / n)
        print(f"{name:40s} {best * 1e6:9.1f} us per call, {launches:3d} Triton launches", flush=True)
    if profile:
        fn = next(f for name, f in calls.items() if name.startswith(profile))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "18")))
