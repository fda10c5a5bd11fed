"""python -m bench.train: training throughput and peak memory of the paper's models.

Trains one of the paper's models (spec section 6) for a fixed number of AdamW steps on
random tokens, three ways (each of them --rounds times, in turn), and reports tokens/s and
peak GPU memory:

    baseline       the same transformer without MTA parts, attention through
                   F.scaled_dot_product_attention (the speed and memory bar)
    mta-reference  the MTA model (variant 'mta') on backend 'reference': mta_reference,
                   materialized (B, H, L, L) scores, as the authors' code
    mta-fused      the MTA model on backend 'fused': mta_kernels.mta_attention

    python -m bench.train                          # GPU: 830M, 24 layers, seq 2048, bf16
    python -m bench.train --layers 8               # fewer blocks, to fit a time budget
    python -m bench.train --record                 # append to bench/results/results.csv
    python -m bench.train --packed                 # documents of random lengths packed per row
    torchrun --nproc-per-node 8 -m bench.train --dist fsdp    # DDP or FSDP2 over the GPUs
    python -m bench.train --report CSV [--run RUN] # the markdown of a run in a CSV

Rows go to ``<out>/<run>_train.csv`` (default bench/runs/, git-ignored) or, with --record,
to bench/results/results.csv (bench 'train': B the batch, L the sequence length); ``<out>/<run>_train.md`` has the ratios to the baseline next to
the paper's (0.105x tokens/s, 4.2x memory) and the targets (>= 0.5x, <= 1.3x). Without a GPU
the default is a tiny fp32 model under the Triton interpreter: a harness check that measures
nothing. See bench/README.md.
"""
import os

import torch

# Triton decides when a kernel is decorated whether it is compiled or interpreted, so
# the interpreter must be switched on before anything imports mta_kernels.
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import statistics  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from . import env, report  # noqa: E402
from .timing import error_status, free_memory  # noqa: E402

RUNS = Path(__file__).resolve().parent / "runs"
TRAIN_CSV = report.RESULTS_CSV
PROVIDERS = ("baseline", "mta-reference", "mta-fused")
ALIASES = {"reference": "mta-reference", "fused": "mta-fused"}
DTYPES = ("bf16", "fp32")
DTYPE_NOTES = {
    "bf16": "fp32 parameters, gradients and AdamW states; forward and loss under "
            "torch.autocast(bfloat16) (mixed precision, as the authors' bf16 training)",
    "fp32": "fp32 throughout, no autocast",
}
MTA_PARTS = ("pre_conv", "pre_mix", "post_conv", "post_mix")
LR = 1e-4

# Tiny model of the CPU default: 3 blocks, so that block 2 carries the convs (full MTA)
# and blocks 0 and 1 only mix heads, as in the paper's models.
TINY = dict(dim=64, n_layers=3, n_heads=4)
TINY_VOCAB = 256
MODELS = ("tiny", "300M", "550M", "830M", "1B")

# Defaults of the flags: (GPU, no GPU).
DEFAULTS = {
    True: dict(model="830M", seq=2048, batch=1, steps=10, warmup=3, dtype="bf16", rounds=3),
    False: dict(model="tiny", seq=32, batch=1, steps=2, warmup=1, dtype="fp32", rounds=1),
}

# The paper's 880M model (the 830M config) on H200s, and the target for fused MTA.
PAPER = dict(mta_tokens_per_s=5.7e3, mta_gb=73.8, base_tokens_per_s=54.3e3, base_gb=17.5)
PAPER_SPEED_RATIO = PAPER["mta_tokens_per_s"] / PAPER["base_tokens_per_s"]   # 0.105x
PAPER_MEMORY_RATIO = PAPER["mta_gb"] / PAPER["base_gb"]                      # 4.2x
TARGET_SPEED_RATIO = 0.5    # fused tokens/s >= 0.5x the baseline's
TARGET_MEMORY_RATIO = 1.3   # fused peak memory <= 1.3x the baseline's

