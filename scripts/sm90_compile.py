"""Compile the kernels a host function launches for the H200 (sm_90a) on a machine without
a GPU, and print each one's shared memory, registers and spills, so resource limits show up
before device time is spent. Kernel launches are intercepted: nothing runs.

    python scripts/sm90_compile.py mix_bwd full_fwd:256   # OP[:D], bf16, H=16, paper weights

Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted).
"""
import os
import re
import subprocess
import sys
import tempfile

assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET"
# this checkout's kernels, not whatever copy of the package is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_sm90(fn, args, kwargs):
    """Compile one launch (JITFunction fn, its args and kwargs) for sm_90a, with the same
    argument specialization (ints equal to 1, 16-byte divisibility) as a real launch; return
    a dict with name, shared bytes, registers and spill bytes (from ptxas -v)."""
    backend = CUDABackend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                              options=options.__dict__)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    info = subprocess.run([PTXAS, "--gpu-name", "sm_90a", "-v", f.name, "-o", os.devnull],
                          capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no mma"
    return dict(name=fn.__name__, shared=compiled.metadata.shared, mma=mma,
                regs=int(regs.group(1)) if regs else None, spill=int(spill.group(1)) if spill else None,
                options=options)


H200_SHARED_BYTES = 232448   # per block, opt-in maximum on sm_90


def intercept(found):
    """Make every JIT launch compile for sm_90a, print its resources and append them to
    ``found`` instead of running."""
    def run(self, *args, grid, warmup, **kwargs):
        r = compile_sm90(self, list(args), dict(kwargs))
        r["fits"] = r["shared"] <= H200_SHARED_BYTES
        found.append(r)
        print(f"{r['name']:32s} grid={grid} shared={r['shared']:7d} B regs={r['regs']} "
              f"spill={r['spill']} B {r['mma']} {r['options']} {'OK' if r['fits'] else 'TOO MUCH SHARED MEMORY'}", flush=True)
    JITFunction.run = run


# candidates for scripts/tune.py slabconv: the conv (and its input gradient), the weight gradient
SLAB_CONV_CONFIGS = [dict(BR=BR, BC=BC, num_warps=w, num_stages=1, unroll=u, maxnreg=r)
                     for BR, BC, w, u, r in [(64, 32, 4, 6, None), (64, 32, 4, 6, 96), (64, 32, 4, 6, 80),
                                             (64, 32, 4, 6, 64), (64, 32, 4, 1, 64), (64, 32, 2, 6, None),
                                             (32, 32, 4, 6, None), (64, 64, 4, 6, 128)]]
SLAB_WEIGHT_GRAD_CONFIGS = [dict(BR=BR, num_warps=w, num_stages=1, TILES=16, maxnreg=r)   # column tiles: 2 * halo
                            for BR, w, r in [(32, 4, None), (32, 4, 96), (64, 4, None), (64, 4, 128), (64, 4, 96)]]


def launch(op, D, H=16, L=256):
    """Launch one path of the dispatcher (op: flash_fwd, mix_fwd, premix_fwd, full_fwd, flash_bwd,
    mix_bwd, slab_conv, slab_softmax, slab_mix, pre_conv_matmul) with bf16 inputs of head size D,
    paper-sized MTA weights; mix_fwd_fp32 and mix_bwd_fp32: the register-mixing kernels with fp32
    inputs, launched directly (the dispatcher sends fp32 heads wider than they take elsewhere)."""
    from mta_kernels import backward, forward
    import mta_reference as R
    dtype = torch.float32 if op.endswith("_fp32") else torch.bfloat16
    q, k, v, do = (torch.randn(1, H, L, D, dtype=dtype) for _ in range(4))
    lse = torch.zeros(1, H, L)
    mix, conv = R.identity_mix(H, H), R.identity_conv(H, 6, 11)
    scale = D ** -0.5
    if op == "flash_fwd":
        forward.mta_forward(q, k, v, None, None, None, None, True, "both", scale)
    elif op == "mix_fwd":
        forward.mta_forward(q, k, v, None, mix, None, mix, True, "both", scale)
    elif op == "mix_fwd_fp32":
        forward.mix_forward(q, k, v, mix, mix, True, scale)
    elif op == "mix_bwd_fp32":
        backward.mix_backward(do, q, k, v, mix, mix, lse, True, scale)
    elif op == "premix_fwd":
        forward.mta_forward(q, k, v, None, mix, None, None, True, "both", scale)
    elif op == "full_fwd":
        forward.mta_forward(q, k, v, conv, mix, conv, mix, True, "both", scale)
    elif op == "flash_bwd":
        backward.flash_backward(do, q, k, v, q, lse, True, scale)
    elif op == "mix_bwd":
        backward.mix_backward(do, q, k, v, mix, mix, lse, True, scale)   # short grid: key splits
        splits, backward.MIX_BWD_MAX_SPLITS = backward.MIX_BWD_MAX_SPLITS, 1   # a full grid: no splits
        backward.mix_backward(do, q, k, v, mix, mix, lse, True, scale)
        backward.MIX_BWD_MAX_SPLITS = splits
    elif op == "slab_softmax":
        from mta_kernels.slab_softmax import softmax_rows_
        for dtype in (torch.float32, torch.float64):
            softmax_rows_(torch.randn(1, H, 64, L, dtype=dtype), 5, want_lse=True)
            softmax_rows_(torch.randn(1, H, 64, 4 * L, dtype=dtype), None)
    elif op == "slab_mix":
        from mta_kernels.slab_softmax import mix_softmax_rows
        x = torch.randn(1, H, 64, L)
        mix_softmax_rows(x, mix, 5, want_lse=True, precision="tf32", out=x)
        try:
            from mta_kernels.slab_mix import mix_rows
        except ImportError:          # (before the post mix kernel)
            return
        mix_rows(x, mix, 5, precision="tf32", out_dtype=torch.bfloat16)
        mix_rows(x, mix, 5, precision="tf32")
        try:
            from mta_kernels.slab_mix_backward import mix_backward_rows
        except ImportError:          # (before the fused mix backward)
            return
        mix_backward_rows(x, mix, x=x, zero_above=5, rows=(5, 60), precision="tf32", out=x)
        mix_backward_rows(x, mix, x=x, probs=x, zero_above=5, rows=(5, 60), precision="tf32", out=x)
    elif op == "pre_conv_matmul":
        from mta_kernels import slab_conv
        from mta_kernels.pre_conv_matmul import conv_keys, pre_conv_matmul
        c = pre_conv_matmul(q, conv_keys(k, conv, "both", H, q.dtype), 10, L, L, scale, 10, precision="tf32")
        slab_conv.key_query_conv(torch.randn(1, H, L - 10, L), conv, "both", zero_above=10, precision="tf32",
                                 out=c, band=True)
    elif op == "slab_conv":
        from mta_kernels import slab_conv
        x = torch.randn(1, H, 64, L)
        slab = dict(zero_above=0, precision="tf32")
        slab_conv.key_query_conv(x, conv, "both", **slab)
        slab_conv.key_query_conv_input_grad(x, conv, "both", mask_output=True, **slab)
        slab_conv.key_query_conv_weight_grad(x, x, conv, "both", rows=(5, 60), **slab)
    elif op == "slab_conv16":
        # bf16 slabs: the per-tile kernel, the strip kernel with TMA and with pointers; the weight
        # gradient's kernels
        from mta_kernels import slab_conv
        x = torch.randn(1, H, 300, L, dtype=torch.bfloat16)
        committed = dict(slab_conv.STRIP_CONV_CONFIG)
        for change in (dict(TILES=0), dict(), dict(tma=False)):
            print(change)
            slab_conv.STRIP_CONV_CONFIG = dict(committed, **change)
            slab_conv.key_query_conv(x, conv, "both", zero_above=0, precision="tf32")
            slab_conv.key_query_conv_input_grad(x, conv, "both", zero_above=0, mask_output=True, precision="tf32")
        slab_conv.STRIP_CONV_CONFIG = committed
        committed = dict(slab_conv.WEIGHT_GRAD_STRIP_CONFIG)
        for change in (dict(on=False), dict(on=True), dict(on=True, tma=False)):
            print("weight gradient", change)
            slab_conv.WEIGHT_GRAD_STRIP_CONFIG = dict(committed, **change)
            slab_conv.key_query_conv_weight_grad(x, x, conv, "both", zero_above=0, rows=(5, 290), precision="tf32")
        slab_conv.WEIGHT_GRAD_STRIP_CONFIG = committed
    elif op == "slab_conv_sweep":
        from mta_kernels import slab_conv
        x = torch.randn(1, H, 300, L)
        for cfg in SLAB_CONV_CONFIGS:
            print(cfg)
            slab_conv.CONV_CONFIG = cfg
            slab_conv.key_query_conv(x, conv, "both", zero_above=0, precision="tf32")
            slab_conv.key_query_conv_input_grad(x, conv, "both", zero_above=0, mask_output=True, precision="tf32")
        for cfg in SLAB_WEIGHT_GRAD_CONFIGS:
            print(cfg)
            slab_conv.WEIGHT_GRAD_CONFIG = cfg
            slab_conv.key_query_conv_weight_grad(x, x, conv, "both", zero_above=0, precision="tf32")
    elif op == "flash_bwd_sweep":
        for bm, bn, w, st in [(64, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)]:
            print(dict(BM=bm, BN=bn, num_warps=w, num_stages=st))
            backward.FLASH_DKDV_CONFIG = backward.FLASH_DQ_CONFIG = dict(BM=bm, BN=bn, num_warps=w, num_stages=st)
            backward.flash_backward(do, q, k, v, q, lse, True, scale)
    else:
        raise SystemExit(f"unknown op: {op}")


def main(argv):
    """argv: OP[:D] ... (D defaults to 128). Exit status 1 if a launch does not fit."""
    found = []
    intercept(found)
    for item in argv or ["mix_bwd"]:
        op, _, d = item.partition(":")
        print(f"== {op} D={d or 128}", flush=True)
        launch(op, int(d or 128))
    return 0 if all(r["fits"] for r in found) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
