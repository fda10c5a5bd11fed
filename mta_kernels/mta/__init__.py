"""MTA with convs, or any mix the talking-heads path does not take: row-chunked forward and backward."""
from .backward import mta_chunked_bwd
from .forward import mta_chunked_fwd

__all__ = ["mta_chunked_fwd", "mta_chunked_bwd"]