COLUMNS = report.COLUMNS


# ---------------------------------------------------------------- models

def model_config(model: str, variant: str, layers: int, vocab: int):
    """MTATransformerConfig of ``model`` ('tiny' or a paper model) with ``layers`` blocks.

    variant 'mta' or 'baseline' (MTATransformerConfig's variants). MTA convs are 6x11 in
    blocks 2, 6, 10, ... (0-based) for every model, the tiny one included.
    """
    from mta_kernels.nn import MTATransformerConfig
    if model == "tiny":
        sizes = {**TINY, "n_layers": layers}
        return MTATransformerConfig(vocab_size=vocab, variant=variant, **sizes)
    return MTATransformerConfig.paper(model, variant, vocab_size=vocab, n_layers=layers)


def default_layers(model: str) -> int:
    """Number of blocks of ``model`` ('tiny' or a paper model)."""
    from mta_kernels.nn import PAPER_MODELS
    return TINY["n_layers"] if model == "tiny" else PAPER_MODELS[model]["n_layers"]


def default_vocab(model: str) -> int:
    """Vocabulary of ``model``: the paper's Llama 3 tokenizer (128256), 256 for 'tiny'."""
    from mta_kernels.nn.model import LLAMA3_VOCAB
    return TINY_VOCAB if model == "tiny" else LLAMA3_VOCAB


def sdpa_attention(config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention: q (B, H, S, D), k, v (B, Hkv, S, D) -> (B, H, S, D) via SDPA."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=config.causal,
                                          enable_gqa=config.Hkv != config.H)


def use_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """Make every attention layer of ``model`` call SDPA instead of its backend; returns it.

    Only for layers without MTA parts: it replaces ``MultiTokenAttention.attention`` on
    each instance (projections, RoPE and the output projection stay the layer's own).
    """
    from mta_kernels.nn import MultiTokenAttention
    for layer in model.modules():
        if isinstance(layer, MultiTokenAttention):
            parts = [p for p in MTA_PARTS if getattr(layer, p) is not None]
            if parts:
                raise ValueError(f"use_sdpa needs layers without MTA parts; this one has {parts}")
            layer.attention = functools.partial(sdpa_attention, layer.config)
    return model


def build_model(provider: str, model: str, layers: int, vocab: int, device, packed: bool = False) -> torch.nn.Module:
    """The provider's MTATransformer on ``device``, weights from seed 0, fp32 parameters. With
    ``packed`` the baseline keeps the package's plain path (SDPA per batch of documents), which
    takes cu_seqlens; otherwise it calls SDPA directly."""
    from mta_kernels.nn import MTATransformer
    variant = "baseline" if provider == "baseline" else "mta"
    backend = "fused" if provider == "mta-fused" else "reference"
    torch.manual_seed(0)
    with torch.device(device):   # initialise in place: no host copy of a 1B model
        net = MTATransformer(model_config(model, variant, layers, vocab), backend=backend)
    return use_sdpa(net) if provider == "baseline" and not packed else net


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied embedding/output weight counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- training

def random_batches(n: int, batch: int, seq: int, vocab: int, device, seed: int = 1) -> torch.Tensor:
    """n batches of uniform random tokens, (n, batch, seq + 1) int64: each step trains on
    ``seq`` input tokens and predicts the next one at every position."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (n, batch, seq + 1), generator=gen).to(device)


def packed_documents(n: int, tokens: int, seq: int, device, min_len: int = 64):
    """For each of n steps, offsets (int32 on ``device``) of documents of random lengths
    min_len .. seq packed into ``tokens`` tokens (the last one cut to fit)."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    steps = []
    for _ in range(n):
        offsets = [0]
        while offsets[-1] < tokens:
            length = int(torch.randint(min(min_len, seq), seq + 1, (1,), generator=gen))
            offsets.append(min(tokens, offsets[-1] + length))
        steps.append(torch.tensor(offsets, dtype=torch.int32, device=device))
    return steps


