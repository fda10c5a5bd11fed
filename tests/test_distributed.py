"""DDP and FSDP2 on the CPU (gloo, two processes): three training steps of a tiny MTA model give
the loss and parameters of one process training on the same global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mta_kernels.nn import MTATransformer, MTATransformerConfig
from mta_kernels.nn.parallel import shard

CONFIG = MTATransformerConfig(vocab_size=31, dim=32, n_layers=2, n_heads=4, conv=(2, 3), ffn_hidden_dim=32)
STEPS, BATCH, SEQ = 3, 4, 12


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def _model(backend):
    torch.manual_seed(0)
    model = MTATransformer(CONFIG, backend=backend).double()
    with torch.no_grad():       # weights away from identity, so that the MTA parts matter
        for name, p in model.named_parameters():
            if "conv" in name or "mix" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    return model


def _train(model, batches, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)   # linear in the gradients: sum order shows at 1e-16
    losses = []
    for tokens in batches:
        part = tokens.chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        logits = model(part[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), part[:, 1:].flatten())
        loss.backward()
        opt.step()
        reported = loss.detach().clone()
        if world > 1:
            dist.all_reduce(reported)
            reported /= world
        losses.append(reported.item())
    return losses


def _worker(rank, world, port, mode, backend, result_path, compiled=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "fused":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = shard(_model(backend), mode, reduce_dtype=None)     # fp64 end to end
        if compiled:        # each block compiled under FSDP2, as the authors compile theirs
            for block in model.layers:
                block.compile()
        losses = _train(model, _batches(), rank, world)
        inner = model.module if mode == "ddp" else model
        state = {}
        for name, p in inner.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            state[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().clone()
        if rank == 0:
            torch.save((losses, state), result_path)
        dist.barrier()          # neither rank closes its connections while the other still sends
    finally:
        dist.destroy_process_group()
    # skip interpreter finalization: gloo's threads can abort there (SIGABRT, "terminate called
    # without an active exception") after everything this test checks has been written
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend, mode, compiled", [("reference", "ddp", False), ("reference", "fsdp", False),
                                                     ("fused", "ddp", False), ("fused", "fsdp", False),
                                                     ("fused", "fsdp", True)],
                         ids=["reference-ddp", "reference-fsdp", "fused-ddp", "fused-fsdp", "fused-fsdp-compiled"])
def test_two_processes_match_one(mode, backend, compiled, tmp_path):
    model = _model(backend)
    losses = _train(model, _batches())
    expected = {n: p.detach() for n, p in model.named_parameters()}
    result = tmp_path / "rank0.pt"
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, port, mode, backend, str(result), compiled)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
        assert p.exitcode == 0
    got_losses, state = torch.load(result)
    assert got_losses == pytest.approx(losses, rel=1e-9, abs=1e-12)
    assert set(state) == set(expected)
    for name, p in expected.items():
        torch.testing.assert_close(state[name], p, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
