"""transformers support (mta_kernels.hf), on CPU with a tiny model.

Expected values come from the package's own MTATransformer (forward without a cache, generate) and
from greedy decoding by full recomputation. The fused backend runs under the Triton interpreter
(tests/conftest.py), the rest on the reference backend. Skipped without transformers.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from mta_kernels.hf import (MTAForCausalLM, MTAHFCache, MTAHFConfig, hf_to_mta_state_dict,  # noqa: E402
                            mta_to_hf_state_dict)
from mta_kernels.nn import MTATransformer, MTATransformerConfig  # noqa: E402

V = 64
PAD = 0


def tiny(backend="reference", seed=0, **overrides) -> MTATransformer:
    """3 layers (layer 2 has 3x5 convs, a 4-row query window), weights moved off identity."""
    cfg = MTATransformerConfig(vocab_size=V, dim=32, n_layers=3, n_heads=4, conv=(3, 5), multiple_of=16,
                               **overrides)
    g = torch.Generator().manual_seed(seed)
    model = MTATransformer(cfg, backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


def pad(rows, side):
    """rows of different lengths -> input_ids (B, S) padded with PAD on ``side``, attention_mask."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), PAD, dtype=torch.int64)
    mask = torch.zeros(len(rows), S, dtype=torch.int64)
    for b, r in enumerate(rows):
        sl = slice(S - len(r), S) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


@torch.no_grad()
def greedy_by_recomputation(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_auto_classes_load_a_saved_model(tmp_path):
    model = tiny()
    hf = MTAForCausalLM.from_mta(model, pad_token_id=PAD)
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.tok_embeddings.weight" in saved and "model.output.weight" not in saved      # tied
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MTAHFConfig) and config.model_type == "mta"
    assert config.to_mta_config() == model.config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MTAForCausalLM)
    assert loaded.model.output.weight is loaded.model.tok_embeddings.weight
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    x = prompts([9])[0][None]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x))
    fused = AutoModelForCausalLM.from_pretrained(tmp_path, backend="fused")
    assert {l.attention.backend for l in fused.model.layers} == {"fused"}


