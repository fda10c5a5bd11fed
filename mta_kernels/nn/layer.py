"""``MultiTokenAttention``: the attention block of the paper's models, on the fused op.

One module holds everything an attention block of the MTA paper's models has:

    x (B, S, dim) -> wq, wk, wv (no bias) -> q (B, S, H, D), k, v (B, S, Hkv, D)
      -> rotary embedding on q and k (consecutive pairs, positions 0..S-1)
      -> MTA attention (pre conv, pre mix, softmax, post conv, post mix; each optional)
      -> per-head RMSNorm (weight (D,), shared by heads, eps 1e-5), optionally times (1 - lambda(l))
      -> per-head sigmoid gate: n * sigmoid(gate(n)), gate = Linear(D, 1) with bias
      -> wo (no bias) -> (B, S, dim)

The attention itself is ``mta_kernels.mta_attention`` (``backend="fused"``) or the
plain-PyTorch ``mta_reference.mta_attention`` (``backend="reference"``); both read the
same parameters, so one module can be switched between them.

Parameters are stored in this project's layouts (docs/spec.md, section 2): ``pre_conv`` /
``post_conv`` (H, cq, ck), ``pre_mix`` / ``post_mix`` (G, ch, ch) as W[g, out, in].
``from_official_args`` / ``load_official_state_dict`` / ``official_state_dict`` port to
and from the authors' training code (facebookresearch/RAM, ``projects/mta``), converting
layouts per docs/spec.md section 7.

Interpretations, where the paper or the issue leave room (read against the authors' code):

- Conv layers are ``layer_id % 4 == 2`` with 0-based ids (the spec's "layers 2, 6, 10,
  ...", and the authors' configs' ``mta_layers: "2,6,10,14,18"`` over ``range(n_layers)``).
- lambda(l) = 0.8 - 0.6 * exp(-0.3 * l) with l = layer_id, 0-based (as the authors'
  RMSNorm, which receives the 0-based layer index). Depth scaling multiplies the normed
  output (after the RMSNorm weight); it has no effect without the norm, as in their code.
- The per-head RMSNorm normalises in fp32 and casts back before the weight, as theirs.
- Gate initialisation: the authors draw ``gate.weight`` from a truncated normal and leave
  the bias at nn.Linear's random default. Here it is deterministic: weight 0 and bias 0,
  so every gate starts at sigmoid(0) = 0.5 and the first gradient step is the same on
  every run. ``gate_1d=False`` (their ``Linear(D, D)`` elementwise gate) is supported too.
- Projections start from a truncated normal, std dim**-0.5 cut at 3 std (their default
  ``init_std``); MTA weights start at identity for every ``pad_key`` (theirs asserts
  'both'); the norm weight at ones.
- Scale 1/sqrt(D), causal, no dropout (the paper's models train without it).
- ``from_official_args`` uses the authors' defaults for names left out (notably
  ``query_kernel_size = key_kernel_size = 1``, a 1x1 pre-softmax conv, exactly as their
  dataclass does), except ``use_mta``, which defaults to True here: passing MTA options
  to an MTA constructor should not silently give plain attention. Their ``mta_layers``
  and ``layer_id`` are honoured as their ``BaseTransformer`` does: outside ``mta_layers``
  the convs are dropped (mixing stays), or all MTA parts if there is no head mixing.
  ``init_method`` only affects initialisation; anything but 'identity' warns and
  initialises to identity anyway (load a state dict to get trained weights).
  ``curse_norm`` concerns the block's norms, not attention, and is ignored here.
- Post-softmax mixing over all heads exists in two official forms: ``head_kernel``
  (G, ch, ch) [group, in, out] (what the released configs use, ``head_kernel_size``) and
  ``wposm.weight`` (H, H) (``post_sm_linear_head``). ``load_official_state_dict``
  accepts either; ``official_state_dict`` writes the one the module was created with
  (``head_kernel`` unless built by ``from_official_args(post_sm_linear_head=True)``).
  Pre-softmax mixing exists officially only over all heads (``wpsm``); smaller pre-mix
  groups here have no official form and cannot be ported.
"""
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

import mta_reference
from mta_reference import PAD_KEYS, identity_conv, identity_mix

