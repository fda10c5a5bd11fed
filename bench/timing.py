"""Time and memory of one closure.

On CUDA: triton.testing.do_bench (median and 20%/80% quantiles) and the peak of
torch.cuda.max_memory_allocated above what was allocated before the call. On CPU:
time.perf_counter over a few calls; no memory figure. CPU times are not performance numbers.
"""
import gc
import statistics
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)
MAX_REP_MS = 2000.0  # do_bench's measuring window for very slow cases (it always runs >= 8 calls)
# Calls slower than this are timed SLOW_CALL_RUNS times with the wall clock around a
# synchronize instead (do_bench's >= 8 calls cost minutes at L = 65536; at half a second
# per call the host clock's overhead is far below 0.1%).
SLOW_CALL_MS = 500.0
SLOW_CALL_RUNS = 3


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(on_gpu: bool):
    gc.collect()
    if on_gpu:
        try:
            torch.cuda.empty_cache()
        except Exception:  # a broken CUDA context; cuda_usable() reports it
            pass


def cuda_usable() -> bool:
    """False once a kernel fault (illegal address, ...) has broken this process's CUDA context:
    every later CUDA call would fail too."""
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:
        return False


def _set_grads_none(tensors):
    for t in tensors:
        t.grad = None


def measure(fn, grad_to_none, on_gpu: bool, cuda_graphs: bool = False) -> dict:
    """median_ms, p20_ms, p80_ms and peak_mem_gib (None on CPU) of ``fn``.

    ``grad_to_none``: tensors whose .grad is reset before every call, so that gradient
    accumulation is not timed. ``cuda_graphs``: time ``fn`` as calls captured in one CUDA graph
    and replayed (triton.testing.do_bench_cudagraph: no host time between kernels, no L2
    flush between calls), so the times are the GPU's alone.
    """
    _set_grads_none(grad_to_none)
    fn()  # compiles (Triton, torch.compile) outside the timed and measured calls
    if not on_gpu:
        # Few calls: interpreted kernels take seconds, and these numbers only prove the harness.
        median, p20, p80 = _wall_quantiles(fn, grad_to_none, min_runs=2, max_runs=10, budget_s=0.1)
        return dict(median_ms=median, p20_ms=p20, p80_ms=p80, peak_mem_gib=None)
    from triton.testing import do_bench
    peak, estimate_ms = _cuda_peak_gib(fn, grad_to_none)
    if estimate_ms > SLOW_CALL_MS:
        median, p20, p80 = _wall_quantiles(fn, grad_to_none, SLOW_CALL_RUNS, SLOW_CALL_RUNS,
                                           budget_s=0.0, sync=torch.cuda.synchronize)
        return dict(median_ms=median, p20_ms=p20, p80_ms=p80, peak_mem_gib=peak)
    # do_bench repeats for about `rep` ms: ask for >= 5 calls, but at most MAX_REP_MS.
    rep = min(max(100.0, 5 * estimate_ms), MAX_REP_MS)
    if cuda_graphs:
        from triton.testing import do_bench_cudagraph
        median, p20, p80 = do_bench_cudagraph(fn, rep=rep, grad_to_none=list(grad_to_none),
                                              quantiles=list(QUANTILES))
        return dict(median_ms=median, p20_ms=p20, p80_ms=p80, peak_mem_gib=peak)
    median, p20, p80 = do_bench(fn, warmup=25, rep=rep, grad_to_none=list(grad_to_none),
                                quantiles=list(QUANTILES))
    return dict(median_ms=median, p20_ms=p20, p80_ms=p80, peak_mem_gib=peak)


def _cuda_peak_gib(fn, grad_to_none):
    """Peak allocation one call adds above what was allocated before it, in GiB, and the
    call's wall time in ms."""
    _set_grads_none(grad_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated() - before
    _set_grads_none(grad_to_none)
    return peak / 2**30, elapsed_ms


def _wall_quantiles(fn, grad_to_none, min_runs, max_runs, budget_s, sync=lambda: None):
    """(median, 20%, 80%) in ms of wall-clock calls: at least min_runs, then more while under
    budget_s seconds, at most max_runs; ``sync`` waits for the device after each call."""
    samples = []
    start = time.perf_counter()
    while len(samples) < min_runs or (len(samples) < max_runs and time.perf_counter() - start < budget_s):
        _set_grads_none(grad_to_none)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: q[1] = 20%, q[7] = 80%
    return statistics.median(samples), q[1], q[7]
