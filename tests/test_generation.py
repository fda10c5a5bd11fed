"""Decoding with a cache: the layer's and the model's, on CPU (fused backend under the Triton
interpreter, fp32) and on a GPU.

Every decoded output is checked against the whole forward of the same tokens (no cache): the
reference backend in fp64 is the truth and its fp32 run sets the error allowed (the spec's
numerics rule). Both kinds of cache run: the default one (each step reads the keys up to the
longest sequence) and the static one (each step reads the whole buffers, lengths on the device,
as a captured CUDA graph does).
"""
import copy

import pytest
import torch

from mta_kernels.flash import sdpa_block
from mta_kernels.nn import MTATransformer, MTATransformerConfig
from mta_kernels.nn.cache import MTACache
from mta_kernels.nn.layer import MTAConfig, MultiTokenAttention
from mta_reference import mta_attention as reference_attention
from tolerance import check_rule

F64 = torch.float64

LAYERS = {
    "full-both": dict(pre_conv=(6, 11), post_conv=(6, 11), pre_mix=4, post_mix=4, head_norm=True, gate=True),
    "full-left": dict(pre_conv=(6, 11), post_conv=(6, 11), pre_mix=4, post_mix=4, pad_key="left"),
    "full-right": dict(pre_conv=(6, 11), post_conv=(2, 4), pre_mix=2, post_mix=2, pad_key="right"),
    "full-gqa": dict(pre_conv=(3, 5), post_conv=(3, 5), pre_mix=4, post_mix=4, n_kv_heads=2),
    "talking_heads": dict(pre_mix=4, post_mix=4),
    "baseline": dict(),
    "baseline-gqa": dict(n_kv_heads=1),
}


def make_layer(parts, seed=0, dim=32, n_heads=4):
    """A layer with every weight moved off its initial value (MTA weights near identity)."""
    with torch.random.fork_rng():      # the initial weights too, whichever tests ran before
        torch.manual_seed(seed)
        layer = MultiTokenAttention(MTAConfig(dim=dim, n_heads=n_heads, **parts), backend="fused")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_((0.3 if p.dim() > 1 else 0.1) * torch.randn(p.shape, generator=g))
    return layer.eval()


def whole(layer, x, dtype):
    """The layer's output (B, S, dim) over all of x without a cache, on the reference backend."""
    ref = copy.deepcopy(layer).to(dtype)
    ref.backend = "reference"
    with torch.no_grad():
        return ref(x.to(dtype))


def decode(layer, x, chunks, static, max_len=None):
    """x (B, S, dim) through the layer with a cache, in chunks of the given sizes -> (B, S, dim)."""
    B, S, _ = x.shape
    cache = MTACache([layer.config], B, max_len or S, x.dtype, x.device, static=static)
    outs, at = [], 0
    with torch.no_grad():
        for n in chunks:
            cache.begin(n)
            outs.append(layer(x[:, at:at + n], cache=cache.layers[0]))
            cache.end()
            at += n
    assert at == S
    return torch.cat(outs, dim=1)


def check_against_whole(layer, x, got):
    check_rule("decoded", got, whole(layer, x, F64), whole(layer, x, torch.float32), dtype=torch.float32)


@pytest.mark.parametrize("static", [False, True], ids=["sliced", "static"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_token_by_token_reproduces_the_whole_forward(name, static, device):
    layer = make_layer(LAYERS[name]).to(device)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1)).to(device)
    # a 2-token prefill, then one token per step; the static cache holds room for more
    got = decode(layer, x, [2] + [1] * 14, static, max_len=21 if static else None)
    check_against_whole(layer, x.cpu(), got.cpu())


@pytest.mark.parametrize("static", [False, True], ids=["sliced", "static"])
def test_prefill_in_odd_chunks_equals_one_prefill(static, device):
    layer = make_layer(LAYERS["full-both"], seed=2).to(device)
    x = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(3)).to(device)
    got = decode(layer, x, [5, 3, 7, 1, 3], static)
    check_against_whole(layer, x.cpu(), got.cpu())
    one = decode(layer, x, [19], static)
    assert (got - one).abs().max().item() < 1e-5


