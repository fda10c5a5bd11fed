"""Packed documents (cu_seqlens): documents of one sequence run as padded batches of similar
lengths through the dense op, so no work is spent across documents.

A causal document padded at its end is exact: its padding rows and keys lie in the future of
every real row, and the padding rows' outputs are dropped (their gradients are zero). Without
the causal mask padding keys would be attended, so documents are then batched with others of
exactly their length.
"""
import torch
import torch.nn.functional as F

# A bucket takes documents whose padded length costs at most this factor of their own (the
# attention work of a row grows with the keys it reads, so padding costs about (Lpad/L)^2).
MAX_PADDING_COST = 1.25


def buckets(docs, causal: bool):
    """Group documents [(start, end), ...] into batches: a list of (padded length, [doc index, ...]),
    longest first. Causal documents share a batch when the padding to the longest costs at most
    MAX_PADDING_COST of each one's work; non-causal ones only with documents of equal length."""
    order = sorted(range(len(docs)), key=lambda i: docs[i][1] - docs[i][0], reverse=True)
    groups = []
    for i in order:
        n = docs[i][1] - docs[i][0]
        if groups:
            longest, members = groups[-1]
            fits = n == longest or (causal and (longest / n) ** 2 <= MAX_PADDING_COST)
            if fits:
                members.append(i)
                continue
        groups.append((n, [i]))
    return groups


def run_packed(dense, q, k, v, docs, causal: bool):
    """dense(qb, kb, vb) -> ob over padded batches (Bb, H, Lpad, D) of the documents ``docs``
    [(start, end), ...] packed in q (1, H, T, D), k, v (1, Hkv, T, D), covering [0, T) in order;
    returns (1, H, T, D) with each document's rows in place. Differentiable: the documents are
    taken with one split per input, whose backward is one concatenation (slices would each
    build a zero tensor of the whole sequence for their gradient)."""
    lengths = [e - s for s, e in docs]
    qs, ks, vs = (x[0].split(lengths, dim=1) for x in (q, k, v))
    pieces = [None] * len(docs)
    for length, members in buckets(docs, causal):
        if len(members) == 1:       # the document's own rows, as views: no padded copies
            i = members[0]
            pieces[i] = dense(qs[i][None], ks[i][None], vs[i][None])[0]
            continue

        def gather(xs):
            return torch.stack([F.pad(xs[i], (0, 0, 0, length - lengths[i])) for i in members])
        ob = dense(gather(qs), gather(ks), gather(vs))
        for row, i in enumerate(members):
            pieces[i] = ob[row, :, :lengths[i]]
    return torch.cat(pieces, dim=1).unsqueeze(0)
