"""A compact decoder-only transformer built from ``MultiTokenAttention``.

The paper's architecture (Llama-style, as the authors' lingua-based code): token
embedding, ``n_layers`` pre-norm blocks (RMSNorm -> MTA attention -> residual, RMSNorm ->
SwiGLU feed-forward -> residual), a final RMSNorm and an output projection tied to the
embedding. Train an MTA model in a few lines::

    from mta_kernels.models import MTATransformer, MTATransformerConfig, train_step
    model = MTATransformer(MTATransformerConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for tokens in batches:                    # (B, S) int64
        loss = train_step(model, opt, tokens)

Layer pattern (variant 'mta'): head mixing before and after the softmax over all heads in
every layer; key-query convs (6x11 by default) only in layers with ``layer_id % 4 == 2``,
0-based, i.e. the 3rd, 7th, 11th, ... block. The spec's table says "layers 2, 6, 10,
..."; the authors' configs write ``mta_layers: "2,6,10,14,18"`` (20 layers) and
``"2,6,10,14,18,22"`` (24 layers) and number their blocks ``range(n_layers)``, so the
numbers are 0-based ids. Every MTA layer also has the per-head RMSNorm and the sigmoid
gate. 'talking_heads' mixes heads in every layer and nothing else; 'baseline' is plain
attention.
"""
import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import MTACache
from .layer import _int, _positive_float, PAPER_CONV, PAPER_MODELS, PAPER_ROPE_THETA, MTAConfig, MultiTokenAttention, with_backend

LLAMA3_VOCAB = 128256   # the paper's tokenizer (Llama 3.1's tiktoken)


@dataclass(frozen=True)
class MTATransformerConfig:
    """Sizes of an MTA decoder. The attention options follow ``MTAConfig.for_layer``.

    vocab_size, dim, n_layers, n_heads, n_kv_heads (None: n_heads), head_dim (None:
    dim // n_heads); variant 'mta' | 'talking_heads' | 'baseline'; conv: (cq, ck) of the
    convs in conv layers; depth_scaling: the paper's "group norm with depth scaling";
    head_norm / gate: None keeps the variant's default. Feed-forward hidden size:
    ``ffn_hidden_dim``, or Llama's rule (2/3 * 4 * dim, times ffn_dim_multiplier, rounded
    up to multiple_of).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    variant: str = "mta"
    conv: Tuple[int, int] = PAPER_CONV
    depth_scaling: bool = False
    head_norm: Optional[bool] = None
    gate: Optional[bool] = None
    pad_key: str = "both"
    rope_theta: float = PAPER_ROPE_THETA
    norm_eps: float = 1e-5
    ffn_hidden_dim: Optional[int] = None
    ffn_dim_multiplier: float = 1.0
    multiple_of: int = 256
    weight_tying: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "n_layers", "multiple_of"):
            _int(name, getattr(self, name), 1)
        _int("ffn_hidden_dim", self.ffn_hidden_dim, 1, optional=True)
        _positive_float("ffn_dim_multiplier", self.ffn_dim_multiplier)
        for layer_id in range(self.n_layers):   # fail at construction, naming the field
            self.layer_config(layer_id)

    def layer_config(self, layer_id: int) -> MTAConfig:
        """The ``MTAConfig`` of block ``layer_id`` (0-based)."""
        overrides = dict(n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, pad_key=self.pad_key,
                         rope_theta=self.rope_theta)
        if self.head_norm is not None:
            overrides["head_norm"] = self.head_norm
        if self.gate is not None:
            overrides["gate"] = self.gate
        cfg = MTAConfig.for_layer(self.dim, self.n_heads, layer_id, self.variant, conv=self.conv,
                                  **overrides)
        return replace(cfg, depth_scaling=self.depth_scaling and cfg.head_norm)

    @property
    def hidden_dim(self) -> int:
        """Feed-forward hidden size."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(self.ffn_dim_multiplier * int(2 * 4 * self.dim / 3))
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def paper(cls, model: str, variant: str = "mta", vocab_size: int = LLAMA3_VOCAB,
              **overrides) -> "MTATransformerConfig":
        """The paper's '300M', '550M', '830M' or '1B' model (docs/spec.md, section 6), MTA or a baseline."""
        if model not in PAPER_MODELS:
            raise ValueError(f"model must be one of {tuple(PAPER_MODELS)}, got {model!r}")
        return cls(vocab_size=vocab_size, variant=variant, **{**PAPER_MODELS[model], **overrides})


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (fp64 for fp64): x (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> x / rms(x) * weight."""
        n = x if x.dtype == torch.float64 else x.float()
        return (n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases; x (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attention(norm(x)); out = h + ffn(norm(h)). (B, S, dim) -> same."""

    def __init__(self, config: MTATransformerConfig, layer_id: int, backend: str = "fused"):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = MultiTokenAttention(config.layer_config(layer_id), backend=backend)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor, cache=None, cu_seqlens=None) -> torch.Tensor:
        """x (B, S, dim) -> (B, S, dim); cache: this block's LayerCache when decoding; cu_seqlens:
        packed documents' offsets (B = 1)."""
        h = x + self.attention(self.attention_norm(x), cache=cache, cu_seqlens=cu_seqlens)
        return h + self.feed_forward(self.ffn_norm(h))


