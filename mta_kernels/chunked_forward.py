"""Exact MTA forward in PyTorch and the slab conv kernels, one block of query rows at a time.

An alternative to the general fused kernel (forward_kernels.py) for calls with convolutions,
built from the slab pieces it shares with the chunked backward. For the output rows [r0, r1)
of a chunk it materializes rows [lo, r1) of every (B, H, L, L) intermediate, lo = r0 - HQ -
HP being the rows the convs read above, and keys [0, r1) when causal (later keys are in
every row's future); the convs, the mixes and the softmax are the Triton slab kernels, the
matmuls TF32 for 16-bit inputs, except A V, which the post mix's kernel feeds in q's dtype
(slabs.slab_forward). Memory: O(rows x L)
within the slabs' working-set budget (MTA_KERNELS_CHUNK_BYTES), one batch element at a time.

When it runs (MTA_KERNELS_CHUNKED_FORWARD): 'auto' (the default) takes it for CUDA calls
with convs whose general kernel would have fewer than CHUNKED_BELOW_SMS row-block programs
per SM (prefer_chunked_forward); '1' for every call with convs; '0' never. Why, on the H200
(bf16, causal, D=128 unless noted, paper weights, one run each, general kernel against this
path at 2a182d0, bench/results/2026-11-29_095052 and _095120): full MTA (mixing all heads, few
row blocks) took 45.2 / 159.4 ms against 26.5 / 111.3 here at B=1, H=16, L=8192 / 16384
(152 and 304 row blocks on 132 SMs), and 21.7 / 15.3 / 23.9 / 24.2 against 17.0 / 12.8 /
17.1 / 17.3 for the paper's B=8 layers at L=2048 (D=64, H=10, D=96, D=128; 304 row blocks).
A conv without mixing has a program per head (_095656 and _095722): at B=8, L=2048 (4480
row blocks) 4.0-7.1 ms against 5.4-8.2 here; at B=1, H=16, L=4096 (1120) the pre conv 3.77
against 3.58 here and the post conv 2.25 against 3.64. So the threshold sits between 607
row blocks (full MTA at L=32768) and 1120: 8 per SM.
"""
import os

import torch

from .causal_matmul import causal_pv, tma_ok
from .forward import _precision, general_row_programs, uses_register_mixing
from .slabs import (_matmul_precision, auto_switch_from_env, chunk_starts, conv_halos, is_talking_heads,
                    live_slabs, pre_conv_operands, repeat_kv_heads, rows_per_chunk, slab_forward, slab_inputs,
                    slab_weights)


def _mode_from_env() -> str:
    """MTA_KERNELS_CHUNKED_FORWARD as 'auto' (unset), '1' or '0'."""
    return auto_switch_from_env("MTA_KERNELS_CHUNKED_FORWARD")


CHUNKED_FORWARD = _mode_from_env()
CHUNKED_BELOW_SMS = 8

# Talking heads (head mixing without convs over groups the register-mixing kernels of
# mix_kernels.py and mix_bwd_kernels.py take, D <= 128) through the row-chunked forward and
# backward on CUDA for L in [CHUNKED_TALKING_HEADS_FROM, CHUNKED_TALKING_HEADS_UP_TO] (where they
# were measured faster; longer sequences keep the register kernels, which the GPU tests run at
# L=65536, while the slabs have not run there), and at any length where the heads are too
# wide for those kernels in the inputs' dtype (fp32 beyond D=32): MTA_KERNELS_CHUNKED_TALKING_HEADS
# 'auto' (the default); '1' always; '0' never. H200, B=1, H=16, D=128, bf16, causal, all 16 heads
# mixed, chunked against register (scripts/talking_heads_paths.py and talking_heads_ab.py; notes/
# thpaths_h200_1ef2392.log, thpaths16384_h200_8f50aee.log, talking_heads_ab_h200_250c5be.log):
# forward 4.16 against 6.05 ms at L=8192, 17.7 against 24.6 at 16384; fwd+bwd 25.4 against 32.4
# at 8192, 126-140 against 132 at 16384 (peak 1.50 against 0.91 GiB at 8192). At L=4096 the
# chunked paths were bound by their host time until 73b356f trimmed their launches per chunk
# (notes/hostab_h200_73b356f.log, one process, three rounds): forward 1.18-1.24 ms against
# 1.59, fwd+bwd 5.98 / 6.21 against 8.33 (a first round 8.83, its spread 7.3-10.4 ms). At
# L=2048 the register kernels' fwd+bwd was faster (2.47 against 3.9 ms, 1ef2392) until talking
# heads got their own chunked backward (chunked_talking_heads.py): at 2cb71b1, in bench
# processes of their own, two rounds (notes/thswitch_h200_2cb71b1.log), chunked against
# register fwd+bwd 2.35 / 2.03 against 2.49 / 2.48 ms at L=2048 (forward 0.56 / 0.30 against
# 0.49 / 0.50, host-bound), but 2.28 / 2.38 against 1.88 / 1.63 at L=1024.
CHUNKED_TALKING_HEADS = auto_switch_from_env("MTA_KERNELS_CHUNKED_TALKING_HEADS")
CHUNKED_TALKING_HEADS_FROM = 2048
CHUNKED_TALKING_HEADS_UP_TO = 16384


