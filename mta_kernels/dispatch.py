"""Which path runs a call: every choice between the package's algorithms is made here.

    no MTA part                    'sdpa' on CUDA (torch's fused attention), 'flash' elsewhere,
                                   and 'flash' on CUDA when deterministic algorithms are asked for
    both mixes of one group size,  'talking_heads': the row-chunked forward and backward of
      no conv                      talking_heads/
    anything else                  'chunked': the row-chunked forward and backward of mta/
    a query block at the end of    'decode': the fused decode step of decode/ where the block and
      the keys (forward only)      the convs' row halo fit its tile, else the path above

The row-chunked paths run every batch element and head in the same launches at every shape
of the benchmark grid; docs/performance.md has the measurements that retired the other
kernels (register-resident talking heads, a fused frame kernel for convs), each slower than
these paths at every shape measured.
"""
import torch

from .decode import decode_applies
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
        if options.path == "decode":
            raise ValueError("kernel_options['path']='decode' runs query blocks at the end of the keys (q shorter "
                             "than k, or q_prev / seqlens given), not whole sequences")
        if options.path not in paths:
            raise ValueError(f"kernel_options['path']={options.path!r} cannot run this call; "
                             f"it can take {paths}")
        return options.path
    if paths[0] == "sdpa" and torch.are_deterministic_algorithms_enabled():
        return "flash"
    return paths[0]


def choose_block_path(q: torch.Tensor, weights, pad_key: str, options: Options) -> str:
    """The path of a query block at the end of the keys (forward only): options.path where
    forced, else 'decode' for MTA parts where the fused decode step applies, else plain
    attention's path or 'chunked' (the talking-heads path takes whole sequences only)."""
    if options.path:
        if options.path == "talking_heads":
            raise ValueError("kernel_options['path']='talking_heads' takes whole sequences; a query block "
                             "can take 'decode', 'chunked' or plain attention's paths")
        if options.path == "decode" and not decode_applies(q.shape[2], weights, pad_key):
            raise ValueError("kernel_options['path']='decode' cannot run this block: its rows and the convs' row "
                             "halo must fit 16 rows, each conv reach at most 16 keys either side, a mixing group "
                             "16 heads")
        return options.path
    if any(w is not None for w in weights) and decode_applies(q.shape[2], weights, pad_key):
        return "decode"
    path = applicable_paths(q, weights)[0]
    return "chunked" if path == "talking_heads" else path