class MTATransformer(nn.Module):
    """Decoder-only MTA language model: tokens (B, S) int64 -> logits (B, S, vocab_size).

    ``backend`` ('fused' or 'reference') is passed to every attention layer; switch it
    later with ``model.set_backend(...)``.
    """

    def __init__(self, config: MTATransformerConfig, backend: str = "fused"):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i, backend) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.weight_tying:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Embedding, output and feed-forward ~ truncated normal, std dim**-0.5 (cut at 3 std);
        attention as ``MultiTokenAttention.reset_parameters`` (MTA weights at identity)."""
        std = self.config.dim ** -0.5
        linears = [self.tok_embeddings.weight]
        if not self.config.weight_tying:
            linears.append(self.output.weight)
        for block in self.layers:
            ff = block.feed_forward
            linears += [ff.w1.weight, ff.w3.weight, ff.w2.weight]
            block.attention.reset_parameters()
            block.attention_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
        for w in linears:
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)
        self.norm.weight.fill_(1.0)

    def set_backend(self, backend: str) -> "MTATransformer":
        """Run every attention layer on 'fused' or 'reference'; returns self."""
        return with_backend(self, backend)

    @classmethod
    def from_official_args(cls, backend: str = "fused", **args) -> "MTATransformer":
        """A freshly initialised model from the authors' model arguments (``nn/official.py``); load
        their weights with ``official.load_official_state_dict`` (or ``load_official_checkpoint``)."""
        from .official import from_official_args
        return from_official_args(backend=backend, **args)

    def forward(self, tokens: torch.Tensor, cache: Optional[MTACache] = None,
                new_tokens: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, S) int64 -> logits (B, S, vocab_size). With ``cache`` (new_cache) the tokens
        follow what it holds and it keeps them; ``new_tokens`` (B,): how many of each row's S
        tokens are real (right-padded prompts of different lengths; the first forward only).
        cu_seqlens (N+1,) int offsets with B = 1: documents packed along the sequence, each its
        own sequence in every layer (attention and positions restart at each)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a (B, S) tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
        h = self.tok_embeddings(tokens)
        if cache is None:
            for block in self.layers:
                h = block(h, cu_seqlens=cu_seqlens)
        else:
            if new_tokens is not None and not cache.fresh:
                raise ValueError("new_tokens is for the first forward into a cache (right-padded prompts)")
            cache.begin(tokens.shape[1], new_tokens)
            h = self._through_cache(h, cache)
            cache.end()
        return self.output(self.norm(h))

    def _through_cache(self, h: torch.Tensor, cache: MTACache) -> torch.Tensor:
        """h (B, S, dim) through every block with its layer's cache, between cache.begin and end."""
        for block, layer_cache in zip(self.layers, cache.layers):
            h = block(h, cache=layer_cache)
        return h

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None, static: bool = False) -> MTACache:
        """An empty decoding cache for ``batch`` sequences of up to ``max_len`` tokens, in the
        model's parameter dtype and device unless given; ``static``: every step the same shapes
        (the whole buffers), so that a step can be captured in a CUDA graph (nn/cache.py)."""
        p = self.tok_embeddings.weight
        return MTACache([self.config.layer_config(i) for i in range(self.config.n_layers)], batch, max_len,
                        dtype or p.dtype, device or p.device, static=static)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, prompt_lengths=None,
                 temperature: float = 0.0, top_k: Optional[int] = None, stop_tokens=(), pad_token_id: int = 0,
                 generator: Optional[torch.Generator] = None, cuda_graph: bool = False) -> "Generation":
        """Continue each prompt by up to ``max_new_tokens`` tokens, one forward per token over a cache.

        input_ids (B, S) int64: the prompts, right-padded to S where ``prompt_lengths`` (B,) says
        they are shorter. temperature 0 (default) is greedy; above 0 samples from the softmax of
        logits / temperature, restricted to the ``top_k`` most likely tokens if given. A sequence
        stops after emitting one of ``stop_tokens`` (kept in its output). Returns Generation:
        tokens (B, S + max_new_tokens), each row its prompt then its new tokens, padded with
        pad_token_id, and lengths (B,) of the valid prefix of each row. ``cuda_graph`` (CUDA only):
        replay each decode step from a CUDA graph over a static cache (the host issues one replay
        per token instead of every layer's launches). Its steps run over the whole preallocated
        cache, so their logits may differ from the default cache's in the last bits.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (B, S) with S >= 1, got {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        B, S = input_ids.shape
        lens = torch.full((B,), S, dtype=torch.int64) if prompt_lengths is None else \
            torch.as_tensor(prompt_lengths, dtype=torch.int64).cpu()
        if lens.shape != (B,) or bool((lens < 1).any()) or bool((lens > S).any()):
            raise ValueError(f"prompt_lengths must be (B,) ints in [1, {S}], got {lens.tolist()}")
        device = input_ids.device
        if cuda_graph and (device.type != "cuda" or self.tok_embeddings.weight.device.type != "cuda"):
            raise ValueError(f"cuda_graph=True needs the model and input_ids on a CUDA device, got {device}")
        self.eval()
        cache = self.new_cache(B, S + max_new_tokens, static=cuda_graph)
        decode_step = _GraphedDecodeStep(self, cache) if cuda_graph else \
            (lambda token: self(token[:, None], cache=cache)[:, -1])
        out = torch.full((B, S + max_new_tokens), pad_token_id, dtype=torch.int64, device=device)
        out[:, :S] = input_ids
        logits = self(input_ids, cache=cache, new_tokens=lens)
        last = logits[torch.arange(B, device=device), (lens - 1).to(device)]           # (B, vocab)
        done = torch.zeros(B, dtype=torch.bool)
        stops = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.int64)
        ends = lens.clone()
        for step in range(max_new_tokens):
            token = _next_token(last, temperature, top_k, generator).cpu()
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            out[torch.arange(B, device=device), ends.to(device)] = token.to(device)
            ends = ends + (~done).long()
            done = done | torch.isin(token, stops)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            last = decode_step(token.to(device))
        return Generation(out, ends)

    def loss(self, tokens: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross-entropy of tokens (B, S): predict tokens[:, 1:] from the prefix.
        With cu_seqlens (offsets of documents packed in tokens (1, S)), each document is its own
        sequence and no token predicts the next document's first."""
        if cu_seqlens is None:
            logits = self(tokens[:, :-1])
            return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        logits = self(tokens, cu_seqlens=cu_seqlens)[0, :-1]
        targets = tokens[0, 1:].clone()
        ends = cu_seqlens.to(targets.device, torch.int64)[1:-1] - 1     # last token of every document but the last
        targets[ends] = -100
        return F.cross_entropy(logits.float(), targets, ignore_index=-100)


