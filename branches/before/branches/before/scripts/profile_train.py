"""Where one training step of the paper's 830M model with fused MTA spends its GPU time
(seq 2048, batch 1, bf16 autocast, AdamW): torch.profiler over one step after two warm-up
steps; prints the top CUDA kernels of both (the fused step's extra kernels are the difference)."""
import time

import torch

from bench.train import build_model, default_layers, make_step, random_batches
from mta_kernels.models import LLAMA3_VOCAB

device = torch.device("cuda")
SEQ = 2048
for provider in ("baseline", "fused"):
    model = build_model(provider, "830M", default_layers("830M"), LLAMA3_VOCAB, device)
    model.train()
    step = make_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), "bf16", device)
    batches = random_batches(6, 1, SEQ, LLAMA3_VOCAB, device)
    for tokens in batches[:2]:
        step(tokens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for tokens in batches[2:5]:
        step(tokens)
    torch.cuda.synchronize()
    print(f"{provider}: {(time.perf_counter() - t0) / 3 * 1e3:.1f} ms/step", flush=True)
    # both providers: the kernels the fused step adds are the difference of the two tables
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(batches[5])
        torch.cuda.synchronize()
    print(f"{provider}: kernels of one step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25 if provider == "fused" else 15,
                                    max_name_column_width=80))
    del model, step
    torch.cuda.empty_cache()
