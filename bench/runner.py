"""The loop over cases: gate each provider once per (op, heads, head dim, grad), then measure
every case, turning each failure into a recorded status instead of a crash. A case gives one
row per timing ('eager' and 'cuda_graph' on a GPU, 'none' on CPU).

status: 'ok' | 'error: <exception>' | 'gate failed: <reason>' | 'oom' |
        'skipped: est. memory <x> GiB' | 'skipped: call > 0.5 s' (graph timing of a slow call)

A kernel fault (illegal address) breaks the process's CUDA context for good: the runner
records the case, then raises ContextLost so that the caller can resume in a new process.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from . import gate, providers, timing
from .cases import Shape, attention_flops, make_inputs, make_weights, naive_memory_estimate_gib


@dataclass(frozen=True)
class Config:
    ops: Tuple[str, ...]
    modes: Tuple[str, ...]
    providers: Tuple[str, ...]
    shapes: Tuple[Shape, ...]
    dtype: torch.dtype
    dtype_name: str
    conv: Tuple[int, int]
    on_gpu: bool
    max_naive_gib: float = 100.0
    timings: Tuple[str, ...] = timing.TIMINGS   # ('none',) on CPU
    paths: bool = False    # also run 'fused:<path>' for each path of ops with several

    @property
    def device(self):
        return "cuda" if self.on_gpu else "cpu"


@dataclass(frozen=True)
class Case:
    shape: Shape
    op: str
    mode: str
    provider: str


def plan(cfg: Config) -> List[Case]:
    """Every case in run order. sdpa runs once per shape and mode, under op 'none'."""
    ops = list(cfg.ops)
    if "sdpa" in cfg.providers and "none" not in ops:
        ops.append("none")
    cases = []
    for shape in cfg.shapes:
        for op in ops:
            names = [p for p in cfg.providers if providers.supports(p, op) and (op in cfg.ops or p == "sdpa")]
            if cfg.paths and "fused" in names:
                names[names.index("fused") + 1:names.index("fused") + 1] = providers.path_variants(op, cfg.on_gpu)
            for mode in cfg.modes:
                cases += [Case(shape, op, mode, p) for p in names]
    return cases


class ContextLost(RuntimeError):
    """The CUDA context is unusable after the case just recorded."""


def case_key(row: dict) -> tuple:
    """Identifies a case in a CSV row or a result row (to resume a run)."""
    return tuple(str(row[c]) for c in ("op", "mode", "provider", "B", "H", "Hkv", "L", "D", "dtype"))


class Runner:
    def __init__(self, cfg: Config, info: dict, log):
        self.cfg = cfg
        self.info = info
        self.log = log
        self.gates: Dict[tuple, Optional[str]] = {}

    def run(self, cases: List[Case], done=frozenset()):
        """Run every case whose key is not in ``done``, writing its rows to the log; raises
        ContextLost after recording a case that broke the CUDA context."""
        for i, case in enumerate(cases, 1):
            if case_key(self._row(case)) in done:
                continue
            rows = self.run_case(case)
            lost = self.cfg.on_gpu and not timing.cuda_usable()
            for row in rows:
                if lost:
                    status = "error" if row["status"] == "ok" else row["status"]
                    row["status"] = f"{status} [CUDA context lost]"
                self.log.write(row)
            print(f"[{i}/{len(cases)}] {describe(rows)}", flush=True)
            if lost:
                raise ContextLost(rows[0]["status"])

    def _row(self, case: Case) -> dict:
        s = case.shape
        options = ";".join(f"{k}={v}" for k, v in providers.kernel_options(case.provider).items())
        return dict(self.info, op=case.op, mode=case.mode, provider=case.provider, B=s.B, H=s.H,
                    Hkv=s.Hkv, L=s.L, D=s.D, dtype=self.cfg.dtype_name, conv="%dx%d" % self.cfg.conv,
                    options=options)

    def run_case(self, case: Case) -> List[dict]:
        """One row per timing of the config."""
        base = self._row(case)
        status, result = self._skip_reason(case), None
        if status is None:
            try:
                fn = providers.build(case.provider, self.cfg.dtype)
                status = self._gate(fn, case)
                if status is None:
                    result = self._measure(fn, case)
            except Exception as exc:  # a provider failure is a result, not a crash
                status = timing.error_status(exc)
            finally:
                timing.free_memory(self.cfg.on_gpu)
        rows = []
        for t in self.cfg.timings:
            row = dict(base, timing=t, status=status)
            if result is not None:
                row.update(result["times"][t], peak_mem_gib=result["peak_mem_gib"], launches=result["launches"])
                if row.get("median_ms"):
                    row["tflops"] = attention_flops(case.shape, case.mode) / (row["median_ms"] * 1e-3) / 1e12
            rows.append(row)
        return rows

    def _skip_reason(self, case: Case) -> Optional[str]:
        if case.provider.startswith("naive"):
            est = naive_memory_estimate_gib(case.shape, case.op, case.mode, self.cfg.dtype)
            if est > self.cfg.max_naive_gib:
                return f"skipped: est. memory {est:.0f} GiB"
        return None

    def _gate(self, fn, case: Case) -> Optional[str]:
        """None when the provider passed (or passes now); else the status to record."""
        with_grad = case.mode != "fwd"
        op = "none" if case.provider == "sdpa" else case.op
        s = case.shape
        key = (case.provider, op, s.H, s.Hkv, s.D, with_grad)
        if key not in self.gates:
            small = gate.gate_shape(s, self.cfg.on_gpu)
            try:
                reason = gate.check(fn, case.provider, op, small, self.cfg.dtype, self.cfg.conv,
                                    self.cfg.device, with_grad)
                self.gates[key] = None if reason is None else f"gate failed: {reason}"
            except Exception as exc:
                self.gates[key] = timing.error_status(exc)
            what = "fwd+grads" if with_grad else "fwd"
            print(f"  gate {case.provider} {op} H{s.H} Hkv{s.Hkv} D{s.D} {what}: "
                  f"{self.gates[key] or 'passed'}", flush=True)
        return self.gates[key]

    def _measure(self, fn, case: Case) -> dict:
        cfg = self.cfg
        with_grad = case.mode != "fwd"
        torch.manual_seed(0)
        q, k, v = make_inputs(case.shape, cfg.dtype, cfg.device, with_grad)
        w = make_weights(case.op, case.shape.H, cfg.conv, cfg.device, with_grad)
        leaves = [q, k, v] + [t for t in w.values() if t is not None] if with_grad else []

        if case.mode == "fwd":
            def step():
                fn(q, k, v, w)
        elif case.mode == "bwd":
            out = fn(q, k, v, w)
            grad = torch.randn_like(out)

            def step():
                out.backward(grad, retain_graph=True)
        else:
            grad = torch.randn_like(q)

            def step():
                fn(q, k, v, w).backward(grad)

        return timing.measure(step, leaves, cfg.on_gpu, cfg.timings)


def describe(rows: List[dict]) -> str:
    """One progress line for a case's rows."""
    r = rows[0]
    head = (f"{r['op']:<13} {r['mode']:<7} {r['provider']:<14} B{r['B']} H{r['H']} "
            f"Hkv{r['Hkv']} L{r['L']} D{r['D']} {r['dtype']}")
    if len({row["status"] for row in rows}) == 1 and r["status"] != "ok":
        return f"{head}: {r['status']}"
    parts = []
    for row in rows:
        if row.get("median_ms") is not None:
            parts.append(f"{row['timing']} {row['median_ms']:.4g} ms [{row['p20_ms']:.4g}, {row['p80_ms']:.4g}]")
        elif row["status"] != "ok":
            parts.append(row["status"] if row["timing"] == "none" else f"{row['timing']} {row['status']}")
    if r.get("peak_mem_gib") is not None:
        parts.append(f"peak {r['peak_mem_gib']:.3f} GiB")
    if r.get("launches") is not None:
        parts.append(f"{r['launches']} launches")
    return f"{head}: {', '.join(parts) or 'ran, not timed'}"
