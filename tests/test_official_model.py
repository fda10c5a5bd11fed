"""The authors' whole-model checkpoints (nn/official.py), on CPU.

The state dicts are made here from the authors' names and shapes (their LMTransformer with the MTA
options of projects/mta), and the expected logits come from a forward written below from those names
alone: materialized scores, F.conv2d on the (H, 1, cq, ck) kernels, nn.Linear head mixing, head_kernel
indexed [group, in, out], lingua's RMSNorm and SwiGLU. The fused backend runs under the Triton
interpreter (tests/conftest.py).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mta_kernels.nn import (MTATransformer, OfficialTransformerConfig, load_official_checkpoint,
                            load_official_state_dict, official_state_dict, official_transformer_config)

F64 = torch.float64

# Three tiny models whose layers differ. A: the released configs' options (convs in mta_layers only,
# pre mix, head_kernel in groups of 2, group norm with depth rescale, 1-d gate), tied output.
# B: convs only, pad 'right', GQA, head_dim given, no mixing (so the other layers are plain
# attention), D-wide gate, separate output. C: wposm and wpsm in every layer, convs in layer 0.
ARGS = {
    "A": dict(dim=32, n_layers=4, n_heads=4, vocab_size=48, rope_theta=100_000, multiple_of=16,
              ffn_dim_multiplier=1.0, weight_tying=True,
              mta=dict(use_mta=True, query_kernel_size=3, key_kernel_size=5, after_sm_query_kernel_size=2,
                       after_sm_key_kernel_size=3, pre_sm_linear_head=True, head_kernel_size=2, pad_key="both",
                       mta_layers="1,2", group_norm=True, layer_norm_rescale=True, add_gating=True, gate_1d=True,
                       init_method="identity")),
    "B": dict(dim=32, n_layers=3, head_dim=8, n_kv_heads=2, vocab_size=40, multiple_of=32, norm_eps=1e-6,
              weight_tying=False, seed=3, max_seqlen=64, dropout=0.0,
              mta=dict(use_mta=True, query_kernel_size=2, key_kernel_size=4, after_sm_query_kernel_size=3,
                       after_sm_key_kernel_size=2, pad_key="right", mta_layers="0", add_gating=True, gate_1d=False)),
    "C": dict(dim=24, n_layers=2, n_heads=3, vocab_size=30, rope_theta=500.0, multiple_of=8, weight_tying=True,
              use_mta=True, query_kernel_size=2, key_kernel_size=3, pre_sm_linear_head=True,
              post_sm_linear_head=True, mta_layers="0", group_norm=True),
}


# ----------------------------------------------------------------------------- the authors' side

def mta_options(args):
    """Their MTATransformerArgs: the ``mta`` dict, or the MTA names given at the top level."""
    mta = dict(args.get("mta", {}))
    for k in ("use_mta", "query_kernel_size", "key_kernel_size", "pre_sm_linear_head", "post_sm_linear_head",
              "head_kernel_size", "after_sm_query_kernel_size", "after_sm_key_kernel_size", "mta_layers",
              "group_norm", "layer_norm_rescale", "add_gating", "gate_1d", "pad_key"):
        if k in args:
            mta[k] = args[k]
    return mta


def layer_parts(args, i):
    """Which MTA options their BaseTransformer gives layer i (their mta_layers rule)."""
    mta = mta_options(args)
    parts = {k: mta.get(k) for k in ("query_kernel_size", "key_kernel_size", "after_sm_query_kernel_size",
                                     "after_sm_key_kernel_size", "head_kernel_size")}
    parts.update(use_mta=mta.get("use_mta", False), pre_sm=mta.get("pre_sm_linear_head", False),
                 post_sm=mta.get("post_sm_linear_head", False))
    layers = [int(s) for s in mta["mta_layers"].split(",")] if mta.get("mta_layers") else None
    if parts["use_mta"] and layers is not None and i not in layers:
        if parts["head_kernel_size"] is None and not parts["pre_sm"] and not parts["post_sm"]:
            parts["use_mta"] = False
        else:
            parts["query_kernel_size"] = parts["after_sm_query_kernel_size"] = None
    return parts


def sizes(args):
    dim = args["dim"]
    H = args.get("n_heads") or dim // args["head_dim"]
    D = args.get("head_dim") or dim // H
    Hkv = args.get("n_kv_heads") or H
    hidden = int(2 * 4 * dim / 3)
    hidden = int((args.get("ffn_dim_multiplier") or 1.0) * hidden)
    m = args.get("multiple_of", 256)
    return dim, H, D, Hkv, m * ((hidden + m - 1) // m)


def authors_state_dict(args, seed=0, dtype=F64):
    """Random tensors under every name and shape their LMTransformer has for ``args``."""
    g = torch.Generator().manual_seed(seed)
    mta = mta_options(args)
    dim, H, D, Hkv, hidden = sizes(args)
    V = args["vocab_size"]

    def rnd(*shape, scale=0.3, base=None):
        t = scale * torch.randn(*shape, generator=g, dtype=F64)
        return (t if base is None else base + t).to(dtype)

    sd = {"tok_embeddings.weight": rnd(V, dim, scale=1.0), "norm.weight": rnd(dim, scale=0.1, base=1.0)}
    if not args.get("weight_tying", False):
        sd["output.weight"] = rnd(V, dim, scale=0.2)
    for i in range(args["n_layers"]):
        p, a = f"layers.{i}.", f"layers.{i}.attention."
        parts = layer_parts(args, i)
        sd[a + "wq.weight"] = rnd(H * D, dim, scale=dim ** -0.5)
        sd[a + "wk.weight"] = rnd(Hkv * D, dim, scale=dim ** -0.5)
        sd[a + "wv.weight"] = rnd(Hkv * D, dim, scale=dim ** -0.5)
        sd[a + "wo.weight"] = rnd(dim, H * D, scale=(H * D) ** -0.5)
        if parts["use_mta"]:
            if parts["query_kernel_size"] and parts["key_kernel_size"]:
                sd[a + "mta_kernel"] = rnd(H, 1, parts["query_kernel_size"], parts["key_kernel_size"])
            if parts["pre_sm"]:
                sd[a + "wpsm.weight"] = rnd(H, H, base=torch.eye(H, dtype=F64))
            if parts["after_sm_query_kernel_size"] and parts["after_sm_key_kernel_size"]:
                sd[a + "mta_kernel_after_sm"] = rnd(H, 1, parts["after_sm_query_kernel_size"],
                                                    parts["after_sm_key_kernel_size"])
            if parts["head_kernel_size"]:
                ch = parts["head_kernel_size"]
                sd[a + "head_kernel"] = rnd(H // ch, ch, ch, base=torch.eye(ch, dtype=F64))
            elif parts["post_sm"]:
                sd[a + "wposm.weight"] = rnd(H, H, base=torch.eye(H, dtype=F64))
        if mta.get("group_norm"):
            sd[a + "subln.weight"] = rnd(D, scale=0.2, base=1.0)
        if mta.get("add_gating"):
            out = 1 if mta.get("gate_1d", True) else D
            sd[a + "gate.weight"] = rnd(out, D, scale=1.0)
            sd[a + "gate.bias"] = rnd(out, scale=1.0)
        sd[p + "attention_norm.weight"] = rnd(dim, scale=0.1, base=1.0)
        sd[p + "ffn_norm.weight"] = rnd(dim, scale=0.1, base=1.0)
        sd[p + "feed_forward.w1.weight"] = rnd(hidden, dim, scale=dim ** -0.5)
        sd[p + "feed_forward.w3.weight"] = rnd(hidden, dim, scale=dim ** -0.5)
        sd[p + "feed_forward.w2.weight"] = rnd(dim, hidden, scale=hidden ** -0.5)
    return sd


def up(x):
    """Their fp32 upcast (x.float()); fp64 stays fp64 so the comparison can be exact."""
    return x if x.dtype == F64 else x.float()


def rms_norm(x, weight, eps):
    return (up(x) * torch.rsqrt(up(x).pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope(x, theta):
    """Consecutive pairs as complex numbers, positions 0..S-1. x (B, S, H, D)."""
    B, S, H, D = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=F64) / D))
    cis = torch.polar(torch.ones(S, D // 2, dtype=F64), torch.outer(torch.arange(S, dtype=F64), freqs))
    xc = torch.view_as_complex(x.to(F64).reshape(B, S, H, D // 2, 2))
    return torch.view_as_real(xc * cis[None, :, None]).flatten(3).type_as(x)


def authors_attention(sd, a, x, args, layer_id):
    """Their Attention.forward (sdpa-free MTA branch, or plain softmax attention), from the names."""
    mta = mta_options(args)
    _, H, D, Hkv, _ = sizes(args)
    B, S, _ = x.shape
    q = rope(F.linear(x, sd[a + "wq.weight"]).view(B, S, H, D), args.get("rope_theta", 10000.0))
    k = rope(F.linear(x, sd[a + "wk.weight"]).view(B, S, Hkv, D), args.get("rope_theta", 10000.0))
    v = F.linear(x, sd[a + "wv.weight"]).view(B, S, Hkv, D)
    k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = torch.triu(torch.full((S, S), float("-inf"), dtype=x.dtype), diagonal=1).repeat(B, H, 1, 1)
    pad_key = mta.get("pad_key", "both")

    def conv(scores, kernel):
        scores = scores.masked_fill(mask == float("-inf"), 0.0)
        qd, kd = kernel.shape[-2:]
        pads = {"left": (kd - 1, 0), "right": (0, kd - 1), "both": ((kd - 1) // 2, (kd - 1) // 2)}[pad_key]
        return F.conv2d(F.pad(scores, (*pads, qd - 1, 0)), kernel, groups=H)

    scores = q @ k.transpose(2, 3) / math.sqrt(D)
    if a + "mta_kernel" in sd:
        scores = conv(scores, sd[a + "mta_kernel"])
    if a + "wpsm.weight" in sd:
        scores = F.linear(scores.transpose(1, -1), sd[a + "wpsm.weight"]).transpose(1, -1)
    probs = F.softmax(up(scores + mask), dim=-1).type_as(q)
    if a + "mta_kernel_after_sm" in sd:
        probs = torch.where(mask == float("-inf"), 0.0, conv(probs, sd[a + "mta_kernel_after_sm"]))
    if a + "head_kernel" in sd:
        hk = sd[a + "head_kernel"]
        G, ch, _ = hk.shape
        grouped = probs.reshape(B, G, ch, S, S)
        probs = torch.stack([(grouped[:, g].transpose(1, -1) @ hk[g]).transpose(1, -1) for g in range(G)],
                            dim=1).reshape(B, H, S, S)
    elif a + "wposm.weight" in sd:
        probs = F.linear(probs.transpose(1, -1), sd[a + "wposm.weight"]).transpose(1, -1)
    out = (probs @ v).transpose(1, 2)                                            # B S H D
    if a + "subln.weight" in sd:
        out = rms_norm(out, sd[a + "subln.weight"], 1e-5)
        if mta.get("layer_norm_rescale"):
            out = out * (1 - (0.8 - 0.6 * math.exp(-0.3 * layer_id)))
    if a + "gate.weight" in sd:
        out = out * torch.sigmoid(F.linear(out, sd[a + "gate.weight"], sd[a + "gate.bias"]))
    return F.linear(out.reshape(B, S, H * D), sd[a + "wo.weight"])


def authors_forward(sd, tokens, args):
    """Their LMTransformer.forward: tokens (B, S) -> logits (B, S, vocab)."""
    eps = args.get("norm_eps", 1e-5)
    h = F.embedding(tokens, sd["tok_embeddings.weight"])
    for i in range(args["n_layers"]):
        p = f"layers.{i}."
        h = h + authors_attention(sd, p + "attention.", rms_norm(h, sd[p + "attention_norm.weight"], eps), args, i)
        x = rms_norm(h, sd[p + "ffn_norm.weight"], eps)
        w1, w2, w3 = (sd[p + f"feed_forward.{w}.weight"] for w in ("w1", "w2", "w3"))
        h = h + F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    out = sd["tok_embeddings.weight"] if args.get("weight_tying", False) else sd["output.weight"]
    return F.linear(rms_norm(h, sd["norm.weight"], eps), out)


def tokens_for(args, B=2, S=11, seed=5):
    return torch.randint(0, args["vocab_size"], (B, S), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", sorted(ARGS))
def test_loader_reproduces_the_authors_forward(name):
    args = ARGS[name]
    sd = authors_state_dict(args)
    model = load_official_checkpoint(args, sd, backend="reference")
    assert model.tok_embeddings.weight.dtype == F64
    tokens = tokens_for(args)
    with torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, authors_forward(sd, tokens, args), rtol=1e-9, atol=1e-9)


def test_loader_on_the_fused_op():
    args = ARGS["A"]
    sd = authors_state_dict(args, dtype=torch.float32)
    model = load_official_checkpoint(args, sd, backend="fused")
    tokens = tokens_for(args, B=2, S=9)
    with torch.no_grad():
        got = model(tokens)
    want = authors_forward({k: v.double() for k, v in sd.items()}, tokens, args)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_layers_follow_mta_layers():
    a = official_transformer_config(**ARGS["A"])
    assert isinstance(a, OfficialTransformerConfig)
    assert [l.pre_conv for l in a.layers] == [None, (3, 5), (3, 5), None]
    assert [l.post_conv for l in a.layers] == [None, (2, 3), (2, 3), None]
    assert all(l.pre_mix == 4 and l.post_mix == 2 and l.head_norm and l.depth_scaling and l.gate for l in a.layers)
    assert a.hidden_dim == 96 and a.weight_tying
    b = official_transformer_config(**ARGS["B"])
    assert (b.n_heads, b.n_kv_heads, b.head_dim, b.norm_eps, b.rope_theta) == (4, 2, 8, 1e-6, 1e4)
    assert b.layers[0].pre_conv == (2, 4) and b.layers[0].post_conv == (3, 2) and b.layers[0].pad_key == "right"
    for layer in b.layers[1:]:          # no mixing: outside mta_layers the layer is plain attention
        assert (layer.pre_conv, layer.pre_mix, layer.post_conv, layer.post_mix) == (None,) * 4
        assert layer.gate and not layer.gate_1d
    c = official_transformer_config(**ARGS["C"])
    assert c.post_mix_names == ("wposm", "wposm")
    model = MTATransformer(b, backend="reference")
    assert model.layers[1].attention.pre_conv is None and model.layers[0].attention.pre_conv.shape == (4, 2, 4)
    cache = model.new_cache(1, 8)
    assert [l.halo for l in cache.layers] == [3, 0, 0]


@pytest.mark.parametrize("name", sorted(ARGS))
def test_official_names_round_trip(name):
    args = ARGS[name]
    sd = authors_state_dict(args)
    model = load_official_checkpoint(args, sd, backend="reference")
    back = official_state_dict(model)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_generate_uses_each_layers_own_cache():
    args = ARGS["A"]
    model = load_official_checkpoint(args, authors_state_dict(args), backend="reference")
    prompt = tokens_for(args, B=1, S=5)
    out = model.generate(prompt, 6).tokens
    seq = prompt
    for _ in range(6):                   # greedy by full recomputation
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_checkpoint_forms_and_errors():
    args = ARGS["A"]
    sd = authors_state_dict(args, dtype=torch.float32)
    tied = {**sd, "output.tied_module.weight": sd["tok_embeddings.weight"].clone(),
            "rope_embeddings.freqs_cis": torch.zeros(3)}
    model = load_official_checkpoint(args, {"model": {f"m.{k}": v for k, v in tied.items()}}, prefix="m.",
                                     backend="reference", dtype=F64)
    assert model.tok_embeddings.weight.dtype == F64
    assert torch.equal(model.output.weight, sd["tok_embeddings.weight"].double())

    fresh = MTATransformer.from_official_args(backend="reference", **args)
    with pytest.raises(KeyError, match="layers.1.attention.*mta_kernel"):
        load_official_state_dict(fresh, {k: v for k, v in sd.items() if k != "layers.1.attention.mta_kernel"})
    with pytest.raises(KeyError, match="norm.weight"):
        load_official_state_dict(fresh, {k: v for k, v in sd.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match="layers.0.attention.*mta_kernel"):     # a conv outside mta_layers
        load_official_state_dict(fresh, {**sd, "layers.0.attention.mta_kernel": sd["layers.1.attention.mta_kernel"]})
    with pytest.raises(ValueError, match="does not use.*extra"):
        load_official_state_dict(fresh, {**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="feed_forward.w1.weight has shape"):
        load_official_state_dict(fresh, {**sd, "layers.0.feed_forward.w1.weight": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="differs from tok_embeddings"):
        load_official_state_dict(fresh, {**sd, "output.weight": torch.zeros_like(sd["tok_embeddings.weight"])})

    with pytest.raises(NotImplementedError, match="curse_norm"):
        official_transformer_config(**{**args, "mta": {**args["mta"], "curse_norm": True}})
    with pytest.raises(NotImplementedError, match="triton"):
        official_transformer_config(**args, triton=True)
    with pytest.raises(ValueError, match="vocab_size"):
        official_transformer_config(**{k: v for k, v in args.items() if k != "vocab_size"})
    with pytest.raises(TypeError, match="unknown model argument"):
        official_transformer_config(**args, n_layer=3)
    with pytest.raises(ValueError, match="both inside mta and at the top level"):
        official_transformer_config(**args, use_mta=True)
    with pytest.warns(UserWarning, match="softmax"):
        official_transformer_config(dim=16, n_layers=1, n_heads=2, vocab_size=8, use_mta=True, pre_sm_linear_head=True)


def test_hf_model_from_the_authors_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from mta_kernels.hf import MTAForCausalLM

    args = ARGS["C"]
    sd = authors_state_dict(args)
    model = MTAForCausalLM.from_official(args, sd, backend="reference")
    tokens = tokens_for(args)
    want = authors_forward(sd, tokens, args)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, want, rtol=1e-9, atol=1e-9)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=F64)
    assert isinstance(loaded, MTAForCausalLM) and loaded.config.backend == "reference"
    assert isinstance(loaded.model.config, OfficialTransformerConfig)
    assert loaded.model.config == model.model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, want, rtol=1e-9, atol=1e-9)
    back = official_state_dict(loaded.model)       # wposm stays wposm
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