BACKENDS = ("fused", "reference")
VARIANTS = ("mta", "talking_heads", "baseline")

# The paper's models (docs/spec.md, section 6): dim, layers, heads (head dim = dim // heads).
PAPER_MODELS: Dict[str, Dict[str, int]] = {
    "300M": dict(dim=1024, n_layers=20, n_heads=16),
    "550M": dict(dim=1280, n_layers=24, n_heads=10),
    "830M": dict(dim=1536, n_layers=24, n_heads=16),
    "1B": dict(dim=2048, n_layers=24, n_heads=16),
}
PAPER_CONV = (6, 11)       # (cq, ck) of both key-query convs in the paper's models
PAPER_ROPE_THETA = 1e5


def is_conv_layer(layer_id: int) -> bool:
    """True for the layers that carry key-query convs in the paper's MTA models.

    The spec's table says "layers 2, 6, 10, ..."; the authors' configs list
    ``mta_layers: "2,6,10,14,18"`` and number layers with ``range(n_layers)``, so these
    are 0-based ids: ``layer_id % 4 == 2`` (the 3rd, 7th, 11th, ... block).
    """
    return layer_id % 4 == 2


def depth_lambda(layer_id: int) -> float:
    """lambda(l) = 0.8 - 0.6 * exp(-0.3 * l) for the 0-based layer index l."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_id)


def _int(name, x, minimum, optional=False):
    """x as an int >= minimum (None allowed where optional); bools, floats and strings are refused."""
    if x is None and optional:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(x).__name__} {x!r}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def _positive_float(name, x):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__} {x!r}")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {x}")
    return float(x)


def _pair(x, name):
    """None or a pair (cq, ck) of positive ints."""
    if x is None:
        return None
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__") or len(x) != 2:
        raise TypeError(f"{name} must be a pair (cq, ck) of positive ints or None, got {x!r}")
    return tuple(_int(f"{name}[{i}]", v, 1) for i, v in enumerate(x))


@dataclass(frozen=True)
class MTAConfig:
    """Sizes and options of one ``MultiTokenAttention`` layer.

    dim: model width; n_heads: H query heads; n_kv_heads: Hkv (None: H; H % Hkv == 0);
    head_dim: D (None: dim // n_heads; must be even for the rotary embedding).
    pre_conv / post_conv: (cq, ck) sizes of the key-query convs, or None (absent).
    pre_mix / post_mix: head-mixing group size ch (n_heads: mix all heads), or None.
    pad_key: 'both' (ck odd), 'left' or 'right'; causal: False for encoder use.
    head_norm: per-head RMSNorm on the attention output (the authors' ``group_norm``);
    depth_scaling: multiply it by 1 - lambda(layer_id) (``layer_norm_rescale``);
    gate: per-head sigmoid gate (``add_gating``); gate_1d: Linear(D, 1) (else Linear(D, D)).
    layer_id: 0-based index of the layer in its model (used by depth_scaling).
    """

    dim: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = PAPER_ROPE_THETA
    pre_conv: Optional[Tuple[int, int]] = None
    pre_mix: Optional[int] = None
    post_conv: Optional[Tuple[int, int]] = None
    post_mix: Optional[int] = None
    pad_key: str = "both"
    causal: bool = True
    head_norm: bool = False
    norm_eps: float = 1e-5
    depth_scaling: bool = False
    gate: bool = False
    gate_1d: bool = True
    layer_id: int = 0

    def __post_init__(self):
        for name in ("dim", "n_heads"):
            _int(name, getattr(self, name), 1)
        for name in ("n_kv_heads", "head_dim", "pre_mix", "post_mix"):
            _int(name, getattr(self, name), 1, optional=True)
        _int("layer_id", self.layer_id, 0)
        object.__setattr__(self, "pre_conv", _pair(self.pre_conv, "pre_conv"))
        object.__setattr__(self, "post_conv", _pair(self.post_conv, "post_conv"))
        object.__setattr__(self, "rope_theta", _positive_float("rope_theta", self.rope_theta))
        object.__setattr__(self, "norm_eps", _positive_float("norm_eps", self.norm_eps))
        for name in ("causal", "head_norm", "depth_scaling", "gate", "gate_1d"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim} (or give head_dim)")
        if self.H % self.Hkv:
            raise ValueError(f"n_kv_heads={self.Hkv} must divide n_heads={self.H}")
        if self.D % 2:
            raise ValueError(f"head_dim={self.D} must be even for the rotary embedding")
        if not isinstance(self.pad_key, str) or self.pad_key not in PAD_KEYS:
            raise ValueError(f"pad_key must be one of {PAD_KEYS}, got {self.pad_key!r}")
        for name in ("pre_conv", "post_conv"):
            size = getattr(self, name)
            if size is not None and self.pad_key == "both" and size[1] % 2 == 0:
                raise ValueError(f"{name} has an even key size ck={size[1]}; pad_key='both' needs an odd ck")
        for name in ("pre_mix", "post_mix"):
            ch = getattr(self, name)
            if ch is not None and self.H % ch:
                raise ValueError(f"{name} group size {ch} must divide n_heads={self.H}")

    @property
    def H(self) -> int:
        """Query heads."""
        return self.n_heads

    @property
    def Hkv(self) -> int:
        """Key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def D(self) -> int:
        """Head dimension."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def depth_scale(self) -> float:
        """Factor on the normed output: 1 - lambda(layer_id) with depth scaling, else 1."""
        return 1.0 - depth_lambda(self.layer_id) if self.depth_scaling else 1.0

    @classmethod
    def for_layer(cls, dim: int, n_heads: int, layer_id: int, variant: str = "mta", *,
                  conv: Tuple[int, int] = PAPER_CONV, **overrides) -> "MTAConfig":
        """The paper's layer ``layer_id`` of a model of the given width and heads.

        variant 'mta': pre and post mixing over all heads in every layer, plus ``conv``
        (cq, ck) pre and post convs where ``is_conv_layer(layer_id)``, per-head RMSNorm
        and gate (as the released MTA configs; depth scaling off, pass
        ``depth_scaling=True`` for the paper's "group norm with depth scaling").
        'talking_heads': mixing over all heads in every layer, nothing else.
        'baseline': plain attention. ``overrides`` replace any field afterwards.
        """
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        fields = dict(dim=dim, n_heads=n_heads, layer_id=layer_id)
        if variant in ("mta", "talking_heads"):
            fields.update(pre_mix=n_heads, post_mix=n_heads)
        if variant == "mta":
            fields.update(head_norm=True, gate=True)
            if is_conv_layer(layer_id):
                fields.update(pre_conv=conv, post_conv=conv)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def paper(cls, model: str, layer_id: int, variant: str = "mta", **overrides) -> "MTAConfig":
        """Layer ``layer_id`` (0-based) of the paper's ``model`` ('300M', '550M', '830M', '1B').

        E.g. ``MTAConfig.paper("830M", 2)``: dim 1536, 16 heads of D=96, 6x11 convs,
        mixing over all 16 heads, head norm and gate; ``MTAConfig.paper("830M", 3)`` the
        same without convs; ``variant="talking_heads"`` the paper's talking-heads baseline.
        """
        if model not in PAPER_MODELS:
            raise ValueError(f"model must be one of {tuple(PAPER_MODELS)}, got {model!r}")
        sizes = PAPER_MODELS[model]
        if not 0 <= layer_id < sizes["n_layers"]:
            raise ValueError(f"layer_id={layer_id} out of range for {model} ({sizes['n_layers']} layers)")
        return cls.for_layer(sizes["dim"], sizes["n_heads"], layer_id, variant, **overrides)


# ----------------------------------------------------------------------------- rotary embedding

def rope_angles(S: int, D: int, theta: float, device=None, dtype=torch.float32, positions=None):
    """cos, sin of the rotary angles: angle[s, i] = pos_s * theta^(-2i/D) with pos_s = s, each
    (S, D/2); or for ``positions`` (B, S) (per-sequence positions, decoding) each (B, S, D/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=device, dtype=dtype) / D)
    pos = torch.arange(S, device=device, dtype=dtype) if positions is None else positions.to(dtype)
    angles = pos[..., None] * inv_freq
    return angles.cos(), angles.sin()


def document_positions(cu_seqlens: torch.Tensor, S: int) -> torch.Tensor:
    """(S,) int64: each token's position within its document, for offsets cu_seqlens (N+1,)
    [0, ..., S] of documents packed along a sequence."""
    offsets = cu_seqlens.to("cpu", torch.int64)
    if offsets.dim() != 1 or offsets.numel() < 2 or int(offsets[0]) != 0 or int(offsets[-1]) != S:
        raise ValueError(f"cu_seqlens must be offsets [0, ..., {S}], got {offsets.tolist()}")
    starts = offsets[:-1].repeat_interleave(offsets.diff())
    return torch.arange(S) - starts


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, S, H, D) by the angles (S, D/2) or
    (B, S, D/2).

    Llama reference style: the pair is the complex number x[2i] + i x[2i+1], multiplied
    by exp(i angle[s, i]). Computed in cos's dtype, returned in x's dtype.
    """
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))           # (B, S, H, D/2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)               # (S, 1, D/2) or (B, S, 1, D/2)
    out = torch.stack((re * c - im * s, re * s + im * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- the layer

class MultiTokenAttention(nn.Module):
    """Multi-Token Attention block: projections, RoPE, MTA, head norm, gate, output.

    ``MultiTokenAttention(config, backend="fused")``; forward(x (B, S, dim)) -> (B, S, dim)
    with positions 0..S-1. Parameters: ``wq`` (H*D, dim), ``wk``, ``wv`` (Hkv*D, dim),
    ``wo`` (dim, H*D), all nn.Linear without bias; ``pre_conv`` / ``post_conv``
    (H, cq, ck); ``pre_mix`` / ``post_mix`` (G, ch, ch) W[g, out, in]; ``norm_weight`` (D,);
    ``gate`` nn.Linear(D, 1) (or (D, D)). Absent parts are ``None``.
    """

    def __init__(self, config: MTAConfig, backend: str = "fused"):
        super().__init__()
        if not isinstance(config, MTAConfig):
            raise TypeError(f"config must be an MTAConfig, got {type(config).__name__}")
        self.config = config
        self.backend = backend
        c = config
        self.wq = nn.Linear(c.dim, c.H * c.D, bias=False)
        self.wk = nn.Linear(c.dim, c.Hkv * c.D, bias=False)
        self.wv = nn.Linear(c.dim, c.Hkv * c.D, bias=False)
        self.wo = nn.Linear(c.H * c.D, c.dim, bias=False)
        for name, shape in (("pre_conv", c.pre_conv and (c.H, *c.pre_conv)),
                            ("pre_mix", c.pre_mix and (c.H // c.pre_mix, c.pre_mix, c.pre_mix)),
                            ("post_conv", c.post_conv and (c.H, *c.post_conv)),
                            ("post_mix", c.post_mix and (c.H // c.post_mix, c.post_mix, c.post_mix))):
            self.register_parameter(name, nn.Parameter(torch.empty(shape)) if shape else None)
        self.norm_weight = nn.Parameter(torch.empty(c.D)) if c.head_norm else None
        self.gate = nn.Linear(c.D, 1 if c.gate_1d else c.D) if c.gate else None
        # Which official name holds post-softmax mixing ("head_kernel" or "wposm").
        self.official_post_mix = "head_kernel"
        self.reset_parameters()

    @property
    def backend(self) -> str:
        """'fused' (mta_kernels.mta_attention) or 'reference' (mta_reference.mta_attention)."""
        return self._backend

    @backend.setter
    def backend(self, value: str):
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def extra_repr(self) -> str:
        return f"{self.config}, backend={self.backend!r}"

    @torch.no_grad()
    def reset_parameters(self, init_std: Optional[float] = None):
        """Projections ~ truncated normal (std ``init_std``, default dim**-0.5, cut at 3 std);
        MTA weights identity; norm weight ones; gate weight and bias zero (gate = 0.5)."""
        c = self.config
        std = init_std or c.dim ** -0.5
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        for name in ("pre_conv", "post_conv"):
            w = getattr(self, name)
            if w is not None:
                w.copy_(identity_conv(c.H, w.shape[1], w.shape[2], c.pad_key))
        for name in ("pre_mix", "post_mix"):
            w = getattr(self, name)
            if w is not None:
                w.copy_(identity_mix(c.H, w.shape[1]))
        if self.norm_weight is not None:
            self.norm_weight.fill_(1.0)
        if self.gate is not None:
            self.gate.weight.zero_()
            self.gate.bias.zero_()

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **block) -> torch.Tensor:
        """The MTA op on q (B, H, S, D), k, v (B, Hkv, Lk, D) with this layer's weights -> (B, H, S, D);
        ``block``: q_prev and seqlens of a query block at the end of the keys (decoding)."""
        c = self.config
        weights = (self.pre_conv, self.pre_mix, self.post_conv, self.post_mix)
        if self.backend == "fused":
            from ..api import mta_attention
            return mta_attention(q, k, v, *weights, causal=c.causal, pad_key=c.pad_key, **block)
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        return mta_reference.mta_attention(q, k, v, *weights, causal=c.causal, pad_key=c.pad_key,
                                           compute_dtype=cd, **block)

    def cached_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache) -> torch.Tensor:
        """Attention of new tokens q (B, H, S, D), k, v (B, Hkv, S, D) over everything ``cache`` (a
        LayerCache) holds, which then holds them too -> (B, H, S, D)."""
        if not self.config.causal:
            raise ValueError("a cache decodes causal layers only; this layer has causal=False")
        fresh = cache.model.fresh
        cache.store(k, v)
        if fresh:      # nothing before these tokens: an ordinary call over them
            o = self.attention(q, k, v)
        else:
            S = q.shape[2]
            if bool((cache.model.new_tokens != S).any()):
                raise ValueError("after the first forward every sequence takes all of its new tokens")
            q_prev = cache.q_window if cache.halo else None
            if cache.model.static:      # the whole buffers, lengths on the device: same shapes every step
                o = self.attention(q, cache.k, cache.v, q_prev=q_prev, seqlens=cache.model.device_lengths + S)
            else:           # the keys up to the longest sequence; lengths from the host, so nothing waits
                lens = cache.model.lengths + S
                longest = int(lens.max())
                ragged = bool((lens != longest).any())
                o = self.attention(q, cache.k[:, :, :longest], cache.v[:, :, :longest], q_prev=q_prev,
                                   seqlens=lens if ragged else None)
        cache.slide(q)
        return o

    def norm_heads(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of o (..., D) in fp32 (fp64 for fp64), times the weight and the depth scale."""
        c = self.config
        n = o if o.dtype == torch.float64 else o.float()
        n = (n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + c.norm_eps)).type_as(o)
        n = n * self.norm_weight
        return n * c.depth_scale if c.depth_scaling else n

    def forward(self, x: torch.Tensor, cache=None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, S, dim) -> (B, S, dim). Without ``cache`` the tokens are positions 0..S-1; with one
        (a LayerCache of MTATransformer.new_cache) they follow what it holds, and it keeps them.
        cu_seqlens (N+1,) int offsets [0, ..., S] with B = 1: documents packed along the sequence,
        each its own sequence (positions restart at each document's first token)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"x must have shape (B, S, dim={self.config.dim}), got {tuple(x.shape)}")
        c = self.config
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, c.H, c.D)
        k = self.wk(x).view(B, S, c.Hkv, c.D)
        v = self.wv(x).view(B, S, c.Hkv, c.D)
        rope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cu_seqlens (packed documents) and a decoding cache cannot be combined")
        positions = None
        if cache is not None:
            positions = cache.model.device_lengths.to(x.device)[:, None] + torch.arange(S, device=x.device)
        elif cu_seqlens is not None:
            positions = document_positions(cu_seqlens, S).to(x.device)[None]
        cos, sin = rope_angles(S, c.D, c.rope_theta, device=x.device, dtype=rope_dtype, positions=positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            o = self.cached_attention(q, k, v, cache)
        else:
            o = self.attention(q, k, v, **({} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)))
        o = o.transpose(1, 2)                                     # (B, S, H, D)
        if self.norm_weight is not None:
            o = self.norm_heads(o)
        if self.gate is not None:
            o = o * torch.sigmoid(self.gate(o))
        return self.wo(o.reshape(B, S, c.H * c.D))

    # ------------------------------------------------------------------------- porting

    OFFICIAL_DEFAULTS = dict(
        use_mta=True, query_kernel_size=1, key_kernel_size=1, pad_key="both", mta_layers=None,
        after_sm_query_kernel_size=None, after_sm_key_kernel_size=None, init_method="identity",
        head_kernel_size=None, group_norm=False, layer_norm_rescale=False, curse_norm=False,
        pre_sm_linear_head=False, post_sm_linear_head=False, add_gating=False, gate_1d=True)

    @classmethod
    def official_config(cls, dim: int, n_heads: int, n_kv_heads: Optional[int] = None,
                        rope_theta: float = 10000.0, *, head_dim: Optional[int] = None,
                        layer_id: int = 0, **mta_args) -> Tuple[MTAConfig, str]:
        """Translate the authors' arguments to (MTAConfig, official post-mix name).

        Same arguments as ``from_official_args``; see the module docstring for defaults.
        """
        unknown = sorted(set(mta_args) - set(cls.OFFICIAL_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown official MTA argument(s) {unknown}; known: {sorted(cls.OFFICIAL_DEFAULTS)}")
        a = {**cls.OFFICIAL_DEFAULTS, **mta_args}
        if a["post_sm_linear_head"] and a["head_kernel_size"] is not None:
            raise ValueError("post_sm_linear_head and head_kernel_size are exclusive (as in the authors' code)")
        if a["init_method"] != "identity":
            warnings.warn(f"init_method={a['init_method']!r} is not reproduced: MTA weights start at "
                          "identity; load a state dict for trained weights", stacklevel=3)
        use_mta = bool(a["use_mta"])
        layers = a["mta_layers"]
        if use_mta and layers is not None:
            if isinstance(layers, str):
                layers = [int(s) for s in layers.split(",") if s.strip()]
            if layer_id not in layers:
                if a["head_kernel_size"] is None and not a["pre_sm_linear_head"] and not a["post_sm_linear_head"]:
                    use_mta = False
                else:
                    a["query_kernel_size"] = None
                    a["after_sm_query_kernel_size"] = None

        def conv(qs, ks):
            return (qs, ks) if use_mta and qs is not None and ks is not None else None

        post_mix = None
        if use_mta and a["head_kernel_size"] is not None:
            post_mix = a["head_kernel_size"]
        elif use_mta and a["post_sm_linear_head"]:
            post_mix = n_heads
        config = MTAConfig(
            dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, rope_theta=rope_theta,
            pre_conv=conv(a["query_kernel_size"], a["key_kernel_size"]),
            pre_mix=n_heads if use_mta and a["pre_sm_linear_head"] else None,
            post_conv=conv(a["after_sm_query_kernel_size"], a["after_sm_key_kernel_size"]),
            post_mix=post_mix, pad_key=a["pad_key"], head_norm=bool(a["group_norm"]),
            depth_scaling=bool(a["group_norm"] and a["layer_norm_rescale"]),
            gate=bool(a["add_gating"]), gate_1d=bool(a["gate_1d"]), layer_id=layer_id)
        return config, ("wposm" if use_mta and a["post_sm_linear_head"] else "head_kernel")

    @classmethod
    def from_official_args(cls, dim: int, n_heads: int, n_kv_heads: Optional[int] = None,
                           rope_theta: float = 10000.0, *, head_dim: Optional[int] = None,
                           layer_id: int = 0, backend: str = "fused", **mta_args) -> "MultiTokenAttention":
        """Build the layer from the authors' arguments (their ``MTATransformerArgs`` names).

        dim, n_heads, n_kv_heads, rope_theta, head_dim as their ``BaseTransformerArgs``
        (rope_theta defaults to theirs, 1e4; the paper's configs use 1e5); ``mta_args``:
        use_mta, query_kernel_size, key_kernel_size, after_sm_query_kernel_size,
        after_sm_key_kernel_size, pre_sm_linear_head, head_kernel_size,
        post_sm_linear_head, pad_key, group_norm, layer_norm_rescale, add_gating,
        gate_1d, mta_layers, init_method, curse_norm. E.g.
        ``MultiTokenAttention.from_official_args(dim=1024, n_heads=16, rope_theta=1e5,
        layer_id=2, **yaml["model"]["mta"])``.
        """
        config, post_name = cls.official_config(dim, n_heads, n_kv_heads, rope_theta,
                                                head_dim=head_dim, layer_id=layer_id, **mta_args)
        layer = cls(config, backend=backend)
        layer.official_post_mix = post_name
        return layer

    def _official_tensors(self) -> Dict[str, torch.Tensor]:
        """Official name -> this layer's tensor in the official layout (shares storage where it can)."""
        c = self.config
        out = {"wq.weight": self.wq.weight, "wk.weight": self.wk.weight,
               "wv.weight": self.wv.weight, "wo.weight": self.wo.weight}
        if self.pre_conv is not None:
            out["mta_kernel"] = mta_reference.conv_to_official(self.pre_conv)
        if self.pre_mix is not None:
            if self.pre_mix.shape[0] != 1:
                raise ValueError(f"pre_mix with group size {c.pre_mix} < n_heads={c.H} has no official "
                                 "form (wpsm mixes all heads)")
            out["wpsm.weight"] = self.pre_mix[0]
        if self.post_conv is not None:
            out["mta_kernel_after_sm"] = mta_reference.conv_to_official(self.post_conv)
        if self.post_mix is not None:
            if self.official_post_mix == "wposm" and self.post_mix.shape[0] == 1:
                out["wposm.weight"] = self.post_mix[0]
            else:
                out["head_kernel"] = mta_reference.mix_to_official_head_kernel(self.post_mix)
        if self.norm_weight is not None:
            out["subln.weight"] = self.norm_weight
        if self.gate is not None:
            out["gate.weight"] = self.gate.weight
            out["gate.bias"] = self.gate.bias
        return out

    def official_state_dict(self) -> Dict[str, torch.Tensor]:
        """This layer's parameters under the authors' names and layouts (detached copies)."""
        return {k: v.detach().clone() for k, v in self._official_tensors().items()}

    @torch.no_grad()
    def load_official_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str = ""):
        """Load one attention module's parameters from the authors' names and layouts.

        Keys (after ``prefix``, e.g. 'layers.2.attention.'): wq.weight, wk.weight,
        wv.weight, wo.weight, and as the config requires mta_kernel (H, 1, cq, ck),
        mta_kernel_after_sm, wpsm.weight (H, H), head_kernel (G, ch, ch) [group, in, out]
        or wposm.weight (H, H), subln.weight (D,), gate.weight, gate.bias. Every key this
        layer needs must be there; with an empty prefix any other key is an error, with a
        prefix keys outside it are ignored. Raises KeyError / ValueError naming the key.
        """
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "wposm.weight" in sd and "head_kernel" in sd:
            raise ValueError("state dict has both wposm.weight and head_kernel; an attention module has one")
        post_name = "wposm" if "wposm.weight" in sd else "head_kernel"
        if self.post_mix is not None and post_name == "wposm" and self.post_mix.shape[0] != 1:
            raise ValueError(f"wposm.weight mixes all heads but this layer's post_mix groups are "
                             f"{self.config.post_mix} heads")
        saved, self.official_post_mix = self.official_post_mix, post_name
        try:
            targets = self._official_tensors()
        finally:
            self.official_post_mix = saved
        missing = [k for k in targets if k not in sd]
        if missing:
            raise KeyError(f"official state dict lacks {missing} (prefix {prefix!r})")
        unexpected = [k for k in sd if k not in targets]
        if unexpected:
            raise ValueError(f"official state dict has keys this layer's config does not use: {unexpected}")
        for name, dst in targets.items():
            src = sd[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{name} has shape {tuple(src.shape)}, this layer expects {tuple(dst.shape)}")
            dst.copy_(src)          # dst views the parameter in the official layout
        self.official_post_mix = post_name
        return self


def with_backend(module: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every ``MultiTokenAttention`` inside ``module``; returns ``module``."""
    for m in module.modules():
        if isinstance(m, MultiTokenAttention):
            m.backend = backend
    return module


__all__ = ["MultiTokenAttention", "MTAConfig", "PAPER_MODELS", "PAPER_CONV", "is_conv_layer",
           "depth_lambda", "rope_angles", "apply_rope", "document_positions", "with_backend"]