def prefer_chunked_talking_heads(q, pre_conv, pre_mix, post_conv, post_mix, on_cuda=None) -> bool:
    """Whether a talking-heads call (uses_register_mixing for 16-bit inputs) takes the
    row-chunked forward and backward instead of the register-mixing kernels, as
    CHUNKED_TALKING_HEADS says; False for every other call. on_cuda: whether q is on a CUDA
    device (default: q.is_cuda)."""
    D = q.shape[-1]
    if not uses_register_mixing(pre_conv, pre_mix, post_conv, post_mix, D):
        return False
    if CHUNKED_TALKING_HEADS != "auto":
        return CHUNKED_TALKING_HEADS == "1"
    fits = uses_register_mixing(pre_conv, pre_mix, post_conv, post_mix, D, q.element_size())
    measured = CHUNKED_TALKING_HEADS_FROM <= q.shape[2] <= CHUNKED_TALKING_HEADS_UP_TO
    return (q.is_cuda if on_cuda is None else on_cuda) and (measured or not fits)


def prefer_chunked_forward(q, pre_conv, pre_mix, post_conv, post_mix, sms=None) -> bool:
    """Whether the forward of this call takes the chunked path. Without convs, talking heads as
    prefer_chunked_talking_heads says. With convs as CHUNKED_FORWARD says, 'auto' choosing it
    when the general kernel's row-block programs (general_row_programs, per key split) are
    fewer than CHUNKED_BELOW_SMS x ``sms``, by default q's CUDA device's SM count (never on the
    CPU, where the kernels run in the interpreter)."""
    if pre_conv is None and post_conv is None:
        return prefer_chunked_talking_heads(q, pre_conv, pre_mix, post_conv, post_mix)
    if CHUNKED_FORWARD != "auto":
        return CHUNKED_FORWARD == "1"
    if sms is None:
        if not q.is_cuda:
            return False
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return general_row_programs(q, pre_conv, pre_mix, post_conv, post_mix) < CHUNKED_BELOW_SMS * sms


# (1, H, rows, L) tensors alive at once in a chunk: a stage's input and output in slab_forward
# (convs and mixes write new tensors; the softmax works in place), and one more
# for the matmuls' and the allocator's slack.
LIVE_TENSORS = 3
# Without convs two: the scores and the probabilities after the post mix (in q's dtype when the
# softmax's kernel mixes them; the softmax alone works in place). Talking heads at L=4096 on the
# H200 (bf16, B=1, H=16, D=128, two rounds at cb11dd1, notes/thchunks_h200_cb11dd1.log): forward
# 1.81 / 1.33 ms in 4 chunks (1 GiB at 3 slabs), 1.20 / 1.20 in 2 (1.5 GiB).
LIVE_TENSORS_WITHOUT_CONVS = 2


# Talking heads' scores Q K^T in bf16 for bf16 inputs (rounded once, as the bf16 reference
# rounds them; the softmax scale goes into the pre mix, whose kernel mixes and normalises in
# fp32) instead of fp32 copies through TF32: half the slab bytes written and read twice, and a
# bf16 matmul. MTA_KERNELS_BF16_SCORES=0 keeps fp32 scores. (fp16 inputs keep them: Q K^T
# before the scale could overflow fp16.)
BF16_SCORES = os.environ.get("MTA_KERNELS_BF16_SCORES", "1") == "1"

