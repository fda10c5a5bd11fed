"""Benchmark of the fused MTA kernels against naive (materialized) MTA and SDPA.

Run ``python -m bench`` (see bench/README.md). This package imports nothing at import
time: ``bench/__main__.py`` must set TRITON_INTERPRET before Triton kernels are imported.
"""