def autocast_context(dtype: str, device: torch.device):
    """Context factory for the forward: torch.autocast(bf16) for 'bf16', nothing for 'fp32'."""
    if dtype == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dtype: str, device, loss_fn=None):
    """One training step as a closure: (tokens (batch, seq + 1), cu_seqlens or None) -> loss
    (0-d tensor, not synced). zero_grad, forward and next-token loss under the dtype's autocast
    (none where the model computes in bf16 itself: FSDP2's mixed precision), backward, AdamW step.
    loss_fn: the model's loss (its module's, under DDP)."""
    autocast = autocast_context(dtype, device)
    loss_fn = loss_fn or model.loss

    def step(tokens: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(tokens, cu_seqlens=cu_seqlens)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def synchronize(device: torch.device):
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, batches: torch.Tensor, warmup: int, device: torch.device, documents=None) -> dict:
    """Run ``warmup`` untimed steps, then one step per remaining batch, timed.

    batches (warmup + steps, batch, seq + 1). Returns elapsed_s of the timed steps (from
    a synchronized start to a synchronized end), peak_gib (torch.cuda.max_memory_allocated
    during the timed steps, reset after warm-up; it includes parameters, gradients and
    AdamW states; None on CPU) and loss (float, the last step's).
    """
    documents = documents or [None] * len(batches)
    for tokens, cu in zip(batches[:warmup], documents[:warmup]):
        step(tokens, cu)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss = None
    start = time.perf_counter()
    for tokens, cu in zip(batches[warmup:], documents[warmup:]):
        loss = step(tokens, cu)
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(elapsed_s=elapsed, peak_gib=peak, loss=float("nan") if loss is None else loss.item())


def train_provider(provider: str, args, device: torch.device) -> dict:
    """Build the provider's model and AdamW(lr 1e-4), train it; returns the measured columns.

    tokens_per_s = batch * seq * steps / elapsed per GPU; step_ms = elapsed / steps (both
    None on CPU); under --dist the peak memory is the largest rank's; status 'ok',
    or 'error: non-finite loss' when the last loss is NaN or inf (numbers kept).
    """
    model = build_model(provider, args.model, args.layers, args.vocab, device, packed=args.packed)
    model.train()
    trained, dtype = model, args.dtype
    if args.dist:
        from mta_kernels.nn.parallel import shard
        fsdp = args.dist == "fsdp"
        trained = shard(model, args.dist, param_dtype=torch.bfloat16 if fsdp and args.dtype == "bf16" else None,
                        checkpoint=args.checkpoint, device_ids=[device.index] if args.dist == "ddp" else None)
        dtype = "fp32" if fsdp else args.dtype       # FSDP2's policy computes in bf16 itself
    optimizer = torch.optim.AdamW(trained.parameters(), lr=LR)
    rank = torch.distributed.get_rank() if args.dist else 0
    steps = args.warmup + args.steps
    if args.packed:     # one row of batch * seq tokens, documents packed along it
        batches = random_batches(steps, 1, args.batch * args.seq, args.vocab, device, seed=1 + rank)
        documents = packed_documents(steps, args.batch * args.seq + 1, args.seq, device)
    else:
        batches = random_batches(steps, args.batch, args.seq, args.vocab, device, seed=1 + rank)
        documents = None
    loss_fn = functools.partial(_forward_loss, trained) if args.dist == "ddp" else None
    m = timed_steps(make_step(trained, optimizer, dtype, device, loss_fn), batches, args.warmup, device, documents)
    if args.dist:
        peak = torch.tensor([m["peak_gib"] or 0.0], device=device)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        m["peak_gib"] = peak.item() if device.type == "cuda" else None
    status = "ok" if math.isfinite(m["loss"]) else f"error: non-finite loss {m['loss']}"
    timed = device.type == "cuda"   # the interpreter's times are not reported
    return dict(tokens_per_s=args.batch * args.seq * args.steps / m["elapsed_s"] if timed else None,
                peak_mem_gib=m["peak_gib"], step_ms=1e3 * m["elapsed_s"] / args.steps if timed else None,
                loss=m["loss"], params_m=count_params(model) / 1e6, status=status)