def test_state_dict_conversion_both_ways(tmp_path):
    model = tiny(weight_tying=False, seed=2)
    hf = MTAForCausalLM(MTAHFConfig.from_mta_config(model.config, backend="reference"))
    hf.load_state_dict(mta_to_hf_state_dict(model.state_dict()))
    assert hf.model.output.weight is not hf.model.tok_embeddings.weight
    back = MTATransformer(model.config, backend="reference").eval()
    back.load_state_dict(hf_to_mta_state_dict(hf.state_dict(), weight_tying=False))
    x = torch.stack(prompts([7, 7]))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        assert torch.equal(hf.eval()(x).logits, model(x))
    hf.save_pretrained(tmp_path)
    assert "model.output.weight" in load_file(tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x))
    tied = tiny(seed=3)      # a saved tied model has no output weight; the conversion restores it
    tied_hf = MTAForCausalLM.from_mta(tied)
    tied_hf.save_pretrained(tmp_path / "tied")
    restored = MTATransformer(tied.config, backend="reference").eval()
    restored.load_state_dict(hf_to_mta_state_dict(load_file(tmp_path / "tied" / "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(restored(x), tied(x))


def close(a, b):
    """Equal up to rounding: the same values computed in batches or slices of another shape."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def returned_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_logits_equal_mta_transformer(backend):
    model = tiny(backend)
    hf = MTAForCausalLM.from_mta(model)
    x = torch.stack(prompts([8, 8]))
    with torch.no_grad():
        want = model(x)
        out = hf(x)
        assert torch.equal(out.logits, want)
        assert isinstance(returned_cache(out), MTAHFCache)
        if backend == "fused":
            return
        assert torch.equal(hf(x, use_cache=False).logits, want)
        close(hf(x, logits_to_keep=1).logits, want[:, -1:])
    labels = x.clone()
    labels[:, :2] = -100
    loss = torch.nn.functional.cross_entropy(want[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    close(hf(x, labels=labels).loss, loss)


def test_greedy_generate_matches_recomputation_and_mta_generate():
    model = tiny()
    hf = MTAForCausalLM.from_mta(model, pad_token_id=PAD)
    prompt = prompts([6])[0][None]
    n = 6
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy_by_recomputation(model, prompt, n))
    assert torch.equal(out.sequences, model.generate(prompt, n).tokens)
    cache = returned_cache(out)
    assert isinstance(cache, MTAHFCache) and len(cache) == 3
    assert cache.get_seq_length() == 6 + n - 1 and cache.mta.lengths.tolist() == [6 + n - 1]
    assert [l.q_window.shape[2] for l in cache.mta.layers] == [0, 0, 4]        # the conv layer keeps queries


def test_greedy_generate_on_the_fused_op():
    model = tiny("fused")
    hf = MTAForCausalLM.from_mta(model, pad_token_id=PAD)
    ids, mask = pad(prompts([5, 3]), "left")
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    right, _ = pad(prompts([5, 3]), "right")
    want = model.generate(right, 2, prompt_lengths=[5, 3]).tokens
    assert torch.equal(out[0, 5:], want[0, 5:7]) and torch.equal(out[1, 5:], want[1, 3:5])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_prompts_of_different_lengths(side):
    model = tiny()
    hf = MTAForCausalLM.from_mta(model, pad_token_id=PAD)
    rows = prompts([7, 3, 5])
    n = 5
    alone = [model.generate(r[None], n).tokens[0, len(r):] for r in rows]
    ids, mask = pad(rows, side)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    for b in range(len(rows)):
        assert torch.equal(out[b, ids.shape[1]:], alone[b]), b
    right, _ = pad(rows, "right")
    batched = model.generate(right, n, prompt_lengths=[len(r) for r in rows])
    for b, r in enumerate(rows):
        assert torch.equal(batched.tokens[b, len(r):len(r) + n], alone[b])
    with torch.no_grad():                # the forward: real positions as each row alone, padding
        for use_cache in (False, True):  # positions the last real token's logits (0 before any)
            logits = hf(ids, attention_mask=mask, use_cache=use_cache).logits
            for b, r in enumerate(rows):
                real = mask[b].bool()
                close(logits[b, real], model(r[None])[0])
                last = real.cumsum(0) - 1
                for p in torch.nonzero(~real).flatten().tolist():
                    want = logits[b, real][last[p]] if last[p] >= 0 else torch.zeros(V)
                    assert torch.equal(logits[b, p], want)


def test_sampling_is_reproducible_and_follows_mta_sampling():
    model = tiny(seed=4)
    hf = MTAForCausalLM.from_mta(model, pad_token_id=PAD)
    prompt = torch.stack(prompts([5, 5], seed=2))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=1.0)
    torch.manual_seed(11)
    a = hf.generate(prompt, **kw)
    torch.manual_seed(11)
    b = hf.generate(prompt, **kw)
    assert torch.equal(a, b)
    torch.manual_seed(12)
    assert not torch.equal(hf.generate(prompt, **kw), a)
    torch.manual_seed(11)
    assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_k=20).tokens, a)


def test_beam_search_reorders_the_cache():
    model = tiny(seed=5)
    hf = MTAForCausalLM.from_mta(model, pad_token_id=PAD)
    ids, mask = pad(prompts([6, 4], seed=3), "left")
    kw = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw))


def test_config_checks_and_import_isolation():
    with pytest.raises(ValueError, match="n_heads=5 must divide dim=32"):
        MTAHFConfig(vocab_size=V, dim=32, n_layers=2, n_heads=5)
    with pytest.raises(ValueError, match="backend"):
        MTAHFConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, backend="cuda")
    code = "import sys, mta_kernels; assert 'transformers' not in sys.modules, 'transformers imported'"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