def tiny_model(backend="fused", seed=0, **overrides):
    """3 layers: talking heads, talking heads, 3x5 convs (layer 2), all weights off identity."""
    sizes = dict(vocab_size=48, dim=32, n_layers=3, n_heads=4, conv=(3, 5), multiple_of=16)
    cfg = MTATransformerConfig(**{**sizes, **overrides})
    with torch.random.fork_rng():      # the initial weights too, whichever tests ran before
        torch.manual_seed(seed)
        model = MTATransformer(cfg, backend=backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("static", [False, True], ids=["sliced", "static"])
def test_ragged_batch_equals_each_sequence_alone(static, device):
    model = tiny_model().to(device)
    g = torch.Generator().manual_seed(4)
    lens = [7, 3, 5]
    ids = torch.randint(1, 48, (3, 7), generator=g).to(device)       # right-padded prompts
    steps = torch.randint(1, 48, (3, 4), generator=g).to(device)     # then 4 tokens each
    cache = model.new_cache(3, 11, static=static)
    with torch.no_grad():
        first = model(ids, cache=cache, new_tokens=torch.tensor(lens))
        later = [model(steps[:, i:i + 1], cache=cache)[:, 0] for i in range(4)]
        for b, n in enumerate(lens):
            alone = model(torch.cat([ids[b:b + 1, :n], steps[b:b + 1]], dim=1))[0]
            assert (first[b, :n] - alone[:n]).abs().max().item() < 1e-4, b
            for i in range(4):
                assert (later[i][b] - alone[n + i]).abs().max().item() < 1e-4, (b, i)
    assert cache.lengths.tolist() == [n + 4 for n in lens]


@torch.no_grad()
def greedy_by_recomputation(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("variant", ["mta", "talking_heads", "baseline"])
def test_greedy_generate_equals_recomputation(variant, device):
    model = tiny_model(variant=variant, seed=5).to(device)
    ids = torch.randint(1, 48, (2, 6), generator=torch.Generator().manual_seed(6)).to(device)
    out = model.generate(ids, 6)
    assert torch.equal(out.tokens, greedy_by_recomputation(model, ids, 6))
    assert out.lengths.tolist() == [12, 12]


def test_generate_stops_and_samples(device):
    model = tiny_model(seed=7).to(device)
    ids = torch.randint(1, 48, (2, 4), generator=torch.Generator().manual_seed(8)).to(device)
    greedy = model.generate(ids, 5).tokens
    stop = int(greedy[0, 5])                  # row 0's second new token
    end = 4 + int((greedy[0, 4:] == stop).nonzero()[0]) + 1     # just after its first emission
    out = model.generate(ids, 5, stop_tokens=[stop], pad_token_id=0)
    assert out.lengths[0] == end and torch.equal(out.tokens[0, :end], greedy[0, :end])
    assert (out.tokens[0, end:] == 0).all()
    sample = dict(temperature=1.3, top_k=5)
    a = model.generate(ids, 5, generator=torch.Generator(device).manual_seed(9), **sample).tokens
    b = model.generate(ids, 5, generator=torch.Generator(device).manual_seed(9), **sample).tokens
    assert torch.equal(a, b)


def test_cache_errors(device):
    layer = make_layer(LAYERS["full-both"]).to(device)
    x = torch.randn(1, 6, 32).to(device)
    cache = MTACache([layer.config], 1, 6, x.dtype, x.device)
    cache.begin(4)
    layer(x[:, :4], cache=cache.layers[0])
    cache.end()
    cache.begin(3)
    with pytest.raises(ValueError, match="cache holds 6 positions"):
        layer(x[:, :3], cache=cache.layers[0])
    with pytest.raises(ValueError, match="new_tokens"):
        cache.begin(2, torch.tensor([3]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, cache=cache.layers[0], cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    encoder = make_layer(dict(pre_mix=4, post_mix=4, causal=False)).to(device)
    with pytest.raises(ValueError, match="causal"):
        encoder(x, cache=MTACache([encoder.config], 1, 6, x.dtype, x.device).layers[0])
    model = tiny_model().to(device)
    if device == "cpu":
        with pytest.raises(ValueError, match="cuda_graph"):
            model.generate(torch.ones(1, 3, dtype=torch.int64), 2, cuda_graph=True)


@pytest.mark.parametrize("causal", [True, False])
def test_plain_block_through_one_masked_sdpa_call(causal):
    """sdpa_block (CUDA's plain-attention path for a ragged block, lengths kept on the device)
    against the reference with seqlens; what lies past a sequence's keys must not matter."""
    g = torch.Generator().manual_seed(10)
    B, H, Hkv, Lq, Lk, D = 3, 4, 2, 2, 12, 8
    q = torch.randn(B, H, Lq, D, generator=g, dtype=F64)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g, dtype=F64) for _ in range(2))
    lens = torch.tensor([12, 5, 2])
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        k2[b, :, n:], v2[b, :, n:] = 1e3, 1e3
    got = sdpa_block(q, k2, v2, lens, causal, D ** -0.5)
    want = reference_attention(q, k, v, causal=causal, seqlens=lens, compute_dtype=F64)
    assert (got - want).abs().max().item() < 1e-12


# ----------------------------------------------------------------------------- GPU

@torch.no_grad()
def greedy_on_a_static_cache(model, ids, n, lens):
    """Greedy decoding stepped eagerly over a static cache, prompts right-padded to lens (B,): the
    very kernels and shapes that generate(cuda_graph=True) captures, so its tokens must be equal.
    Returns each row's new tokens (B, n)."""
    B, S = ids.shape
    cache = model.new_cache(B, S + n, static=True)
    logits = model(ids, cache=cache, new_tokens=torch.tensor(lens))
    last = logits[torch.arange(B), torch.tensor(lens) - 1]
    new = []
    for i in range(n):
        token = last.argmax(-1)
        new.append(token)
        if i < n - 1:
            last = model(token[:, None], cache=cache)[:, -1]
    return torch.stack(new, dim=1)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mta", "baseline"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_with_cuda_graph_gpu(variant, dtype):
    model = tiny_model(variant=variant, dim=128, n_heads=4).cuda().to(dtype)
    ids = torch.randint(1, 48, (3, 40), generator=torch.Generator().manual_seed(11)).cuda()
    for lens in ([40, 40, 40], [40, 17, 29]):
        graphed = model.generate(ids, 24, prompt_lengths=lens, cuda_graph=True)
        want = greedy_on_a_static_cache(model, ids, 24, lens)
        for b, n in enumerate(lens):
            assert torch.equal(graphed.tokens[b, n:n + 24], want[b]), (lens, b)