# Every slab of the chunked forward in bf16 for bf16 inputs on CUDA when a pre conv or a pre mix
# takes the softmax scale (the scores, the convs' outputs, the probabilities, A), each rounded
# once where the bf16 reference rounds it; the convs and mixes then run on bf16 tensor cores
# with fp32 sums, the softmax in fp32. (Under the interpreter bf16 tl.dot is wrong, so the CPU
# keeps fp32 slabs there; the tests run this path with fp16 slabs.) MTA_KERNELS_BF16_SLABS=0
# keeps fp32 slabs.
BF16_SLABS = os.environ.get("MTA_KERNELS_BF16_SLABS", "1") == "1"


# Causal talking heads' scores and A V through causal_matmul's kernels, which skip the tiles in
# every row's future (a third of both matmuls and of A's bytes at L=4096 in two chunks), where
# the operands allow tensor descriptors (causal_matmul.tma_ok): MTA_KERNELS_CAUSAL_MATMULS
# 'auto' (the default) or '1'; '0' keeps cuBLAS over the whole rectangle. H200, L=4096, B=1,
# H=16, D=128, bf16, graphed (notes/th_variants_h200_ad3b86b.log): forward 0.527-0.529 against
# 0.598-0.599 ms with the mix-softmax of then.
CAUSAL_MATMULS = auto_switch_from_env("MTA_KERNELS_CAUSAL_MATMULS")
# Causal talking heads' scores through causal_matmul.causal_scores (True), or cuBLAS over the
# whole rectangle (still with causal_pv after): talking heads' forward at L=4096 on the H200 in
# one chunk, graphed, 0.464 against 0.521 ms (notes/th_variants_h200_4564e84.log).
CAUSAL_SCORES = True
# Chunks of causal talking heads that skip the future budgeted in the slabs' own bytes, not
# fp32's: they waste no keys however tall, so at L=4096 one chunk (1 GiB of bf16 S and A) with
# half the launches; graphed forward 0.464 against 0.484-0.485 ms in two chunks, fwd+bwd 1.942
# against 1.963-1.972 (notes/th_variants_h200_4564e84.log, th_variants_bwd_h200_81f9639.log).
SKIPPING_COUNTS_SLAB_BYTES = True


def takes_causal_scores(causal, qs, ks) -> bool:
    """Whether causal talking heads' scores qs ks^T (one batch element's (H, L, D) and (Hkv, L,
    D) slab operands) come from causal_matmul.causal_scores: the forward and the backward ask
    alike, so that the backward's scores are the forward's to the bit (its lse normalises
    exactly those; cuBLAS may sum them in another order)."""
    return causal and CAUSAL_MATMULS != "0" and CAUSAL_SCORES and tma_ok(qs, ks)


def slab_dtype(q, pre_conv, pre_mix, post_conv, post_mix, compute_dtype=torch.float32):
    """The dtype of the chunked forward's slabs for this call: bf16 for bf16 q where
    BF16_SCORES (talking heads) or BF16_SLABS (on CUDA, with a pre conv or pre mix) says so,
    else compute_dtype."""
    if q.dtype != torch.bfloat16:
        return compute_dtype
    if is_talking_heads(pre_conv, pre_mix, post_conv, post_mix):
        return q.dtype if BF16_SCORES else compute_dtype
    takes_scale = pre_conv is not None or pre_mix is not None
    return q.dtype if BF16_SLABS and q.is_cuda and takes_scale else compute_dtype


def slab_weights_and_scale(weights, q, scale, slabs_dtype, compute_dtype):
    """The four weights (None where absent) for the slab kernels (slabs.slab_weights) and the
    scale for q: with fp32 slabs the scale goes into q (qc = scale * q); with 16-bit slabs
    (``slabs_dtype`` q's dtype) into the first linear map of the scores, the pre conv or else
    the pre mix, whose kernels sum in fp32, rather than into q rounded again. Returns (weights,
    q_scale, the index of the weight that took the scale or None): that weight's gradient
    takes the scale too."""
    weights = list(slab_weights(weights, compute_dtype))
    if slabs_dtype == compute_dtype:
        return weights, scale, None
    if slabs_dtype != q.dtype or (weights[0] is None and weights[1] is None):
        raise ValueError(f"slabs_dtype {slabs_dtype} needs to be q's dtype ({q.dtype}) and a pre conv or "
                         f"pre mix to take the scale")
    first = 0 if weights[0] is not None else 1
    weights[first] = weights[first] * scale
    return weights, 1.0, first


