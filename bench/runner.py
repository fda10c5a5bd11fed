"""The loop over cases: gate each provider once per (op, heads, head dim, grad), then time
every case, turning each failure into a recorded status instead of a crash.

status: 'ok' | 'error: <exception>' | 'gate failed: <reason>' | 'oom' |
        'skipped: est. memory <x> GiB'

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
    cuda_graphs: bool = False   # time calls replayed from a CUDA graph (timing.measure)

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
            for mode in cfg.modes:
                for p in cfg.providers:
                    if providers.supports(p, op) and (op in cfg.ops or p == "sdpa"):
                        cases.append(Case(shape, op, mode, p))
    return cases


class ContextLost(RuntimeError):
    """The CUDA context is unusable after the case just recorded."""


def case_key(row: dict) -> tuple:
    """Identifies a case in a CSV row or a result row (to resume a run)."""
    return tuple(str(row[c]) for c in ("op", "mode", "provider", "B", "H", "Hkv", "L", "D", "dtype"))


def _error(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())[:200]
    return f"error: {type(exc).__name__}: {msg}" if msg else f"error: {type(exc).__name__}"


class Runner:
    def __init__(self, cfg: Config, info: dict, log):
        self.cfg = cfg
        self.info = info
        self.log = log
        self.gates: Dict[tuple, Optional[str]] = {}
        self.rows: List[dict] = []

    def run(self, cases: List[Case], done=frozenset()):
        """Run every case whose key is not in ``done``; raises ContextLost after recording
        a case that broke the CUDA context."""
        for i, case in enumerate(cases, 1):
            if case_key(self._row(case)) in done:
                continue
            row = self.run_case(case)
            lost = self.cfg.on_gpu and not timing.cuda_usable()
            if lost:
                status = "error" if row["status"] == "ok" else row["status"]
                row["status"] = f"{status} [CUDA context lost]"
            self.rows.append(row)
            self.log.write(row)
            print(f"[{i}/{len(cases)}] {_describe(row)}", flush=True)
            if lost:
                raise ContextLost(row["status"])
        return self.rows

    def _row(self, case: Case) -> dict:
        s = case.shape
        return dict(self.info, op=case.op, mode=case.mode, provider=case.provider, B=s.B, H=s.H,
                    Hkv=s.Hkv, L=s.L, D=s.D, dtype=self.cfg.dtype_name)

    def run_case(self, case: Case) -> dict:
        row = self._row(case)
        row["status"] = self._skip_reason(case)
        if row["status"] is None:
            try:
                fn = providers.build(case.provider, self.cfg.dtype)
                row["status"] = self._gate(fn, case)
                if row["status"] is None:
                    row.update(self._time(fn, case))
                    row["status"] = "ok"
            except Exception as exc:  # a provider failure is a result, not a crash
                row["status"] = "oom" if timing.is_oom(exc) else _error(exc)
            finally:
                timing.free_memory(self.cfg.on_gpu)
        return row

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
                self.gates[key] = "oom" if timing.is_oom(exc) else _error(exc)
            what = "fwd+grads" if with_grad else "fwd"
            print(f"  gate {case.provider} {op} H{s.H} Hkv{s.Hkv} D{s.D} {what}: "
                  f"{self.gates[key] or 'passed'}", flush=True)
        return self.gates[key]

    def _time(self, fn, case: Case) -> dict:
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

        result = timing.measure(step, leaves, cfg.on_gpu, cfg.cuda_graphs)
        result["tflops"] = attention_flops(case.shape, case.mode) / (result["median_ms"] * 1e-3) / 1e12
        return result


def _describe(row: dict) -> str:
    head = (f"{row['op']:<13} {row['mode']:<7} {row['provider']:<14} B{row['B']} H{row['H']} "
            f"Hkv{row['Hkv']} L{row['L']} D{row['D']} {row['dtype']}")
    if row["status"] != "ok":
        return f"{head}: {row['status']}"
    mem = "" if row["peak_mem_gib"] is None else f", peak {row['peak_mem_gib']:.3f} GiB"
    return (f"{head}: {row['median_ms']:.4g} ms [{row['p20_ms']:.4g}, {row['p80_ms']:.4g}], "
            f"{row['tflops']:.3g} TFLOP/s{mem}")
