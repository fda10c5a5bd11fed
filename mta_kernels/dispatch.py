"""Which path runs a call: every choice between the package's algorithms is made here.

    no MTA part                    'sdpa' on CUDA (torch's fused attention), 'flash' elsewhere,
                                   and 'flash' on CUDA when deterministic algorithms are asked for
    both mixes of one group size,  'talking_heads': the row-chunked forward and backward of
      no conv                      talking_heads/
    anything else                  'chunked': the row-chunked forward and backward of mta/

The row-chunked paths run every batch element and head in the same launches at every shape
of the benchmark grid; docs/performance.md has the measurements that retired the other
kernels (register-resident talking heads, a fused frame kernel for convs), each slower than
these paths at every shape measured.
"""
import torch

from .options import Options
from .slabs.chunks import is_talking_heads

SDPA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def applicable_paths(q: torch.Tensor, weights) -> tuple:
    """The paths that can run a call with these inputs and MTA weights (None where absent)."""
    if all(w is None for w in weights):
        paths = ("flash",)
        if q.is_cuda and q.dtype in SDPA_DTYPES:
            paths = ("sdpa",) + paths
        return paths
    if is_talking_heads(*weights):
        return ("talking_heads", "chunked")
    return ("chunked",)


def choose_path(q: torch.Tensor, weights, options: Options) -> str:
    """The named path for q (B, H, L, D) and the four weights, as options.path forces it or, by
    default, the first applicable one (flash before sdpa when torch is asked for deterministic
    algorithms: SDPA's backward may not be)."""
    paths = applicable_paths(q, weights)
    if options.path:
        if options.path not in paths:
            raise ValueError(f"kernel_options['path']={options.path!r} cannot run this call; "
                             f"it can take {paths}")
        return options.path
    if paths[0] == "sdpa" and torch.are_deterministic_algorithms_enabled():
        return "flash"
    return paths[0]
