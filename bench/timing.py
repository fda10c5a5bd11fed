"""Time, memory and kernel launches of one closure.

On CUDA, per timing: 'eager' is triton.testing.do_bench (median and 20%/80% quantiles, L2
flushed between calls), 'cuda_graph' is triton.testing.do_bench_cudagraph (calls captured in
one CUDA graph and replayed: the GPU's time without the host's). Peak memory is
torch.cuda.max_memory_allocated above what was allocated before one call; launches are the
CUDA kernels torch.profiler sees in one call. On CPU (the Triton interpreter) nothing is
measured: the closure runs once.
"""
import gc
import statistics
import time

import torch

TIMINGS = ("eager", "cuda_graph")
QUANTILES = (0.5, 0.2, 0.8)
MAX_REP_MS = 2000.0  # do_bench's measuring window for very slow cases (it always runs >= 8 calls)
# Calls slower than this are timed SLOW_CALL_RUNS times with the wall clock around a
# synchronize instead of do_bench, and not graphed.
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


def error_status(exc: BaseException) -> str:
    """'oom', or 'error: <type>: <message, one line, <= 200 chars>'."""
    if is_oom(exc):
        return "oom"
    msg = " ".join(str(exc).split())[:200]
    return f"error: {type(exc).__name__}: {msg}" if msg else f"error: {type(exc).__name__}"


def _set_grads_none(tensors):
    for t in tensors:
        t.grad = None


def measure(fn, grad_to_none, on_gpu: bool, timings=TIMINGS) -> dict:
    """Measure ``fn`` once per timing in ``timings``.

    ``grad_to_none``: tensors whose .grad is reset before every call, so that gradient
    accumulation is not timed. Returns {'peak_mem_gib', 'launches', 'times': {timing: dict}},
    each timing's dict holding median_ms, p20_ms, p80_ms and status 'ok', or only a status.
    On CPU, ``fn`` runs once and every figure is None.
    """
    _set_grads_none(grad_to_none)
    fn()  # compiles (Triton, torch.compile) outside the timed and measured calls
    if not on_gpu:
        return dict(peak_mem_gib=None, launches=None, times={t: dict(status="ok") for t in timings})
    peak, estimate_ms = _cuda_peak_gib(fn, grad_to_none)
    launches = count_launches(fn, grad_to_none)
    times = {}
    for timing in timings:
        try:
            times[timing] = _time(fn, grad_to_none, timing, estimate_ms)
        except Exception as exc:  # e.g. a call that cannot be captured in a graph
            times[timing] = dict(status=error_status(exc))
            free_memory(True)
    return dict(peak_mem_gib=peak, launches=launches, times=times)


def _time(fn, grad_to_none, timing: str, estimate_ms: float) -> dict:
    from triton.testing import do_bench, do_bench_cudagraph
    if estimate_ms > SLOW_CALL_MS:
        if timing == "cuda_graph":
            return dict(status=f"skipped: call > {SLOW_CALL_MS / 1e3:g} s")
        q = _wall_quantiles(fn, grad_to_none, SLOW_CALL_RUNS, SLOW_CALL_RUNS, budget_s=0.0,
                            sync=torch.cuda.synchronize)
    else:
        # Both repeat for about `rep` ms: ask for >= 5 calls, but at most MAX_REP_MS.
        rep = min(max(100.0, 5 * estimate_ms), MAX_REP_MS)
        if timing == "cuda_graph":
            q = do_bench_cudagraph(fn, rep=rep, grad_to_none=list(grad_to_none), quantiles=list(QUANTILES))
        else:
            q = do_bench(fn, warmup=25, rep=rep, grad_to_none=list(grad_to_none), quantiles=list(QUANTILES))
    return dict(median_ms=q[0], p20_ms=q[1], p80_ms=q[2], status="ok")


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


def count_launches(fn, grad_to_none):
    """CUDA kernels launched by one call (memory copies and sets not counted), as torch.profiler
    records them; None if the profiler fails or sees none."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    _set_grads_none(grad_to_none)
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except Exception:
        return None
    finally:
        _set_grads_none(grad_to_none)
    n = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset")))
    return n or None    # every call launches a kernel: 0 means the profiler saw none


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
