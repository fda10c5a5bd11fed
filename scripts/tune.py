"""Time block-size choices of the flash, mixing and general kernels on one shape (GPU only).
Each config is checked against SDPA / the reference before it is timed.
Usage: python scripts/tune.py [flash] [flashbwd] [mixbwd] [mix] [mixsplits] [full] [slabconv] [slabconv16] [slabconvtiles] [mix16] [mixbwdsplits] [mixsoftmax] [mixbackward] [mixrows] [preconvmatmul] [thbackward] [rows16]   (all without arguments)"""
import sys

import torch
import torch.nn.functional as F
import triton

import mta_reference as R
from mta_kernels.forward import flash_forward, mix_forward

torch.manual_seed(0)
B, H, L, D = 1, 16, 4096, 128
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
scale = D ** -0.5
t_sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
print(f"sdpa {t_sdpa:.3f} ms", flush=True)
expect = F.scaled_dot_product_attention(q, k, v, is_causal=True)
which = set(sys.argv[1:]) or {"flash", "flashbwd", "mixbwd", "mix", "mixsplits", "full", "slabconv", "mixbwdsplits",
                              "mixsoftmax", "mixbackward", "mixrows", "preconvmatmul", "thbackward", "rows16"}


def mix_slab(x, w):
    """The head mix of slabs x (B, H, R, K) by w (G, ch, ch) as one batched matmul (what the
    chunked paths did before their mix kernels)."""
    B, H, R, K = x.shape
    G, ch, _ = w.shape
    return torch.matmul(w.to(x.dtype), x.reshape(B, G, ch, R * K)).view(B, H, R, K)


def slab_conv_calls(rows, lo, keys, dtype):
    """The three slab conv kernels on one causal slab of rows lo..lo+rows and ``keys`` keys in
    ``dtype``, each as (call, the reference's result from the same rounded operands)."""
    from mta_kernels import slab_conv
    from mta_reference import backward as ref_bwd
    future = torch.arange(keys, device="cuda")[None, :] - torch.arange(rows, device="cuda")[:, None] > lo
    x, g = (torch.randn(B, H, rows, keys, device="cuda").masked_fill(future, 0.0).to(dtype) for _ in range(2))
    w = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
    x32, g32, w_rounded = x.float(), g.float(), w.to(dtype).float()
    return {"conv": (lambda: slab_conv.key_query_conv(x, w, "both", zero_above=lo, precision="tf32"),
                     R.key_query_conv(x32, w_rounded, "both")),
            "input_grad": (lambda: slab_conv.key_query_conv_input_grad(g, w, "both", zero_above=lo,
                                                                       mask_output=True, precision="tf32"),
                           ref_bwd.key_query_conv_input_grad(g32, w_rounded, "both").masked_fill(future, 0)),
            "weight_grad": (lambda: slab_conv.key_query_conv_weight_grad(g, x, w, "both", zero_above=lo,
                                                                         precision="tf32"),
                            ref_bwd.key_query_conv_weight_grad(g32, x32, w, "both"))}


def time_conv_calls(calls):
    """The conv's and its input gradient's median times and relative errors (slab_conv_calls'
    calls), as one line; a launch that fails (a configuration that does not fit) says so."""
    line = []
    for name in ("conv", "input_grad"):
        fn, ref = calls[name]
        try:
            err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
            line.append(f"{name} {triton.testing.do_bench(fn, return_mode='median'):.3f} ms (rel err {err:.1e})")
        except Exception as e:  # a config may not fit
            line.append(f"{name} failed {type(e).__name__}: {str(e)[:80]}")
    return "; ".join(line)


if "slabconv" in which:
    # one middle slab of the chunked backward at this shape: rows lo..lo+R of (B, H, R, L) fp32
    from mta_kernels import slab_conv
    from sm90_compile import SLAB_CONV_CONFIGS, SLAB_WEIGHT_GRAD_CONFIGS
    calls = slab_conv_calls(302, 2000, L, torch.float32)

    def time_calls(cfg, names):
        line = []
        for name in names:
            fn, ref = calls[name]
            try:
                err = ((fn() - ref).abs().max() / ref.abs().max()).item()
                t = triton.testing.do_bench(fn, return_mode="median")
                line.append(f"{name} {t:.3f} ms (rel err {err:.1e})")
            except Exception as e:  # a config may not fit
                line.append(f"{name} failed {type(e).__name__}: {str(e)[:80]}")
        print(f"slab conv {cfg}: " + "; ".join(line), flush=True)

    for cfg in SLAB_CONV_CONFIGS:
        slab_conv.CONV_CONFIG = cfg
        time_calls(cfg, ["conv", "input_grad"])
    for cfg in SLAB_WEIGHT_GRAD_CONFIGS:
        slab_conv.WEIGHT_GRAD_CONFIG = cfg
        time_calls(cfg, ["weight_grad"])
