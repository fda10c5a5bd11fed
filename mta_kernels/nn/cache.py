"""The decoding state of an MTA model: keys, values and the queries the convs read.

A decode step's output row t reads the post-softmax probabilities of rows t-(cq'-1) .. t, and
each of those the pre-softmax scores of rows (cq-1) further up: so besides K and V (after
RoPE), a layer with convs keeps its last P = (cq-1) + (cq'-1) queries (after RoPE). Layers
without convs keep no queries (head mixing is per position). Buffers are preallocated for a
maximum length, so a step writes into them instead of growing them.

A static cache (``static=True``) also fixes every step's shapes and addresses: the layers attend
over the whole preallocated K and V with each sequence's length read on the device, and the
lengths live in device buffers updated in place, so that a decode step can be captured in a
CUDA graph and replayed (``MTATransformer.generate(..., cuda_graph=True)``).
"""
from typing import List, Optional

import torch


class LayerCache:
    """One layer's K, V (B, Hkv, max_len, D) and last P queries (B, H, P, D), P its convs' row
    halo (0 without convs); ``model`` holds the lengths every layer shares."""

    def __init__(self, model: "MTACache", n_heads: int, n_kv_heads: int, head_dim: int, halo: int, dtype, device):
        B, M = model.batch, model.max_len
        self.model = model
        self.k = torch.zeros(B, n_kv_heads, M, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(B, n_kv_heads, M, head_dim, dtype=dtype, device=device)
        self.q_window = torch.zeros(B, n_heads, halo, head_dim, dtype=dtype, device=device)

    @property
    def halo(self) -> int:
        return self.q_window.shape[2]

    def store(self, k: torch.Tensor, v: torch.Tensor):
        """Store the new tokens' k, v (B, Hkv, S, D) at each sequence's next positions."""
        B, _, S, _ = k.shape
        reach = int(self.model.lengths.max()) + S          # on the host: no wait for the GPU
        if reach > self.k.shape[2]:
            raise ValueError(f"the cache holds {self.k.shape[2]} positions; a sequence would reach {reach}")
        pos = self.model.device_lengths.to(k.device)[:, None] + torch.arange(S, device=k.device)    # (B, S)
        rows = torch.arange(B, device=k.device)[:, None].expand(B, S)
        self.k.transpose(1, 2)[rows, pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v.transpose(1, 2)[rows, pos] = v.transpose(1, 2).to(self.v.dtype)

    def slide(self, q: torch.Tensor):
        """Slide the query window over the new tokens' q (B, H, S, D): each sequence's window
        ends at its last real new token."""
        if self.halo:
            joined = torch.cat([self.q_window, q.to(self.q_window.dtype)], dim=2)          # (B, H, P + S, D)
            ends = self.halo + self.model.device_new_tokens.to(q.device)                   # (B,)
            take = ends[:, None] - self.halo + torch.arange(self.halo, device=q.device)     # (B, P)
            index = take[:, None, :, None].expand(-1, joined.shape[1], -1, joined.shape[3])
            self.q_window.copy_(torch.gather(joined, 2, index))


class MTACache:
    """The decoding state of a model: a LayerCache per layer and each sequence's length.

    ``lengths`` (B,) int64 on the CPU: tokens stored per sequence. A forward with the cache adds
    ``new_tokens`` per sequence (all of its S tokens by default; fewer for right-padded prompts
    of different lengths): call ``begin(new_tokens)`` before the layers and ``end()`` after.
    ``begin`` also copies both to the cache's device once (``device_lengths``,
    ``device_new_tokens``, buffers kept for the cache's life), so that the layers never wait for a
    host-device copy. ``static``: see the module's docstring.
    """

    def __init__(self, layer_configs, batch: int, max_len: int, dtype=torch.float32, device=None,
                 static: bool = False):
        self.batch, self.max_len, self.device, self.static = batch, max_len, device, static
        self.lengths = torch.zeros(batch, dtype=torch.int64)
        self.new_tokens = torch.zeros(batch, dtype=torch.int64)
        self.device_lengths = self.lengths.to(device)
        self.device_new_tokens = self.new_tokens.to(device)
        self.layers: List[LayerCache] = []
        for c in layer_configs:
            halo = sum(size[0] - 1 for size in (c.pre_conv, c.post_conv) if size)
            self.layers.append(LayerCache(self, c.H, c.Hkv, c.D, halo, dtype, device))

    def begin(self, S: int, new_tokens: Optional[torch.Tensor] = None):
        """A forward of S tokens per sequence starts; ``new_tokens`` (B,) of them are real (default all S)."""
        n = torch.full((self.batch,), S, dtype=torch.int64) if new_tokens is None else new_tokens.to("cpu", torch.int64)
        if n.shape != (self.batch,) or bool((n < 1).any()) or bool((n > S).any()):
            raise ValueError(f"new_tokens must be ({self.batch},) ints in [1, {S}], got {n.tolist()}")
        self.new_tokens = n
        if self.device_lengths.shape != (self.batch,):         # rows were selected (beam search)
            self.device_lengths = torch.empty_like(self.lengths, device=self.device)
            self.device_new_tokens = torch.empty_like(n, device=self.device)
        # in place (a captured step reads these buffers), without waiting for the GPU: the host
        # tensors are staged at once and never written afterwards (end() makes new ones)
        self.device_lengths.copy_(self.lengths, non_blocking=True)
        self.device_new_tokens.copy_(n, non_blocking=True)

    def end(self):
        """The forward has run through every layer: the sequences grow by their new tokens."""
        self.lengths = self.lengths + self.new_tokens

    @property
    def fresh(self) -> bool:
        """Nothing stored yet: a forward is then an ordinary whole-sequence call."""
        return bool((self.lengths == 0).all())