class _GraphedDecodeStep:
    """One decode step of ``model`` over a static ``cache``: token (B,) -> logits (B, vocab) of
    the next position, replayed from a CUDA graph.

    The first step runs eagerly on a side stream (Triton compiles and tunes its kernels there,
    outside any capture); the second is captured and then replayed, as is every one after. The
    host-side bookkeeping (cache.begin copies the lengths into the device buffers the graph
    reads, cache.end counts the token) runs outside the graph at every step.
    """

    def __init__(self, model: MTATransformer, cache: MTACache):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.int64, device=cache.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warmed = False
        self.logits: Optional[torch.Tensor] = None

    def _run(self) -> torch.Tensor:
        h = self.model._through_cache(self.model.tok_embeddings(self.tokens), self.cache)
        return self.model.output(self.model.norm(h))[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(token[:, None])
        self.cache.begin(1)
        if not self.warmed:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.warmed = True
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._run()
            self.graph.replay()
            logits = self.logits
        self.cache.end()
        return logits


class Generation(NamedTuple):
    """generate's result: tokens (B, S + max_new_tokens), padded; lengths (B,) of each valid row."""

    tokens: torch.Tensor
    lengths: torch.Tensor


def _next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator) -> torch.Tensor:
    """(B,) next tokens from logits (B, vocab): argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def train_step(model: MTATransformer, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
               max_grad_norm: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None) -> float:
    """One optimizer step on next-token loss over tokens (B, S) (documents packed at cu_seqlens
    offsets, B = 1, if given); returns the loss before the step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(tokens, cu_seqlens=cu_seqlens)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


__all__ = ["MTATransformer", "MTATransformerConfig", "Generation", "TransformerBlock", "FeedForward", "RMSNorm",
           "train_step", "LLAMA3_VOCAB"]
