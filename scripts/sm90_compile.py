"""Compile the kernels a host function launches for the H200 (sm_90a) on a machine without
a GPU, and print each one's shared memory, registers and spills, so resource limits show up
before device time is spent. Kernel launches are intercepted: nothing runs.

    python scripts/sm90_compile.py full:96 talking_heads:128:fp16 decode_full   # OP[:D[:DTYPE]], H=16, paper weights

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


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PARTS = {
    "flash": (),
    "talking_heads": ("pre_mix", "post_mix"),
    "full": ("pre_conv", "pre_mix", "post_conv", "post_mix"),
    "pre_conv": ("pre_conv",),
    "post_conv": ("post_conv",),
}


def launch(op, D, H=16, L=256, dtype=torch.bfloat16):
    """Run the forward and backward of one op's path (flash, talking_heads, full, pre_conv,
    post_conv) on CPU tensors of head size D with paper-sized weights: every Triton launch is
    compiled for sm_90a by intercept() instead of running (so the results are garbage, the
    shapes right)."""
    import mta_reference as R
    from mta_kernels.autograd import backward_impl, forward_impl
    from mta_kernels.options import Options
    q, k, v, do = (torch.randn(1, H, L, D, dtype=dtype) for _ in range(4))
    full = dict(pre_conv=R.identity_conv(H, 6, 11), pre_mix=R.identity_mix(H, H), post_conv=R.identity_conv(H, 6, 11),
                post_mix=R.identity_mix(H, H))
    weights = tuple(full[n] if n in PARTS[op] else None for n in ("pre_conv", "pre_mix", "post_conv", "post_mix"))
    path = "flash" if op == "flash" else "talking_heads" if op == "talking_heads" else "chunked"
    options = Options(path=path, chunk_rows=128)
    out, lse = forward_impl(q, k, v, weights, True, "both", D ** -0.5, options)
    backward_impl(do, q, k, v, weights, out, lse, True, "both", D ** -0.5, options, [True] * 7)


def launch_decode(op, D, H=16, Lk=256, Lq=1, dtype=torch.bfloat16):
    """The fused decode step (a block of Lq rows at the end of Lk keys) of one op with the
    paper's weights, launched as launch() does."""
    import mta_reference as R
    from mta_kernels.decode.forward import mta_decode_fwd
    full = dict(pre_conv=R.identity_conv(H, 6, 11), pre_mix=R.identity_mix(H, H), post_conv=R.identity_conv(H, 6, 11),
                post_mix=R.identity_mix(H, H))
    weights = tuple(full[n] if n in PARTS[op] else None for n in ("pre_conv", "pre_mix", "post_conv", "post_mix"))
    halo = R.conv_row_halo(weights[0], weights[2])
    q, q_prev = torch.randn(1, H, Lq, D, dtype=dtype), torch.randn(1, H, max(halo, 1), D, dtype=dtype)
    k, v = (torch.randn(1, H, Lk, D, dtype=dtype) for _ in range(2))
    mta_decode_fwd(q, k, v, weights, q_prev if halo else None, None, causal=True, pad_key="both", scale=D ** -0.5)


def main(argv):
    """argv: OP[:D[:DTYPE]] ... (D defaults to 128, DTYPE bf16 or fp16 to bf16), OP one of PARTS
    or decode_OP (the fused decode step). Exit status 1 if a launch does not fit."""
    found = []
    intercept(found)
    for item in argv or list(PARTS):
        op, _, rest = item.partition(":")
        d, _, dtype = rest.partition(":")
        dtype = DTYPES[dtype or "bf16"]
        print(f"== {op} D={d or 128} {dtype}", flush=True)
        if op.startswith("decode_"):
            launch_decode(op[len("decode_"):], int(d or 128), dtype=dtype)
        else:
            launch(op, int(d or 128), dtype=dtype)
    return 0 if all(r["fits"] for r in found) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