def _forward_loss(ddp_model, tokens, cu_seqlens=None):
    """MTATransformer.loss through DDP's forward, whose hooks reduce the gradients."""
    if cu_seqlens is None:
        logits = ddp_model(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    logits = ddp_model(tokens, cu_seqlens=cu_seqlens)[0, :-1]
    targets = tokens[0, 1:].clone()
    targets[cu_seqlens.to(targets.device, torch.int64)[1:-1] - 1] = -100
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


def run_provider(provider: str, args, device: torch.device) -> dict:
    """train_provider, with a failure recorded as a status; memory is freed afterwards."""
    try:
        result = train_provider(provider, args, device)
    except Exception as exc:  # a provider failure is a result, not a crash
        result = dict(status=error_status(exc))
    free_memory(device.type == "cuda")   # after the except block: the traceback is gone
    return result


# ---------------------------------------------------------------- markdown summary

def _ok(r) -> bool:
    return r is not None and r["status"] == "ok"


def speed_ratio(r, base):
    """r's tokens/s over base's, or None unless both ran ok."""
    return r["tokens_per_s"] / base["tokens_per_s"] if _ok(r) and _ok(base) else None


def memory_ratio(r, base):
    """r's peak memory over base's, or None unless both ran ok with a memory figure."""
    if not (_ok(r) and _ok(base)) or not r["peak_mem_gib"] or not base["peak_mem_gib"]:
        return None
    return r["peak_mem_gib"] / base["peak_mem_gib"]


def paired_speed_ratios(rows, base_rows) -> list:
    """Per round, rows' tokens/s over the baseline's of the same round (both ok), in round
    order. The providers alternate within a round, so a ratio compares runs made minutes
    apart: the H200 host's speed drifts between runs (baseline 75-109 ms/step in one session)."""
    base = {b["round"]: b for b in base_rows}
    ratios = [speed_ratio(r, base.get(r["round"])) for r in rows]
    return [x for x in ratios if x is not None]


def combine_rounds(rows) -> dict:
    """One provider's rounds as one row: median tokens/s and ms/step, their range, the
    largest peak memory, the last round's loss; status 'ok' only if every round was ok,
    else the first failure with how many rounds failed."""
    ok = [r for r in rows if _ok(r)]
    bad = [r for r in rows if not _ok(r)]
    status = "ok" if not bad else f"{bad[0]['status']} ({len(bad)} of {len(rows)} rounds)"
    if not ok:
        return dict(status=status, tokens_per_s=None, tokens_range=None, step_ms=None, peak_mem_gib=None,
                    params_m=None, loss=None, rounds=len(rows))
    tokens = [r["tokens_per_s"] for r in ok]
    peaks = [r["peak_mem_gib"] for r in ok if r["peak_mem_gib"] is not None]
    return dict(status=status, tokens_per_s=statistics.median(tokens), tokens_range=(min(tokens), max(tokens)),
                step_ms=statistics.median(r["step_ms"] for r in ok), peak_mem_gib=max(peaks) if peaks else None,
                params_m=ok[-1]["params_m"], loss=ok[-1]["loss"], rounds=len(rows))


def _by_provider(rows) -> "OrderedDict[str, list]":
    groups = OrderedDict()
    for r in rows:
        groups.setdefault(r["provider"], []).append(r)
    return groups


def _median_ratio(ratios):
    return statistics.median(ratios) if ratios else None


def _x(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.3g}x"


def _x_range(ratios) -> str:
    """'0.48x' for one round, '0.48x (0.39-0.52)' for several: median and range."""
    if len(ratios) < 2:
        return _x(_median_ratio(ratios))
    return f"{_x(_median_ratio(ratios))} ({min(ratios):.3g}-{max(ratios):.3g})"


def _num(x, fmt) -> str:
    return "-" if x is None else format(x, fmt)


def _met(ratio, bound, at_least: bool) -> str:
    if ratio is None:
        return "-"
    return "yes" if (ratio >= bound if at_least else ratio <= bound) else "no"


def _run_key(r):
    return (r["model"], r["layers"], r["seq"], r["batch"], r["vocab"], r["dtype"], r["steps"], r["warmup"])


def provider_table(rows) -> list:
    """Markdown lines: one row per provider, its rounds combined (combine_rounds), with the
    median over rounds of its tokens/s ratio to the baseline of the same round."""
    groups = _by_provider(rows)
    base_rows = groups.get("baseline", [])
    base = combine_rounds(base_rows) if base_rows else None
    out = ["| provider | tokens/s | ms/step | peak GiB | tokens/s vs baseline | memory vs baseline "
           "| params (M) | last loss | rounds | status |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for provider, group in groups.items():
        c = combine_rounds(group)
        tokens = _num(c["tokens_per_s"], ",.0f")
        if c["tokens_range"] and c["rounds"] > 1:
            tokens += f" ({c['tokens_range'][0]:,.0f}-{c['tokens_range'][1]:,.0f})"
        out.append(f"| {provider} | {tokens} | {_num(c['step_ms'], '.4g')} "
                   f"| {_num(c['peak_mem_gib'], '.2f')} | {_x_range(paired_speed_ratios(group, base_rows))} "
                   f"| {_x(memory_ratio(c, base))} | {_num(c['params_m'], '.1f')} "
                   f"| {_num(c['loss'], '.4g')} | {c['rounds']} | {c['status'].replace('|', '/')} |")
    return out


def ratio_table(rows) -> list:
    """Markdown lines: MTA/baseline ratios here (tokens/s: median over rounds of the paired
    ratios, with their range), the paper's, and the target for fused."""
    groups = _by_provider(rows)
    base_rows = groups.get("baseline", [])
    base = combine_rounds(base_rows) if base_rows else None
    fused, ref = groups.get("mta-fused", []), groups.get("mta-reference", [])
    s_fused, s_ref = paired_speed_ratios(fused, base_rows), paired_speed_ratios(ref, base_rows)
    m = memory_ratio(combine_rounds(fused), base) if fused else None
    m_ref = memory_ratio(combine_rounds(ref), base) if ref else None
    return ["| MTA / baseline | fused | reference | paper (materialized MTA) | target (fused) | fused meets target |",
            "|---|---:|---:|---:|---:|---|",
            f"| tokens/s | {_x_range(s_fused)} | {_x_range(s_ref)} | {PAPER_SPEED_RATIO:.3f}x "
            f"(5.7k / 54.3k) | >= {TARGET_SPEED_RATIO}x | {_met(_median_ratio(s_fused), TARGET_SPEED_RATIO, True)} |",
            f"| peak memory | {_x(m)} | {_x(m_ref)} | {PAPER_MEMORY_RATIO:.1f}x "
            f"(73.8 / 17.5 GB) | <= {TARGET_MEMORY_RATIO}x | {_met(m, TARGET_MEMORY_RATIO, False)} |"]


def markdown(rows) -> str:
    """A run's summary: per configuration, the provider table and the ratio table."""
    first = rows[0] if rows else {}
    out = [f"# MTA training benchmark: {first.get('gpu', '?')}, run {first.get('run', '?')}", "",
           f"torch {first.get('torch')}, triton {first.get('triton')}, commit {first.get('commit')}.", ""]
    groups = OrderedDict()
    for r in rows:
        groups.setdefault(_run_key(r), []).append(r)
    for (model, layers, seq, batch, vocab, dtype, steps, warmup), group in groups.items():
        out += [f"## {model}, {layers} layers, seq {seq}, batch {batch}, vocab {vocab}, {dtype}, "
                f"{steps} steps after {warmup} warm-up", ""]
        out += provider_table(group) + [""] + ratio_table(group) + [""]
    out += ["Peak memory is absolute (parameters, gradients, AdamW states and activations of one "
            "GPU); the paper's figures come from its own multi-GPU setup, so only the ratios compare.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- command line

def _providers(text):
    items = tuple(ALIASES.get(x.strip(), x.strip()) for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in PROVIDERS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(PROVIDERS)}")
    return items


def _int_at_least(lowest, what):
    """argparse type: an integer >= lowest, described as ``what`` in the error."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            n = lowest - 1
        if n < lowest:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
        return n
    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "a non-negative integer")


def parse_args(argv):
    d = DEFAULTS[ON_GPU]
    ap = argparse.ArgumentParser(
        prog="python -m bench.train",
        description="Training throughput (tokens/s) and peak memory of the paper's MTA models: SDPA "
                    "baseline, reference MTA, fused MTA. Without a GPU: a tiny fp32 model under the "
                    "Triton interpreter (a harness check; nothing is timed).")
    ap.add_argument("--model", choices=MODELS, default=d["model"],
                    help=f"paper model, or tiny (default {d['model']})")
    ap.add_argument("--layers", type=_positive, help="number of blocks (default: the model's)")
    ap.add_argument("--seq", type=_positive, default=d["seq"], help=f"sequence length (default {d['seq']})")
    ap.add_argument("--batch", type=_positive, default=d["batch"], help=f"sequences per step (default {d['batch']})")
    ap.add_argument("--steps", type=_positive, default=d["steps"], help=f"timed steps (default {d['steps']})")
    ap.add_argument("--warmup", type=_non_negative, default=d["warmup"],
                    help=f"untimed steps before them (default {d['warmup']})")
    ap.add_argument("--rounds", type=_positive, default=d["rounds"],
                    help=f"times every provider trains, alternating within each round; the summary "
                         f"takes medians over rounds (default {d['rounds']})")
    ap.add_argument("--providers", type=_providers, default=PROVIDERS,
                    help=f"comma list of {', '.join(PROVIDERS)} (default all)")
    ap.add_argument("--dtype", choices=DTYPES, default=d["dtype"],
                    help=f"bf16: fp32 params + autocast(bf16); fp32 (default {d['dtype']})")
    ap.add_argument("--vocab", type=_positive, help="vocabulary size (default: the model's; smaller saves memory)")
    ap.add_argument("--out", type=Path, default=RUNS,
                    help=f"folder of the run's CSV and summary (default {RUNS}, git-ignored)")
    ap.add_argument("--record", action="store_true", help=f"GPU: append the rows to {TRAIN_CSV}")
    ap.add_argument("--packed", action="store_true",
                    help="pack documents of random lengths 64..seq into each step's batch * seq tokens (cu_seqlens)")
    ap.add_argument("--dist", choices=("ddp", "fsdp"),
                    help="under torchrun: DistributedDataParallel or FSDP2 (fully_shard per block, bf16 policy); "
                         "tokens/s are per GPU, memory the largest rank's")
    ap.add_argument("--checkpoint", action="store_true", help="with --dist: recompute each block's activations")
    ap.add_argument("--report", type=Path, metavar="CSV", help="only print the markdown of a run in this CSV")
    ap.add_argument("--run", help="with --report: the run id (default: the CSV's last run)")
    args = ap.parse_args(argv)
    if args.record and not ON_GPU:
        ap.error("--record needs a GPU: without one nothing is measured")
    args.layers = args.layers or default_layers(args.model)
    args.vocab = args.vocab or default_vocab(args.model)
    return args


def describe_model(args) -> str:
    """'830M: dim 1536, 24 layers, 16 heads of D=96, vocab 128256, ...' for the chosen sizes."""
    c = model_config(args.model, "mta", args.layers, args.vocab)
    return (f"{args.model}: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads of D={c.dim // c.n_heads}, "
            f"vocab {c.vocab_size}, MTA convs {c.conv[0]}x{c.conv[1]} in blocks 2, 6, 10, ... (0-based), "
            f"head mixing in every block")


def progress_line(provider: str, r: dict) -> str:
    """One line per provider: tokens/s, ms/step, peak memory, loss, or the failure status."""
    if "loss" not in r:
        return f"{provider}: {r['status']}"
    speed = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f} tokens/s ({r['step_ms']:.4g} ms/step), "
    mem = "" if r["peak_mem_gib"] is None else f"peak {r['peak_mem_gib']:.2f} GiB, "
    return f"{provider}: {speed}{mem}loss {r['loss']:.4g}, {r['params_m']:.1f}M params: {r['status']}"


def _options(args) -> str:
    """The run's options column: packed documents, the distributed engine and world size."""
    parts = ["packed"] if args.packed else []
    if args.dist:
        parts.append(f"dist={args.dist},world={torch.distributed.get_world_size()}")
        if args.checkpoint:
            parts.append("checkpoint")
    return ";".join(parts)


def _device(args) -> torch.device:
    """This process's device; under --dist, joins the process group torchrun set up."""
    if not args.dist:
        return torch.device("cuda" if ON_GPU else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if ON_GPU:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if ON_GPU else "gloo")
    return torch.device("cuda", local) if ON_GPU else torch.device("cpu")


def run(args) -> tuple:
    """Train every provider ``args.rounds`` times, alternating (round 1: baseline, mta-reference,
    mta-fused; round 2: ...), one CSV row and one printed line each (rank 0's under --dist);
    returns (CSV path, run id)."""
    device = _device(args)
    lead = not args.dist or torch.distributed.get_rank() == 0
    info = env.run_info(ON_GPU)
    csv_path = TRAIN_CSV if args.record else args.out / f"{info['run']}_train.csv"
    say = print if lead else (lambda *a, **k: None)
    if not ON_GPU:
        say(f"no GPU: a harness check under the Triton interpreter; {report.NOT_PERFORMANCE}.", flush=True)
    say(f"run {info['run']}: {describe_model(args)}; seq {args.seq}, batch {args.batch}, {args.steps} steps "
        f"after {args.warmup} warm-up, {args.rounds} round(s), {args.dtype} ({DTYPE_NOTES[args.dtype]}); "
        f"{_options(args) or 'one device'}; {info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
        f"commit {info['commit']} -> {csv_path}", flush=True)
    log = report.CsvLog(csv_path, columns=COLUMNS, bench="train") if lead else None
    fixed = dict(info, model=args.model, layers=args.layers, L=args.seq, B=args.batch, op="train",
                 steps=args.steps, warmup=args.warmup, vocab=args.vocab, dtype=args.dtype, options=_options(args))
    runs = [(rnd, provider) for rnd in range(1, args.rounds + 1) for provider in args.providers]
    try:
        for i, (rnd, provider) in enumerate(runs, 1):
            say(f"[{i}/{len(runs)}] " + (f"round {rnd}, " if args.rounds > 1 else ""), end="", flush=True)
            result = run_provider(provider, args, device)
            if lead:
                log.write(dict(fixed, provider=provider, round=rnd, **result))
            say(progress_line(provider, result), flush=True)
    finally:
        if log is not None:
            log.close()
    return csv_path, info["run"]


def read_run(csv_path: Path, run=None) -> list:
    """The rows of one run of a training CSV (default its last), numbers parsed."""
    rows = report.select(report.read_csv(csv_path, bench="train"), run=run)
    for r in rows:
        r["batch"], r["seq"] = r["B"], r["L"]
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        print(markdown(read_run(args.report, args.run)))
        return 0
    csv_path, run_id = run(args)
    if args.dist:
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    rows = read_run(csv_path, run_id)
    if not ON_GPU:
        print(f"trained {len(rows)} models, {sum(r['status'] == 'ok' for r in rows)} ok; {report.NOT_PERFORMANCE}.")
        print(f"wrote {csv_path}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / f"{run_id}_train.md"
    md.write_text(markdown(rows))
    print("\n".join(ratio_table(rows)))
    print(f"wrote {csv_path}\nwrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
