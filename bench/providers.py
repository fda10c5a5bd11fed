"""The implementations being compared. Each provider builds, for one op and input dtype,
a function ``fn(q, k, v, weights) -> out`` with ``weights`` a {part: tensor or None} dict.

fused           mta_kernels.mta_attention (Triton; interpreted on CPU)
fused:<path>    the same with kernel_options={'path': <path>} (--paths)
naive           mta_reference.mta_attention eagerly, every intermediate in the input dtype
naive-compiled  torch.compile of the same
sdpa            F.scaled_dot_product_attention: plain causal attention, no MTA (the speed bar);
                it runs only for op 'none'
"""
import logging
import warnings

import torch
import torch.nn.functional as F

import mta_reference

PROVIDERS = ("fused", "naive", "naive-compiled", "sdpa")


def supports(provider: str, op: str) -> bool:
    return provider != "sdpa" or op == "none"


def fused_paths(op: str, on_gpu: bool) -> tuple:
    """The paths of mta_kernels.dispatch that can run ``op`` (see applicable_paths there)."""
    if op == "none":
        return ("sdpa", "flash") if on_gpu else ("flash",)
    if op == "talking_heads":
        return ("talking_heads", "chunked")
    return ("chunked",)


def path_variants(op: str, on_gpu: bool) -> tuple:
    """'fused:<path>' for each path that can run ``op``, where there are several."""
    paths = fused_paths(op, on_gpu)
    return tuple(f"fused:{p}" for p in paths) if len(paths) > 1 else ()


def kernel_options(provider: str) -> dict:
    """The kernel_options of a 'fused:<path>' provider ({} for the others)."""
    return {"path": provider.split(":", 1)[1]} if provider.startswith("fused:") else {}


def _fused(dtype, options=None):
    # Imported on first use: TRITON_INTERPRET must be set before the import
    # (bench/__main__.py does it).
    from mta_kernels import mta_attention

    def fn(q, k, v, w):
        return mta_attention(q, k, v, **w, causal=True, pad_key="both", kernel_options=options)
    return fn


def _naive(dtype):
    def fn(q, k, v, w):
        return mta_reference.mta_attention(q, k, v, **w, causal=True, pad_key="both",
                                           compute_dtype=dtype)
    return fn


_COMPILED = {}


def _quiet_inductor():
    """Inductor's notes on the (L, L) softmax and sympy range warnings would drown the
    one-line-per-case progress; they say nothing about the results."""
    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled")
    logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)


def _naive_compiled(dtype):
    # One compiled function per dtype for the whole run, with torch.compile's defaults
    # (a new shape recompiles once, then with dynamic sizes), as a user would get. Each op
    # and grad mode adds guards: the recompile limit is raised so that dynamo never falls
    # back to eager silently, which would time the naive path under this name.
    if dtype not in _COMPILED:
        _quiet_inductor()
        import torch._functorch.config as functorch_config
        # Mode bwd replays backward with retain_graph=True, which donated buffers forbid.
        functorch_config.donated_buffer = False
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 4096
        _COMPILED[dtype] = torch.compile(_naive(dtype))
    return _COMPILED[dtype]


def _sdpa(dtype):
    def fn(q, k, v, w):
        if any(t is not None for t in w.values()):
            raise ValueError("sdpa is plain attention: it takes no MTA weights")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return fn


_BUILDERS = {"fused": _fused, "naive": _naive, "naive-compiled": _naive_compiled, "sdpa": _sdpa}


def build(provider: str, dtype):
    """The callable for ``provider`` with inputs in ``dtype``; may raise (e.g. ImportError)."""
    if provider.startswith("fused:"):
        return _fused(dtype, kernel_options(provider))
    return _BUILDERS[provider](dtype)
