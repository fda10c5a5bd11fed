"""``MultiTokenAttention`` and the small MTA transformer, on CPU.

The expected values never come from the layer's own code: they come from an SDPA
attention block (identity MTA weights) and from an authors-style forward written out
below from the authors' parameter names and layouts (materialized scores, F.conv2d on the
(H, 1, cq, ck) kernels, nn.Linear-style head mixing, head_kernel indexed [group, in, out]).
The fused backend runs under the Triton interpreter (tests/conftest.py), in fp32.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mta_kernels.nn.layer import (PAPER_MODELS, MTAConfig, MultiTokenAttention, apply_rope,
                                  depth_lambda, is_conv_layer, rope_angles)
from mta_kernels.nn.model import MTATransformer, MTATransformerConfig, train_step
from tolerance import check_rule

F64 = torch.float64
BACKENDS = ("reference", "fused")


# ----------------------------------------------------------------------------- independent code

def llama_rope(x, theta):
    """Meta's Llama reference: consecutive pairs as complex numbers. x (B, S, H, D)."""
    B, S, H, D = x.shape
    real = torch.float64 if x.dtype == F64 else torch.float32
    freqs = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=real)[: D // 2] / D))
    freqs_cis = torch.polar(torch.ones(S, D // 2, dtype=real), torch.outer(torch.arange(S, dtype=real), freqs))
    xc = torch.view_as_complex(x.to(real).reshape(B, S, H, D // 2, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None]).flatten(3).type_as(x)


def official_forward(sd, x, *, n_heads, n_kv_heads=None, rope_theta=1e4, pad_key="both",
                     layer_norm_rescale=False, layer_id=0):
    """The authors' attention forward, written from their parameter names and layouts.

    sd: their state dict (wq.weight, ..., mta_kernel (H, 1, cq, ck), wpsm.weight (H, H),
    head_kernel (G, ch, ch) [group, in, out] or wposm.weight, subln.weight, gate.*).
    Which parts run is read off the keys present. x (B, S, dim) -> (B, S, dim).
    """
    B, S, _ = x.shape
    H = n_heads
    Hkv = n_kv_heads or H
    D = sd["wq.weight"].shape[0] // H
    xq = F.linear(x, sd["wq.weight"]).view(B, S, H, D)
    xk = F.linear(x, sd["wk.weight"]).view(B, S, Hkv, D)
    xv = F.linear(x, sd["wv.weight"]).view(B, S, Hkv, D)
    xq, xk = llama_rope(xq, rope_theta), llama_rope(xk, rope_theta)
    xk = torch.repeat_interleave(xk, H // Hkv, dim=2)
    xv = torch.repeat_interleave(xv, H // Hkv, dim=2)
    xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))                    # B H S D
    mask = torch.triu(torch.full((S, S), float("-inf"), dtype=x.dtype), diagonal=1).repeat(B, H, 1, 1)

    def conv(scores, kernel):
        scores = scores.masked_fill(mask == float("-inf"), 0.0)
        kdim, qdim = kernel.shape[-1], kernel.shape[-2]
        pads = {"left": (kdim - 1, 0), "right": (0, kdim - 1),
                "both": ((kdim - 1) // 2, (kdim - 1) // 2)}[pad_key]
        return F.conv2d(F.pad(scores, (*pads, qdim - 1, 0)), kernel, groups=H)

    scores = torch.matmul(xq, xk.transpose(2, 3)) / math.sqrt(D)
    if "mta_kernel" in sd:
        scores = conv(scores, sd["mta_kernel"])
    if "wpsm.weight" in sd:
        scores = F.linear(scores.transpose(1, -1), sd["wpsm.weight"]).transpose(1, -1)
    scores = F.softmax((scores + mask).float() if x.dtype != F64 else scores + mask, dim=-1).type_as(xq)
    if "mta_kernel_after_sm" in sd:
        scores = conv(scores, sd["mta_kernel_after_sm"])
        scores = torch.where(mask == float("-inf"), 0.0, scores)
    if "head_kernel" in sd:
        hk = sd["head_kernel"]
        G, ch, _ = hk.shape
        grouped = scores.reshape(B, G, ch, S, S)
        scores = torch.stack([torch.matmul(grouped[:, g].transpose(1, -1), hk[g]).transpose(1, -1)
                              for g in range(G)], dim=1).reshape(B, H, S, S)
    elif "wposm.weight" in sd:
        scores = F.linear(scores.transpose(1, -1), sd["wposm.weight"]).transpose(1, -1)
    out = torch.matmul(scores, xv).transpose(1, 2)                                # B S H D
    if "subln.weight" in sd:
        n = out.float() if x.dtype != F64 else out
        out = (n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(out) * sd["subln.weight"]
        if layer_norm_rescale:
            out = out * (1 - (0.8 - 0.6 * math.exp(-0.3 * layer_id)))
    if "gate.weight" in sd:
        out = out * torch.sigmoid(F.linear(out, sd["gate.weight"], sd["gate.bias"]))
    return F.linear(out.reshape(B, S, H * D), sd["wo.weight"])


def sdpa_block(layer, x):
    """Standard attention block with the layer's projections: RoPE, causal SDPA, wo."""
    c = layer.config
    B, S, _ = x.shape
    wq, wk, wv, wo = (w.weight.detach().to(x.dtype) for w in (layer.wq, layer.wk, layer.wv, layer.wo))
    q = llama_rope(F.linear(x, wq).view(B, S, c.H, c.D), c.rope_theta).transpose(1, 2)
    k = llama_rope(F.linear(x, wk).view(B, S, c.Hkv, c.D), c.rope_theta).transpose(1, 2)
    v = F.linear(x, wv).view(B, S, c.Hkv, c.D).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.Hkv != c.H)
    return F.linear(o.transpose(1, 2).reshape(B, S, c.H * c.D), wo)


def randomize_official(sd, seed=0):
    """Random non-identity values for every official tensor (MTA weights near identity)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sd.items():
        noise = torch.randn(t.shape, generator=g)
        if name in ("mta_kernel", "mta_kernel_after_sm", "wpsm.weight", "wposm.weight", "head_kernel", "subln.weight"):
            out[name] = t + 0.3 * noise
        elif name.startswith("gate"):
            out[name] = noise
        else:
            out[name] = 0.3 * noise
    return out


def x_input(B, S, dim, dtype=torch.float32, seed=1):
    return torch.randn(B, S, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# ----------------------------------------------------------------------------- config, init, RoPE

def test_config_validation():
    with pytest.raises(ValueError, match="pad_key"):
        MTAConfig(dim=32, n_heads=4, pad_key="middle")
    with pytest.raises(ValueError, match="pre_conv"):
        MTAConfig(dim=32, n_heads=4, pre_conv=(2, 4))
    with pytest.raises(ValueError, match="post_mix"):
        MTAConfig(dim=32, n_heads=4, post_mix=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        MTAConfig(dim=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        MTAConfig(dim=36, n_heads=4)
    with pytest.raises(ValueError, match="backend"):
        MultiTokenAttention(MTAConfig(dim=32, n_heads=4), backend="flash")
    with pytest.raises(ValueError, match="variant"):
        MTAConfig.for_layer(32, 4, 0, "mystery")
    with pytest.raises(ValueError, match="x must have shape"):
        MultiTokenAttention(MTAConfig(dim=32, n_heads=4), backend="reference")(torch.randn(2, 5, 16))


def test_identity_initialisation():
    layer = MultiTokenAttention(MTAConfig(dim=32, n_heads=4, pre_conv=(2, 3), pre_mix=2, post_conv=(3, 5),
                                          post_mix=4, head_norm=True, gate=True, pad_key="left"))
    pre, post = torch.zeros(4, 2, 3), torch.zeros(4, 3, 5)
    pre[:, 1, 2] = 1.0           # current query row, same key: pL = ck - 1 for 'left'
    post[:, 2, 4] = 1.0
    assert torch.equal(layer.pre_conv, pre) and torch.equal(layer.post_conv, post)
    assert torch.equal(layer.pre_mix, torch.eye(2).expand(2, 2, 2))
    assert torch.equal(layer.post_mix, torch.eye(4)[None])
    assert torch.equal(layer.norm_weight, torch.ones(8))
    assert torch.equal(torch.sigmoid(layer.gate(torch.randn(3, 8))), torch.full((3, 1), 0.5))
    assert layer.gate.weight.shape == (1, 8) and layer.gate.bias.shape == (1,)


def test_depth_lambda():
    assert depth_lambda(0) == pytest.approx(0.2)
    assert depth_lambda(5) == pytest.approx(0.8 - 0.6 * math.exp(-1.5))
    assert MTAConfig(dim=32, n_heads=4, head_norm=True, depth_scaling=True, layer_id=3).depth_scale == \
        pytest.approx(1 - (0.8 - 0.6 * math.exp(-0.9)))


def test_rope_is_consecutive_pairs():
    x = torch.randn(2, 7, 3, 8, dtype=F64)
    cos, sin = rope_angles(7, 8, 1e5, dtype=F64)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out, llama_rope(x, 1e5), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)        # position 0 is not rotated
    # (x[0], x[1]) at position 1 rotates by angle 1 (frequency theta^0)
    c, s = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(out[:, 1, :, 0], c * x[:, 1, :, 0] - s * x[:, 1, :, 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, 1, :, 1], s * x[:, 1, :, 0] + c * x[:, 1, :, 1], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- layer vs SDPA and vs the authors

IDENTITY_CASES = [
    dict(pre_conv=(3, 5), pre_mix=4, post_conv=(2, 3), post_mix=4),                   # all four parts
    dict(n_kv_heads=2, pre_conv=(2, 4), post_mix=2, pad_key="left"),                 # GQA, small groups
    dict(n_kv_heads=1, post_conv=(3, 3), pad_key="right"),                           # MQA
    dict(),                                                                          # plain attention
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parts", IDENTITY_CASES, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()) or "none")
def test_identity_layer_equals_sdpa_block(backend, parts):
    torch.manual_seed(0)
    layer = MultiTokenAttention(MTAConfig(dim=32, n_heads=4, **parts), backend=backend)
    x = x_input(2, 19, 32)
    with torch.no_grad():
        out = layer(x)
        check_rule("out", out, sdpa_block(layer, x.double()), sdpa_block(layer, x))


def _official_cases():
    paper_like = dict(query_kernel_size=2, key_kernel_size=3, after_sm_query_kernel_size=3,
                      after_sm_key_kernel_size=5, pre_sm_linear_head=True, head_kernel_size=4,
                      group_norm=True, add_gating=True, mta_layers="2,6")
    return [
        ("mta-layer2", dict(n_heads=4, layer_id=2, **paper_like)),
        ("mta-layer3-noconv", dict(n_heads=4, layer_id=3, **paper_like)),
        ("rescale-gqa-wposm-gate2d-left", dict(
            n_heads=4, n_kv_heads=2, layer_id=5, query_kernel_size=3, key_kernel_size=2, pad_key="left",
            post_sm_linear_head=True, group_norm=True, layer_norm_rescale=True, add_gating=True, gate_1d=False)),
        ("groups2-default1x1-right", dict(n_heads=4, pad_key="right", head_kernel_size=2,
                                          after_sm_query_kernel_size=2, after_sm_key_kernel_size=2)),
        ("talking-heads", dict(n_heads=4, query_kernel_size=None, head_kernel_size=4, pre_sm_linear_head=True)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _official_cases(), ids=lambda c: c[0])
def test_matches_official_forward(backend, case):
    _, args = case
    args = dict(args)
    n_heads, n_kv_heads, layer_id = args.pop("n_heads"), args.pop("n_kv_heads", None), args.pop("layer_id", 0)
    theta = 1e5
    layer = MultiTokenAttention.from_official_args(dim=32, n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=theta,
                                                   layer_id=layer_id, backend=backend, **args)
    sd = randomize_official(layer.official_state_dict())
    layer.load_official_state_dict(sd)
    kw = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=theta, pad_key=args.get("pad_key", "both"),
              layer_norm_rescale=args.get("layer_norm_rescale", False), layer_id=layer_id)
    x = x_input(2, 17, 32)
    sd64 = {k: v.double() for k, v in sd.items()}
    ref = official_forward(sd64, x.double(), **kw)
    with torch.no_grad():
        check_rule("out", layer(x), ref, official_forward(sd, x, **kw))
        if backend == "reference":     # same math exactly: fp64 all the way through
            torch.testing.assert_close(layer.double()(x.double()), ref, rtol=0, atol=1e-12)


def test_official_round_trip_and_names():
    layer = MultiTokenAttention.from_official_args(dim=32, n_heads=4, query_kernel_size=2, key_kernel_size=3,
                                                   pre_sm_linear_head=True, post_sm_linear_head=True,
                                                   group_norm=True, add_gating=True, backend="reference")
    sd = randomize_official(layer.official_state_dict(), seed=3)
    assert set(sd) == {"wq.weight", "wk.weight", "wv.weight", "wo.weight", "mta_kernel", "wpsm.weight",
                       "wposm.weight", "subln.weight", "gate.weight", "gate.bias"}
    layer.load_official_state_dict(sd)
    # our layouts (spec section 7)
    torch.testing.assert_close(layer.pre_conv, sd["mta_kernel"][:, 0], rtol=0, atol=0)
    torch.testing.assert_close(layer.pre_mix, sd["wpsm.weight"][None], rtol=0, atol=0)
    torch.testing.assert_close(layer.post_mix, sd["wposm.weight"][None], rtol=0, atol=0)
    back = layer.official_state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    # head_kernel is [group, in, out]: ours is its transpose
    hk_layer = MultiTokenAttention.from_official_args(dim=32, n_heads=4, query_kernel_size=None, head_kernel_size=2)
    hk = torch.randn(2, 2, 2)
    sd = randomize_official(hk_layer.official_state_dict())
    hk_layer.load_official_state_dict({**sd, "head_kernel": hk})
    torch.testing.assert_close(hk_layer.post_mix, hk.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(hk_layer.official_state_dict()["head_kernel"], hk, rtol=0, atol=0)


def test_load_official_errors_and_prefix():
    layer = MultiTokenAttention.from_official_args(dim=32, n_heads=4, query_kernel_size=None, head_kernel_size=4,
                                                   pre_sm_linear_head=True, group_norm=True)
    sd = layer.official_state_dict()
    with pytest.raises(KeyError, match="wpsm.weight"):
        layer.load_official_state_dict({k: v for k, v in sd.items() if k != "wpsm.weight"})
    with pytest.raises(ValueError, match="mta_kernel"):
        layer.load_official_state_dict({**sd, "mta_kernel": torch.zeros(4, 1, 1, 1)})
    with pytest.raises(ValueError, match="subln.weight"):
        layer.load_official_state_dict({**sd, "subln.weight": torch.ones(4)})
    with pytest.raises(ValueError, match="both"):
        layer.load_official_state_dict({**sd, "wposm.weight": torch.eye(4)})
    # wposm instead of head_kernel is the same math over all heads
    w = torch.randn(4, 4)
    alt = {k: v for k, v in sd.items() if k != "head_kernel"}
    layer.load_official_state_dict({**alt, "wposm.weight": w})
    torch.testing.assert_close(layer.post_mix, w[None], rtol=0, atol=0)
    # a whole model's state dict, one attention module picked by prefix
    full = {f"layers.1.attention.{k}": v + 1 for k, v in sd.items()}
    full["layers.1.feed_forward.w1.weight"] = torch.zeros(3)
    layer.load_official_state_dict(full, prefix="layers.1.attention.")
    torch.testing.assert_close(layer.norm_weight, sd["subln.weight"] + 1, rtol=0, atol=0)


def test_from_official_args_reproduces_paper_configs():
    """The authors' released 300M yamls (their names, their values) give the paper presets."""
    mta_yaml = dict(use_mta=True, pre_sm_linear_head=True, query_kernel_size=6, key_kernel_size=11,
                    head_kernel_size=16, after_sm_query_kernel_size=6, after_sm_key_kernel_size=11,
                    init_method="identity", pad_key="both", mta_layers="2,6,10,14,18", group_norm=True,
                    layer_norm_rescale=False, add_gating=True, gate_1d=True)
    th_yaml = dict(use_mta=True, query_kernel_size=None, head_kernel_size=16, init_method="identity",
                   pre_sm_linear_head=True)
    sizes = PAPER_MODELS["300M"]
    for layer_id in range(sizes["n_layers"]):
        cfg, post = MultiTokenAttention.official_config(dim=1024, n_heads=16, rope_theta=100_000,
                                                        layer_id=layer_id, **mta_yaml)
        assert cfg == MTAConfig.paper("300M", layer_id) and post == "head_kernel"
        assert (cfg.pre_conv is not None) == (layer_id in (2, 6, 10, 14, 18)) == is_conv_layer(layer_id)
        cfg, _ = MultiTokenAttention.official_config(dim=1024, n_heads=16, rope_theta=100_000,
                                                     layer_id=layer_id, **th_yaml)
        assert cfg == MTAConfig.paper("300M", layer_id, variant="talking_heads")
    cfg, _ = MultiTokenAttention.official_config(dim=64, n_heads=4, use_mta=False, group_norm=True)
    assert (cfg.pre_conv, cfg.pre_mix, cfg.post_conv, cfg.post_mix, cfg.head_norm) == (None, None, None, None, True)
    cfg, _ = MultiTokenAttention.official_config(dim=64, n_heads=4)     # the authors' defaults: a 1x1 pre conv
    assert cfg.pre_conv == (1, 1) and cfg.rope_theta == 1e4
    with pytest.raises(TypeError, match="kernel_sz"):
        MultiTokenAttention.official_config(dim=64, n_heads=4, kernel_sz=3)
    with pytest.raises(ValueError, match="exclusive"):
        MultiTokenAttention.official_config(dim=64, n_heads=4, head_kernel_size=4, post_sm_linear_head=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_parameter(backend):
    torch.manual_seed(0)
    layer = MultiTokenAttention(MTAConfig.for_layer(32, 4, 2, conv=(2, 3)), backend=backend)
    layer(x_input(1, 11, 32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name



@pytest.mark.parametrize("parts", [dict(post_mix=1), dict(pre_mix=1, post_mix=1),
                                   dict(pre_conv=(2, 3), pre_mix=1, post_conv=(2, 3), post_mix=1)],
                         ids=["post_mix1", "mixes1", "full-mixes1"])
def test_groups_of_one_head_match_the_reference_backend(parts):
    """Mixing groups of one head: the fused layer's output equals the reference backend's."""
    torch.manual_seed(0)
    layer = MultiTokenAttention(MTAConfig(dim=32, n_heads=4, **parts), backend="reference").double()
    with torch.no_grad():
        for name in ("pre_mix", "post_mix"):
            w = getattr(layer, name)
            if w is not None:
                w.uniform_(0.5, 1.5)
    x = x_input(2, 13, 32).double()
    ref = layer(x)
    layer.backend = "fused"
    out = layer(x)
    assert out.abs().max() > 0.1 * ref.abs().max()
    assert (out - ref).abs().max().item() < 1e-10


# ----------------------------------------------------------------------------- the model

def test_model_layer_pattern():
    cfg = MTATransformerConfig(vocab_size=11, dim=32, n_layers=11, n_heads=4, conv=(2, 3), ffn_hidden_dim=16)
    model = MTATransformer(cfg, backend="reference")
    convs = [i for i, b in enumerate(model.layers) if b.attention.pre_conv is not None]
    assert convs == [i for i, b in enumerate(model.layers) if b.attention.post_conv is not None] == [2, 6, 10]
    assert all(b.attention.config.pre_mix == b.attention.config.post_mix == 4 for b in model.layers)
    assert all(b.attention.gate is not None and b.attention.norm_weight is not None for b in model.layers)
    assert model.output.weight is model.tok_embeddings.weight
    th = MTATransformerConfig(vocab_size=11, dim=32, n_layers=4, n_heads=4, variant="talking_heads")
    assert all(th.layer_config(i).pre_conv is None and th.layer_config(i).pre_mix == 4 for i in range(4))
    base = MTATransformerConfig(vocab_size=11, dim=32, n_layers=4, n_heads=4, variant="baseline")
    assert base.layer_config(2) == MTAConfig(dim=32, n_heads=4, layer_id=2)
    paper = MTATransformerConfig.paper("1B", depth_scaling=True)
    assert [i for i in range(paper.n_layers) if paper.layer_config(i).pre_conv == (6, 11)] == [2, 6, 10, 14, 18, 22]
    assert paper.layer_config(5).depth_scaling and paper.hidden_dim % 256 == 0
    assert MTATransformerConfig.paper("830M").layer_config(0).D == 96


def stride_batches(steps, B=4, S=16, V=16, seed=0):
    """Sequences t_{i+1} = (t_i + stride) mod V, random start and stride in {1, 2, 3}."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, V, (B, 1), generator=g)
        stride = torch.randint(1, 4, (B, 1), generator=g)
        yield (start + stride * torch.arange(S + 1)) % V


def tiny_model(backend, n_layers=3):
    torch.manual_seed(0)
    cfg = MTATransformerConfig(vocab_size=16, dim=32, n_layers=n_layers, n_heads=4, conv=(2, 3), ffn_hidden_dim=64)
    return MTATransformer(cfg, backend=backend)


def test_training_reduces_loss():
    model = tiny_model("reference")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = [train_step(model, opt, tokens) for tokens in stride_batches(40)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


def test_fused_and_reference_same_loss_curve():
    ref_model = tiny_model("reference")
    fused_model = copy.deepcopy(ref_model).set_backend("fused")
    curves = []
    for model in (ref_model, fused_model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = next(stride_batches(1, B=2))       # one fixed batch: the loss must go down
        curves.append([train_step(model, opt, tokens) for _ in range(3)])
    ref_curve, fused_curve = curves
    assert ref_curve[-1] < 0.9 * ref_curve[0], ref_curve
    torch.testing.assert_close(torch.tensor(fused_curve), torch.tensor(ref_curve), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ref_model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)