if "slabconv16" in which:
    # the slab conv kernels on bf16 slabs (chunked_forward.BF16_SLABS): one middle slab of the chunked
    # backward at L=4096 with bf16-counted chunks (rows 1000..2044), tiles larger than fp32's fit
    from mta_kernels import slab_conv
    calls = slab_conv_calls(1044, 1000, 2048, torch.bfloat16)
    for BR, BC, warps, stages in [(64, 32, 4, 1), (128, 32, 4, 1), (128, 32, 8, 1), (64, 64, 4, 1), (64, 32, 4, 2),
                                  (128, 32, 4, 2), (64, 32, 2, 1), (32, 32, 4, 1)]:
        cfg = dict(BR=BR, BC=BC, num_warps=warps, num_stages=stages, unroll="full")
        slab_conv.CONV_CONFIG = cfg
        print(f"slab conv bf16 {cfg}: " + time_conv_calls(calls), flush=True)
    for BR, warps, reg, stages, tiles in [(64, 4, 96, 1, 16), (64, 4, None, 1, 16), (64, 4, None, 2, 16),
                                          (64, 4, None, 1, 32), (64, 4, None, 1, 8), (128, 4, None, 2, 16)]:
        cfg = dict(BR=BR, num_warps=warps, num_stages=stages, TILES=tiles, maxnreg=reg)
        slab_conv.WEIGHT_GRAD_CONFIG = cfg
        fn, ref = calls["weight_grad"]
        try:
            err = ((fn() - ref).abs().max() / ref.abs().max()).item()
            print(f"slab conv bf16 weight grad {cfg}: {triton.testing.do_bench(fn, return_mode='median'):.3f} ms "
                  f"(rel err {err:.1e})", flush=True)
        except Exception as e:
            print(f"slab conv bf16 weight grad {cfg}: failed {type(e).__name__}: {str(e)[:80]}", flush=True)
if "slabconvtiles" in which:
    # the strip conv kernel of 16-bit slabs (slab_conv.STRIP_CONV_CONFIG: TILES column tiles a program,
    # Toeplitz matrices built once per program, tiles clear of the causal diagonal loaded by TMA or
    # pointers under a register cap) against a program per tile (TILES=0), on the bf16 slab of
    # slabconv16
    from mta_kernels import slab_conv
    calls = slab_conv_calls(1044, 1000, 2048, torch.bfloat16)
    committed = dict(slab_conv.STRIP_CONV_CONFIG)
    for change in [dict(TILES=0), dict(), dict(tma=False), dict(maxnreg=80), dict(maxnreg=112), dict(TILES=4),
                   dict(TILES=16), dict(tma=False, maxnreg_without_tma=112)]:
        slab_conv.STRIP_CONV_CONFIG = dict(committed, **change)
        print(f"slab conv strip {slab_conv.STRIP_CONV_CONFIG}: " + time_conv_calls(calls), flush=True)
    slab_conv.STRIP_CONV_CONFIG = committed
    # the weight gradient: the committed kernel against the transposed-product one (WEIGHT_GRAD_STRIP_CONFIG)
    committed = dict(slab_conv.WEIGHT_GRAD_STRIP_CONFIG)
    for change in [dict(on=False), dict(), dict(maxnreg=0), dict(maxnreg=112), dict(tma=False),
                   dict(tma=False, maxnreg_without_tma=0)]:
        slab_conv.WEIGHT_GRAD_STRIP_CONFIG = dict(committed, **change)
        fn, ref = calls["weight_grad"]
        try:
            err = ((fn() - ref).abs().max() / ref.abs().max()).item()
            print(f"slab conv weight grad strip {slab_conv.WEIGHT_GRAD_STRIP_CONFIG}: "
                  f"{triton.testing.do_bench(fn, return_mode='median'):.3f} ms (rel err {err:.1e})", flush=True)
        except Exception as e:  # a config may not fit
            print(f"slab conv weight grad strip {slab_conv.WEIGHT_GRAD_STRIP_CONFIG}: failed {type(e).__name__}: "
                  f"{str(e)[:80]}", flush=True)
    slab_conv.WEIGHT_GRAD_STRIP_CONFIG = committed