def chunked_forward(q, k, v, pre_conv, pre_mix, post_conv, post_mix, *, causal, pad_key, scale,
                    compute_dtype=torch.float32, rows=None, slabs_dtype=None):
    """MTA forward as ``mta_reference.mta_attention`` (same shapes; scale already resolved to
    a float), computed in chunks of ``rows`` query rows (default: what the budget allows).
    ``slabs_dtype``: the slabs' dtype (default slab_dtype(...)); q's 16-bit dtype needs a pre
    conv or a pre mix, which takes the softmax scale (tests run fp16 slabs on the CPU).
    Returns (out (B, H, L, D) in q's dtype, lse (B, H, L) in compute_dtype: the log-sum-exp of
    each row of the masked pre-softmax logits, as the fused forward returns it)."""
    B, H, L, D = q.shape
    cd = compute_dtype
    sd = slabs_dtype or slab_dtype(q, pre_conv, pre_mix, post_conv, post_mix, cd)
    weights, q_scale, _ = slab_weights_and_scale((pre_conv, pre_mix, post_conv, post_mix), q, scale, sd, cd)
    HQ, HP = conv_halos(pre_conv, post_conv)
    live = live_slabs(pre_conv, post_conv, LIVE_TENSORS, LIVE_TENSORS_WITHOUT_CONVS)
    # Chunks budgeted in the slabs' own bytes with convs (full MTA at L=4096 on the H200 with bf16
    # slabs, notes/chunkbytes_h200_fa50c59.log: 2.85 / 2.84 ms in 2 chunks against 2.90 / 2.91 in
    # 4), but without them in fp32's, since causal chunks then waste fewer keys (talking heads
    # at L=4096 took 0.743 ms in two chunks, 0.84-0.85 in one, notes/thchunks2_h200_efb9e19.log),
    # unless they skip the future anyway (SKIPPING_COUNTS_SLAB_BYTES)
    skip_future = causal and CAUSAL_MATMULS != "0" and is_talking_heads(pre_conv, pre_mix, post_conv, post_mix)
    counted = sd if HQ + HP > 0 or (skip_future and SKIPPING_COUNTS_SLAB_BYTES) else cd
    R = rows or rows_per_chunk(H, L, counted.itemsize, HQ + HP, live=live)
    out = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, L, device=q.device, dtype=cd)
    prec = _precision(q)
    # the post mix's kernel writes A in q's dtype, and 16-bit slabs are in it: A V then takes v
    # in it; else A is in the slabs' dtype, as v_in
    a_in_q_dtype = (post_mix is not None or sd == q.dtype) and q.dtype != cd
    with _matmul_precision(q):
        for b in range(B):
            one = slice(b, b + 1)
            qc, kc, _ = slab_inputs(q[one], k[one], None, q_scale, sd)
            # causal talking heads: the scores and A V skip the tiles in every row's future, where A
            # is left unwritten (causal_matmul, which reads v's kv heads in place); else A V is a
            # bmm with v's heads repeated to q's
            v_in = v[one] if a_in_q_dtype else v[one].to(sd)
            causal_a = skip_future and tma_ok(v_in[0])
            values = None if causal_a else repeat_kv_heads(v_in, H)
            causal_s = skip_future and takes_causal_scores(causal, qc[0], kc[0])
            operands = pre_conv_operands(q[one], k[one], weights[0], pad_key, q_scale)
            for r0 in chunk_starts(L, R):
                r1 = min(L, r0 + R)
                lo = max(0, r0 - HQ - HP)
                # without conv halos (lo = r0) the mix-softmax kernel writes these rows' lse in place
                lse_rows = lse[one, :, r0:r1] if lo == r0 else None
                t = slab_forward(qc, kc, weights, lo, r1, causal=causal, pad_key=pad_key, precision=prec,
                                 keep=False, a_dtype=q.dtype, pre_conv_operands=operands, lse_out=lse_rows,
                                 skip_future_scores=causal_s, leave_a_future=causal_a)
                a = t.a[0, :, r0 - lo:]
                if causal_a:
                    causal_pv(a, v_in[0], out[b, :, r0:r1], zero_above=r0, precision=prec)
                elif a.dtype == q.dtype:
                    torch.bmm(a, values[0, :, :a.shape[-1]], out=out[b, :, r0:r1])
                else:
                    out[b, :, r0:r1] = torch.bmm(a, values[0, :, :a.shape[-1]]).to(q.dtype)
                if t.lse is not lse_rows:
                    lse[one, :, r0:r1] = t.lse[:, :, r0 - lo:]
                del t, a    # before the next slab: live_slabs counts none from the last
    return out, lse