if "mix16" in which:
    # the row kernels of the mixes on bf16 slabs (chunked_forward.BF16_SLABS): the pre mix with the
    # softmax (in place, lse out), the post mix, and the pre mix's backward through the softmax with
    # its weight gradient, on one middle chunk (rows 1365..2730 of L=4096, keys up to 2736)
    from mta_kernels import slab_mix, slab_mix_backward, slab_softmax
    rows, lo, keys = 1365, 1365, 2736
    future = torch.arange(keys, device="cuda")[None, :] - torch.arange(rows, device="cuda")[:, None] > lo
    x, g, p = (torch.randn(B, H, rows, keys, device="cuda").masked_fill(future, 0.0).to(torch.bfloat16)
               for _ in range(3))
    w = (R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")).contiguous()
    dw_rows = torch.empty(B, 1, L, H, H, device="cuda")
    for elements, warps in [(2048, 4), (1024, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 4), (16384, 8)]:
        cfg = dict(elements=elements, elements_16bit=elements, num_warps=warps, num_stages=3)
        slab_softmax.MIX_SOFTMAX_CONFIG = slab_mix.MIX_CONFIG = slab_mix_backward.MIX_BACKWARD_CONFIG = cfg
        y, gy = x.clone(), g.clone()
        t1 = triton.testing.do_bench(lambda: slab_softmax.mix_softmax_rows(y, w, lo, want_lse=True, precision="tf32",
                                                                           out=y), return_mode="median")
        t2 = triton.testing.do_bench(lambda: slab_mix.mix_rows(x, w, lo, precision="tf32", out_dtype=torch.bfloat16),
                                     return_mode="median")
        t3 = triton.testing.do_bench(lambda: slab_mix_backward.mix_backward_rows(
            gy, w, x=x, probs=p, zero_above=lo, rows=(5, rows), precision="tf32", out=gy, dw_rows=(dw_rows, lo)),
            return_mode="median")
        print(f"mix16 {cfg}: mix softmax {t1:.3f} ms, mix rows {t2:.3f} ms, mix backward rows {t3:.3f} ms", flush=True)
if "mixsoftmax" in which:
    # the pre mix and softmax of one middle chunk of the chunked forward (rows 1365..2730 of L=4096,
    # keys up to 2736), fused against the batched-matmul mix then the slab softmax
    from mta_kernels import slab_softmax
    rows, lo = 1365, 1365
    x = torch.randn(B, H, rows, 2736, device="cuda")
    w = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
    t = triton.testing.do_bench(lambda: slab_softmax.softmax_rows_(mix_slab(x, w), lo, want_lse=True), return_mode="median")
    print(f"mix softmax: batched matmul + slab softmax {t:.3f} ms", flush=True)
    for elements, warps in [(8192, 8), (4096, 4), (4096, 8), (16384, 8), (2048, 4)]:
        slab_softmax.MIX_SOFTMAX_CONFIG = dict(elements=elements, elements_16bit=elements, num_warps=warps,
                                               num_stages=3)
        y = x.clone()
        t = triton.testing.do_bench(lambda: slab_softmax.mix_softmax_rows(y, w, lo, want_lse=True, precision="tf32", out=y),
                                    return_mode="median")
        print(f"mix softmax {slab_softmax.MIX_SOFTMAX_CONFIG}: {t:.3f} ms", flush=True)
if "mixbackward" in which:
    # the pre mix's backward through the softmax, with its weight gradient, on one middle chunk of
    # the chunked backward (rows 1365..2730 of L=4096, keys up to 2736): fused against PyTorch
    from mta_kernels import slab_mix_backward
    rows, lo = 1365, 1365
    dp, probs, c = (torch.randn(B, H, rows, 2736, device="cuda") for _ in range(3))
    w = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")

    def torch_path():
        dz = torch._softmax_backward_data(dp, probs, -1, probs.dtype)
        dw = torch.matmul(dz.reshape(B, 1, H, -1), c.reshape(B, 1, H, -1).transpose(-1, -2)).sum(0)
        return mix_slab(dz, w.transpose(-1, -2)), dw
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    t = triton.testing.do_bench(torch_path, return_mode="median")
    print(f"mix backward: softmax backward + batched matmuls {t:.3f} ms", flush=True)
    for elements, warps in [(2048, 4), (1024, 4), (4096, 4), (4096, 8), (8192, 8)]:
        slab_mix_backward.MIX_BACKWARD_CONFIG = dict(elements=elements, elements_16bit=elements, num_warps=warps,
                                                     num_stages=3)
        y = dp.clone()
        t = triton.testing.do_bench(lambda: slab_mix_backward.mix_backward_rows(
            y, w, x=c, probs=probs, zero_above=lo, rows=(20, rows - 20), precision="tf32", out=y), return_mode="median")
        print(f"mix backward {slab_mix_backward.MIX_BACKWARD_CONFIG}: {t:.3f} ms", flush=True)
if "thbackward" in which:
    # talking heads' backward kernel on the third of four chunks of the chunked backward (rows
    # 2048..3072 of L=4096, keys up to 3072): bf16 scores, dA in bf16 and in fp32
    from mta_kernels import slab_mix_backward, slab_softmax
    rows, lo, keys = 1024, 2048, 3072
    s16 = torch.randn(B, H, rows, keys, device="cuda", dtype=torch.bfloat16)
    w_pre, w_post = (R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda") for _ in range(2))
    w_pre = w_pre * scale
    lse = slab_softmax.mix_softmax_rows(s16, w_pre, lo, want_lse=True, precision="tf32")[1]
    buffers = [torch.empty(B, 1, rows, H, H, device="cuda") for _ in range(2)]
    # (4fae9fb: 2048/4, 1024/4, 4096/4, 4096/8, 8192/8 and 512/1 were slower than 1024/2 in both dtypes)
    for elements, warps in [(1024, 2), (1024, 1), (512, 2), (2048, 2), (256, 1)]:
        slab_mix_backward.TALKING_HEADS_BACKWARD_CONFIG = dict(elements=elements, num_warps=warps, num_stages=3)
        for da_dtype in (torch.bfloat16,):
            da = torch.randn(B, H, rows, keys, device="cuda", dtype=da_dtype)
            t = triton.testing.do_bench(lambda: slab_mix_backward.talking_heads_backward_rows(
                da, s16, lse, w_pre, w_post, lo, precision="tf32", out=None if da_dtype != torch.float32 else da,
                dw_pre_rows=buffers[0], dw_post_rows=buffers[1]), return_mode="median")
            print(f"talking heads backward {slab_mix_backward.TALKING_HEADS_BACKWARD_CONFIG} dA {da_dtype}: {t:.3f} ms",
                  flush=True)
if "thbackward" in which:
    # the mix-softmax kernel on bf16 scores: the forward's (lse out, post mix, one chunk of all 4096
    # rows) and the backward's recomputation (lse in, post mix, fp32 out; the chunk above)
    from mta_kernels import slab_softmax
    x_fwd = torch.randn(B, H, L, L, device="cuda", dtype=torch.bfloat16)
    for elements, warps in [(2048, 4), (1024, 2), (1024, 4), (2048, 2), (4096, 4), (512, 1)]:
        slab_softmax.MIX_SOFTMAX_CONFIG = dict(elements=elements, elements_16bit=elements, num_warps=warps,
                                               num_stages=3)
        t_fwd = triton.testing.do_bench(lambda: slab_softmax.mix_softmax_rows(
            x_fwd, w_pre, 0, want_lse=True, precision="tf32", post_mix=w_post, out_dtype=torch.bfloat16),
            return_mode="median")
        t_bwd = triton.testing.do_bench(lambda: slab_softmax.mix_softmax_rows(
            s16, w_pre, lo, precision="tf32", post_mix=w_post, out_dtype=torch.float32, lse_in=lse),
            return_mode="median")
        print(f"talking heads mix softmax {slab_softmax.MIX_SOFTMAX_CONFIG}: forward {t_fwd:.3f} ms, "
              f"backward's recomputation {t_bwd:.3f} ms", flush=True)
    del x_fwd
if "rows16" in which:
    # every row kernel on bf16 slabs, with its committed config (first) and alternatives: talking
    # heads' forward mix-softmax (the second of two chunks of L=4096: rows 2048..4096, all keys;
    # post mix, lse out), its backward's recomputation (lse in) and its backward kernel; full MTA's
    # pre mix with the softmax (in place), post mix and the mix backward through the softmax (a
    # middle chunk, rows 1365..2730, keys up to 2736)
    from mta_kernels import slab_mix, slab_mix_backward, slab_softmax
    w_pre, w_post = ((R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")).contiguous()
                     for _ in range(2))
    w_pre = w_pre * scale

    def causal_slab(rows, lo, keys, n):
        future = torch.arange(keys, device="cuda")[None, :] - torch.arange(rows, device="cuda")[:, None] > lo
        return [torch.randn(B, H, rows, keys, device="cuda").masked_fill(future, 0.0).to(torch.bfloat16)
                for _ in range(n)]

    th_lo, th_rows = 2048, 2048
    s16, da = causal_slab(th_rows, th_lo, L, 2)
    lse = slab_softmax.mix_softmax_rows(s16, w_pre, th_lo, want_lse=True, precision="tf32")[1]
    dw_bufs = [torch.empty(B, 1, L, H, H, device="cuda") for _ in range(2)]
    mx_lo, mx_rows, mx_keys = 1365, 1365, 2736
    x, g, p = causal_slab(mx_rows, mx_lo, mx_keys, 3)
    y, gy = x.clone(), g.clone()
    w = w_post
    calls = {
        "th mix softmax": (slab_softmax, "MIX_SOFTMAX_CONFIG", lambda: slab_softmax.mix_softmax_rows(
            s16, w_pre, th_lo, want_lse=True, precision="tf32", post_mix=w_post, out_dtype=torch.bfloat16)),
        "th recompute": (slab_softmax, "MIX_SOFTMAX_CONFIG", lambda: slab_softmax.mix_softmax_rows(
            s16, w_pre, th_lo, precision="tf32", post_mix=w_post, out_dtype=torch.bfloat16, lse_in=lse)),
        "th backward": (slab_mix_backward, "TALKING_HEADS_BACKWARD_CONFIG", lambda: slab_mix_backward.talking_heads_backward_rows(
            da, s16, lse, w_pre, w_post, th_lo, precision="tf32", out=torch.empty_like(da),
            dw_pre_rows=dw_bufs[0], dw_post_rows=dw_bufs[1], row0=th_lo)),
        "mix softmax": (slab_softmax, "MIX_SOFTMAX_CONFIG", lambda: slab_softmax.mix_softmax_rows(
            y, w, mx_lo, want_lse=True, precision="tf32", out=y)),
        "mix rows": (slab_mix, "MIX_CONFIG", lambda: slab_mix.mix_rows(x, w, mx_lo, precision="tf32",
                                                                      out_dtype=torch.bfloat16)),
        "mix backward": (slab_mix_backward, "MIX_BACKWARD_CONFIG", lambda: slab_mix_backward.mix_backward_rows(
            gy, w, x=x, probs=p, zero_above=mx_lo, rows=(5, mx_rows), precision="tf32", out=gy,
            dw_rows=(dw_bufs[0], mx_lo))),
    }
    for name, (module, attr, fn) in calls.items():
        committed = dict(getattr(module, attr))
        e = committed.get("elements_16bit", committed["elements"])
        for change in [dict(), dict(num_stages=1), dict(num_stages=2), dict(num_stages=4),
                       dict(elements=e // 2, elements_16bit=e // 2), dict(elements=2 * e, elements_16bit=2 * e),
                       dict(num_warps=2 * committed["num_warps"])]:
            setattr(module, attr, dict(committed, **change))
            t = triton.testing.do_bench(fn, return_mode="median")
            print(f"rows16 {name} {getattr(module, attr)}: {t:.3f} ms", flush=True)
        setattr(module, attr, committed)
if "mixrows" in which:
    # the post mix of the last chunk of the chunked forward (rows 2730..4096 of L=4096, all keys),
    # fp32 in, bf16 out, against the batched matmul
    from mta_kernels import slab_mix
    rows, lo = 1366, 2730
    future = torch.arange(L, device="cuda")[None, :] - torch.arange(rows, device="cuda")[:, None] > lo
    x = torch.randn(B, H, rows, L, device="cuda").masked_fill(future, 0.0)
    w = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    t = triton.testing.do_bench(lambda: mix_slab(x, w), return_mode="median")
    print(f"mix rows: batched matmul {t:.3f} ms", flush=True)
    for elements, warps in [(2048, 4), (1024, 4), (4096, 4), (4096, 8), (8192, 8)]:
        slab_mix.MIX_CONFIG = dict(elements=elements, elements_16bit=elements, num_warps=warps, num_stages=3)
        t = triton.testing.do_bench(lambda: slab_mix.mix_rows(x, w, lo, precision="tf32", out_dtype=torch.bfloat16),
                                    return_mode="median")
        print(f"mix rows {slab_mix.MIX_CONFIG}: {t:.3f} ms", flush=True)
if "preconvmatmul" in which:
    # the pre conv of the chunked forward's last chunk (rows 3062..4096 of L=4096, all keys) as one
    # matmul plus the slab conv on the band tiles, against the slab conv alone
    from mta_kernels import pre_conv_matmul as pcm
    from mta_kernels.slab_conv import key_query_conv
    lo, hi = 3062, 4096
    w = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
    # bf16 slabs as the chunked forward makes them for bf16 inputs (chunked_forward.BF16_SLABS)
    s0 = torch.matmul(q[:, :, lo:hi].float() * scale, k.float().transpose(-1, -2)).to(torch.bfloat16)
    expect_c = key_query_conv(s0, w, "both", zero_above=lo, precision="tf32")
    t = triton.testing.do_bench(lambda: key_query_conv(s0, w, "both", zero_above=lo, precision="tf32"), return_mode="median")
    print(f"pre conv matmul: slab conv {t:.3f} ms", flush=True)
    for elements, warps in [(16384, 8), (8192, 8), (8192, 4), (4096, 4), (2048, 4)]:
        pcm.KEYS_CONFIG = dict(elements=elements, num_warps=warps)
        t = triton.testing.do_bench(lambda: pcm.conv_keys(k, w, "both", H, q.dtype), return_mode="median")
        print(f"pre conv matmul: K~ {pcm.KEYS_CONFIG} {t:.3f} ms (once per forward)", flush=True)
    kt = pcm.conv_keys(k, w, "both", H, q.dtype)
    band = lambda c: key_query_conv(s0, w, "both", zero_above=lo, precision="tf32", out=c, band=True)
    c = pcm.pre_conv_matmul(q, kt, lo, hi, L, scale, lo, precision="tf32", dtype=torch.bfloat16)
    t = triton.testing.do_bench(lambda: band(c), return_mode="median")
    print(f"pre conv matmul: band tiles {t:.3f} ms", flush=True)
    # the causal past, from the 6th row on (above it the slab conv reads zeros, the matmul q's rows)
    rows = torch.arange(lo, hi, device="cuda")[:, None]
    valid = (torch.arange(L, device="cuda")[None, :] <= rows) & (rows >= lo + 5)
    for BM, BN, BD, warps, stages in [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3),
                                      (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 2), (256, 64, 64, 8, 3),
                                      (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 2),
                                      (128, 128, 64, 8, 4)]:
        pcm.MATMUL_CONFIG = dict(BM=BM, BN=BN, BD=BD, num_warps=warps, num_stages=stages)
        try:
            c = pcm.pre_conv_matmul(q, kt, lo, hi, L, scale, lo, precision="tf32", dtype=torch.bfloat16)
            band(c)
            err = ((c.float() - expect_c.float()) * valid).abs().max().item()
            t = triton.testing.do_bench(lambda: pcm.pre_conv_matmul(q, kt, lo, hi, L, scale, lo, precision="tf32",
                                                                    dtype=torch.bfloat16),
                                        return_mode="median")
            print(f"pre conv matmul {pcm.MATMUL_CONFIG}: {t:.3f} ms, max err {err:.1e}", flush=True)
        except Exception as e:  # a config may not fit
            print(f"pre conv matmul {pcm.MATMUL_CONFIG}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
    # D=96 (the paper's 830M model): the default's 64-wide blocks leave half of the second empty
    q96, k96 = (torch.randn(B, H, L, 96, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kt96 = pcm.conv_keys(k96, w, "both", H, q.dtype)
    for BD in (64, 32):
        pcm.MATMUL_CONFIG = dict(BM=128, BN=128, BD=BD, num_warps=8, num_stages=3)
        t = triton.testing.do_bench(lambda: pcm.pre_conv_matmul(q96, kt96, lo, hi, L, 96 ** -0.5, lo, precision="tf32"),
                                    return_mode="median")
        print(f"pre conv matmul D=96 {pcm.MATMUL_CONFIG}: {t:.3f} ms", flush=True)
for cfg in [] if "flash" not in which else [dict(BM=128, BN=64, num_warps=8, num_stages=3), dict(BM=128, BN=128, num_warps=8, num_stages=3),
            dict(BM=128, BN=64, num_warps=4, num_stages=3), dict(BM=64, BN=64, num_warps=4, num_stages=3),
            dict(BM=128, BN=64, num_warps=8, num_stages=2), dict(BM=128, BN=32, num_warps=4, num_stages=4)]:
    try:
        out, _ = flash_forward(q, k, v, True, scale, cfg)
        err = (out.float() - expect.float()).abs().max().item()
        t = triton.testing.do_bench(lambda: flash_forward(q, k, v, True, scale, cfg), return_mode="median")
        print(f"flash {cfg}: {t:.3f} ms = {t / t_sdpa:.2f}x sdpa, max err vs sdpa {err:.2e}", flush=True)
    except Exception as e:  # a config may not fit (shared memory, registers)
        print(f"flash {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)

if "flashbwd" in which:
    from mta_kernels import backward
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    o_sdpa = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
    t_sdpa_bwd = triton.testing.do_bench(lambda: torch.autograd.grad(o_sdpa, (qg, kg, vg), do, retain_graph=True),
                                         return_mode="median")
    ref_grads = torch.autograd.grad(o_sdpa, (qg, kg, vg), do)
    out, lse = flash_forward(q, k, v, True, scale)
    print(f"sdpa backward {t_sdpa_bwd:.3f} ms", flush=True)
    # candidates without register spills on sm_90a (scripts/sm90_compile.py flash_bwd_sweep)
    dkdv_cfgs = [dict(BM=32, BN=128, num_warps=8, num_stages=2), dict(BM=64, BN=64, num_warps=8, num_stages=2),
                 dict(BM=32, BN=64, num_warps=4, num_stages=2), dict(BM=64, BN=32, num_warps=4, num_stages=2),
                 dict(BM=128, BN=32, num_warps=8, num_stages=2), dict(BM=64, BN=64, num_warps=4, num_stages=2)]
    dq_cfgs = [dict(BM=64, BN=64, num_warps=8, num_stages=2), dict(BM=128, BN=32, num_warps=8, num_stages=2),
               dict(BM=32, BN=64, num_warps=4, num_stages=2), dict(BM=64, BN=32, num_warps=4, num_stages=2),
               dict(BM=128, BN=64, num_warps=8, num_stages=2), dict(BM=64, BN=64, num_warps=4, num_stages=2)]
    for name, cfgs in (("dkdv", dkdv_cfgs), ("dq", dq_cfgs)):
        best = (float("inf"), None)
        for cfg in cfgs:
            if name == "dkdv":
                backward.FLASH_DKDV_CONFIG = cfg
            else:
                backward.FLASH_DQ_CONFIG = cfg
            try:
                grads = backward.flash_backward(do, q, k, v, out, lse, True, scale)
                err = max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, ref_grads))
                t = triton.testing.do_bench(lambda: backward.flash_backward(do, q, k, v, out, lse, True, scale),
                                            return_mode="median")
                best = min(best, (t, cfg), key=lambda x: x[0])
                print(f"flash bwd {name} {cfg} (dkdv {backward.FLASH_DKDV_CONFIG}, dq {backward.FLASH_DQ_CONFIG}): "
                      f"{t:.3f} ms = {t / t_sdpa_bwd:.2f}x sdpa bwd, max err vs sdpa {err:.2e}", flush=True)
            except Exception as e:
                print(f"flash bwd {name} {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
        if name == "dkdv" and best[1] is not None:
            backward.FLASH_DKDV_CONFIG = best[1]

if "mixbwd" in which:
    # talking heads forward+backward through the op: fused backward vs the row-chunked one
    import mta_kernels
    from mta_kernels import backward
    wm = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
    qg, kg, vg, wg1, wg2 = (x.clone().requires_grad_() for x in (q, k, v, wm, wm))
    do = torch.randn_like(q)

    def step():
        o = mta_kernels.mta_attention(qg, kg, vg, pre_mix=wg1, post_mix=wg2)
        return torch.autograd.grad(o, (qg, kg, vg, wg1, wg2), do)

    def sdpa_step():
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        return torch.autograd.grad(o, (qg, kg, vg), do)

    t_ref = triton.testing.do_bench(sdpa_step, return_mode="median")
    for fused in (True, False):
        backward.FUSED_MIX_BACKWARD = fused
        torch.cuda.reset_peak_memory_stats()
        t = triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median")
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"talking heads fwd+bwd, fused backward={fused}: {t:.3f} ms = {t / t_ref:.1f}x sdpa fwd+bwd "
              f"({t_ref:.3f} ms), peak {peak:.2f} GiB", flush=True)

if "mixbwdsplits" in which:
    # talking-heads backward: key (row) splits of its row (column) launches, at the training
    # shape (L=2048, D=96) and at L=2048/4096 with D=128
    from mta_kernels import backward
    wm = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
    for n, d in ((1024, 128), (2048, 96), (2048, 128), (4096, 128)):
        qn, kn, vn, do = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        lse = mix_forward(qn, kn, vn, wm, wm, True, d ** -0.5)[1]
        for target, cap in [(1 << 30, splits) for splits in range(1, 9)]:   # exactly `splits` splits
            backward.MIX_BWD_TARGET_PROGRAMS, backward.MIX_BWD_MAX_SPLITS = target, cap
            t = triton.testing.do_bench(lambda: backward.mix_backward(do, qn, kn, vn, wm, wm, lse, True, d ** -0.5),
                                        return_mode="median")
            print(f"L={n} D={d} talking-heads backward, target {target} programs, at most {cap} splits: {t:.3f} ms",
                  flush=True)
        backward.MIX_BWD_TARGET_PROGRAMS, backward.MIX_BWD_MAX_SPLITS = 4 * 132, 8

w_pre = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
w_post = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
qs, ks, vs = q[:, :, :1024], k[:, :, :1024], v[:, :, :1024]
ref = R.mta_attention(qs, ks, vs, pre_mix=w_pre, post_mix=w_post).float()
for cfg in [] if "mix" not in which else [dict(BM=16, BN=16, num_warps=8, num_stages=1), dict(BM=16, BN=16, num_warps=4, num_stages=1),
            dict(BM=16, BN=32, num_warps=8, num_stages=1), dict(BM=32, BN=16, num_warps=8, num_stages=1),
            dict(BM=16, BN=16, num_warps=8, num_stages=2), dict(BM=32, BN=32, num_warps=8, num_stages=1),
            dict(BM=16, BN=64, num_warps=8, num_stages=1)]:
    try:
        out, _ = mix_forward(qs, ks, vs, w_pre, w_post, True, scale, cfg)
        err = (out.float() - ref).abs().max().item()
        t = triton.testing.do_bench(lambda: mix_forward(q, k, v, w_pre, w_post, True, scale, cfg), return_mode="median")
        print(f"mix {cfg}: {t:.3f} ms = {t / t_sdpa:.2f}x sdpa, max err vs fp32 reference {err:.2e}", flush=True)
    except Exception as e:
        print(f"mix {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)

# Key splits of the talking-heads forward at B=1 (short grids), both passes and one pass.
for n in [] if "mixsplits" not in which else (2048, 4096):
    qn, kn, vn = q[:, :, :n], k[:, :, :n], v[:, :, :n]
    for name, pre, post in (("talking heads", w_pre, w_post), ("pre_mix", w_pre, None)):
        ref = R.mta_attention(qn[:, :, :1024], kn[:, :, :1024], vn[:, :, :1024], pre_mix=pre, post_mix=post).float()
        for splits in (1, 2, 3, 4, 8):
            out, _ = mix_forward(qn[:, :, :1024], kn[:, :, :1024], vn[:, :, :1024], pre, post, True, scale, dict(splits=splits))
            err = (out.float() - ref).abs().max().item()
            t = triton.testing.do_bench(lambda: mix_forward(qn, kn, vn, pre, post, True, scale, dict(splits=splits)),
                                        return_mode="median")
            print(f"L={n} {name} fwd, {splits} key splits: {t:.3f} ms, max err vs fp32 reference {err:.2e}", flush=True)

# The general kernel (convs present): full MTA with the paper's 6x11 convs.
from mta_kernels.forward import mta_forward  # noqa: E402

c_pre = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
c_post = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
ref = R.mta_attention(qs, ks, vs, c_pre, w_pre, c_post, w_post).float()
for cfg in [] if "full" not in which else [dict(RF=32, W=64, num_warps=4), dict(RF=32, W=64, num_warps=8), dict(RF=64, W=64, num_warps=4),
            dict(RF=64, W=64, num_warps=8), dict(RF=32, W=128, num_warps=4), dict(RF=64, W=128, num_warps=8)]:
    try:
        out, _ = mta_forward(qs, ks, vs, c_pre, w_pre, c_post, w_post, True, "both", scale, cfg)
        err = (out.float() - ref).abs().max().item()
        t = triton.testing.do_bench(lambda: mta_forward(q, k, v, c_pre, w_pre, c_post, w_post, True, "both", scale, cfg),
                                    warmup=50, rep=300, return_mode="median")
        print(f"full {cfg}: {t:.3f} ms = {t / t_sdpa:.1f}x sdpa, max err vs fp32 reference {err:.2e}", flush=True)
    except Exception as e:
        print(f"full {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
