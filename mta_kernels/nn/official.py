"""The authors' whole-model checkpoints (facebookresearch/RAM, ``projects/mta``) on ``MTATransformer``.

Their ``LMTransformer`` has the same blocks as ``MTATransformer`` under the same names::

    tok_embeddings.weight                         (vocab, dim)
    layers.{i}.attention_norm.weight              (dim,)
    layers.{i}.attention.wq.weight / wk / wv / wo  and, as the layer's MTA options require,
        mta_kernel (H, 1, cq, ck), mta_kernel_after_sm, wpsm.weight (H, H),
        head_kernel (G, ch, ch) [group, in, out] or wposm.weight (H, H), subln.weight (D,), gate.weight, gate.bias
    layers.{i}.ffn_norm.weight                    (dim,)
    layers.{i}.feed_forward.w1.weight / w3        (hidden, dim);  w2 (dim, hidden)
    norm.weight                                   (dim,)
    output.weight                                 (vocab, dim); with weight_tying absent, or
                                                  ``output.tied_module.weight`` (lingua's TiedLinear)

Their layers differ: outside ``mta_layers`` the key-query convs are dropped (the mixing stays), or the
whole MTA part if there is no head mixing. ``OfficialTransformerConfig`` is an ``MTATransformerConfig``
whose attention layers are given one by one, so ``MTATransformer(config)``, its ``new_cache`` and
``generate`` build exactly those layers. Each layer's translation is ``MultiTokenAttention.official_config``
and its weights load with ``MultiTokenAttention.load_official_state_dict`` (layouts per spec section 7).

Model arguments are those of their ``LMTransformerArgs`` with their defaults: dim 512, n_layers 8,
head_dim / n_heads (one of them), n_kv_heads, vocab_size (required), ffn_dim_multiplier (None: 1),
multiple_of 256, norm_eps 1e-5, rope_theta 1e4, weight_tying False, and the MTA options under ``mta``
(a dict, as in their yaml) or at the top level. Training-only arguments (seed, init_base_std,
init_std_factor, max_seqlen, cache_attention_maps, dropout) are ignored. ``curse_norm``, ``triton``
(other parameter names) and ``sliding_window`` are refused: this model does not implement them.
One difference is only warned about: in a layer with MTA parts before the softmax and none after it,
their forward applies the softmax a second time (the released configs always mix after it).
"""
import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from .layer import MTAConfig, MultiTokenAttention
from .model import MTATransformer, MTATransformerConfig

POST_MIX_NAMES = ("head_kernel", "wposm")
MODEL_DEFAULTS = dict(dim=512, n_layers=8, head_dim=None, n_heads=None, n_kv_heads=None, vocab_size=-1,
                      ffn_dim_multiplier=None, multiple_of=256, norm_eps=1e-5, rope_theta=10000.0,
                      weight_tying=False, sliding_window=None, triton=False)
TRAINING_ONLY = ("seed", "init_base_std", "init_std_factor", "max_seqlen", "cache_attention_maps", "dropout")
IGNORED_KEYS = ("rope_embeddings.freqs_cis",)       # a buffer of theirs, recomputed here


@dataclass(frozen=True)
class OfficialTransformerConfig(MTATransformerConfig):
    """An ``MTATransformerConfig`` whose attention layers are given one by one.

    layers: an ``MTAConfig`` per block (layer_id i, width dim); they replace the pattern that
    variant, conv, depth_scaling, head_norm, gate and pad_key describe, which are then unused.
    post_mix_names: per layer, the official name of its post-softmax mixing ('head_kernel' or
    'wposm'), used when writing the authors' names back (default 'head_kernel').
    """

    layers: Tuple[MTAConfig, ...] = ()
    post_mix_names: Tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        names = tuple(self.post_mix_names) or ("head_kernel",) * len(self.layers)
        object.__setattr__(self, "post_mix_names", names)
        if len(self.layers) != self.n_layers:
            raise ValueError(f"layers has {len(self.layers)} configs for n_layers={self.n_layers}")
        if len(names) != self.n_layers or any(n not in POST_MIX_NAMES for n in names):
            raise ValueError(f"post_mix_names must be {self.n_layers} of {POST_MIX_NAMES}, got {names}")
        for i, c in enumerate(self.layers):
            if not isinstance(c, MTAConfig):
                raise TypeError(f"layers[{i}] must be an MTAConfig, got {type(c).__name__}")
            if c.dim != self.dim or c.layer_id != i:
                raise ValueError(f"layers[{i}] has dim={c.dim}, layer_id={c.layer_id}; expected {self.dim}, {i}")
        super().__post_init__()

    def layer_config(self, layer_id: int) -> MTAConfig:
        """The ``MTAConfig`` of block ``layer_id`` (0-based)."""
        return self.layers[layer_id]


def official_transformer_config(**args) -> OfficialTransformerConfig:
    """Translate the authors' model arguments (``LMTransformerArgs``, see the module docstring).

    E.g. ``official_transformer_config(vocab_size=128256, **yaml["model"])`` with their
    ``mta: {use_mta: true, query_kernel_size: 6, ...}`` section inside.
    """
    args = dict(args)
    mta = dict(args.pop("mta", None) or {})
    flat = {k: args.pop(k) for k in list(args) if k in MultiTokenAttention.OFFICIAL_DEFAULTS}
    both = sorted(set(mta) & set(flat))
    if both:
        raise ValueError(f"MTA argument(s) {both} given both inside mta and at the top level")
    mta.update(flat)
    for name in TRAINING_ONLY:
        args.pop(name, None)
    unknown = sorted(set(args) - set(MODEL_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown model argument(s) {unknown}; known: {sorted(MODEL_DEFAULTS)} and the MTA options")
    a = {**MODEL_DEFAULTS, **args}
    if mta.pop("curse_norm", False):
        raise NotImplementedError("curse_norm (depth-rescaled block norms) is not implemented by MTATransformer")
    if a["triton"]:
        raise NotImplementedError("triton=True checkpoints name their MTA weights differently; not supported")
    if a["sliding_window"] is not None:
        raise NotImplementedError("sliding_window attention is not implemented by MTATransformer")
    if a["vocab_size"] is None or a["vocab_size"] <= 0:
        raise ValueError("give vocab_size: their configs take it from the tokenizer (128256 for the paper's)")
    dim = a["dim"]
    if a["n_heads"] is None and a["head_dim"] is None:
        raise ValueError("give n_heads or head_dim (as the authors' TransformerBlock requires)")
    n_heads = a["n_heads"] if a["n_heads"] is not None else dim // a["head_dim"]
    head_dim = a["head_dim"] if a["head_dim"] is not None else dim // n_heads
    layers, names = [], []
    for i in range(a["n_layers"]):
        config, name = MultiTokenAttention.official_config(dim, n_heads, a["n_kv_heads"], a["rope_theta"],
                                                           head_dim=head_dim, layer_id=i, **mta)
        if (config.pre_conv or config.pre_mix) and not (config.post_conv or config.post_mix):
            warnings.warn(f"layer {i} mixes before the softmax only: the authors' code then applies the softmax "
                          "twice, this model once, so their outputs differ", stacklevel=2)
        layers.append(config)
        names.append(name)
    return OfficialTransformerConfig(
        vocab_size=a["vocab_size"], dim=dim, n_layers=a["n_layers"], n_heads=n_heads, n_kv_heads=a["n_kv_heads"],
        head_dim=head_dim, rope_theta=a["rope_theta"], norm_eps=a["norm_eps"],
        ffn_dim_multiplier=1.0 if a["ffn_dim_multiplier"] is None else a["ffn_dim_multiplier"],
        multiple_of=a["multiple_of"], weight_tying=bool(a["weight_tying"]), layers=tuple(layers),
        post_mix_names=tuple(names))


def build_model(config: MTATransformerConfig, backend: str = "fused") -> MTATransformer:
    """``MTATransformer(config)``, with each layer's official post-mix name where the config has them."""
    model = MTATransformer(config, backend=backend)
    for layer, name in zip(model.layers, getattr(config, "post_mix_names", ())):
        layer.attention.official_post_mix = name
    return model


def from_official_args(backend: str = "fused", **args) -> MTATransformer:
    """A freshly initialised ``MTATransformer`` from the authors' model arguments."""
    return build_model(official_transformer_config(**args), backend)


def _block_tensors(model: MTATransformer) -> Dict[str, torch.Tensor]:
    """Official name -> parameter, for everything but the attention modules and a tied output."""
    out = {"tok_embeddings.weight": model.tok_embeddings.weight, "norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        out[p + "attention_norm.weight"] = block.attention_norm.weight
        out[p + "ffn_norm.weight"] = block.ffn_norm.weight
        for w in ("w1", "w2", "w3"):
            out[p + f"feed_forward.{w}.weight"] = getattr(block.feed_forward, w).weight
    if not model.config.weight_tying:
        out["output.weight"] = model.output.weight
    return out


def official_state_dict(model: MTATransformer) -> Dict[str, torch.Tensor]:
    """The model's parameters under the authors' names and layouts (detached copies; no output key if tied)."""
    out = {k: v.detach().clone() for k, v in _block_tensors(model).items()}
    for i, block in enumerate(model.layers):
        out.update({f"layers.{i}.attention.{k}": v for k, v in block.attention.official_state_dict().items()})
    return out


@torch.no_grad()
def load_official_state_dict(model: MTATransformer, state_dict: Mapping[str, torch.Tensor],
                             prefix: str = "") -> MTATransformer:
    """Load the authors' whole-model state dict (names and layouts above) into ``model``.

    Keys are read after ``prefix`` (others are ignored). Every key the model needs must be there
    and every key there must be used (``rope_embeddings.freqs_cis`` aside); with weight tying an
    output weight may be present (``output.weight`` or ``output.tied_module.weight``) and must then
    equal the embedding. Raises KeyError / ValueError naming the key. Returns ``model``.
    """
    if not isinstance(model, MTATransformer):
        raise TypeError(f"model must be an MTATransformer, got {type(model).__name__}")
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    targets = _block_tensors(model)
    missing = [k for k in targets if k not in sd]
    if missing:
        raise KeyError(f"official state dict lacks {missing}")
    tied_outputs = [k for k in ("output.weight", "output.tied_module.weight")
                    if k in sd and model.config.weight_tying]
    prefixes = tuple(f"layers.{i}.attention." for i in range(len(model.layers)))
    attention = [k for k in sd if k.startswith(prefixes)]     # checked by each layer's loader
    unexpected = sorted(set(sd) - set(targets) - set(tied_outputs) - set(attention))
    if unexpected:
        raise ValueError(f"official state dict has keys this model does not use: {unexpected}")
    for name, dst in targets.items():
        if tuple(sd[name].shape) != tuple(dst.shape):
            raise ValueError(f"{name} has shape {tuple(sd[name].shape)}, this model expects {tuple(dst.shape)}")
    for name in tied_outputs:
        if tuple(sd[name].shape) != tuple(sd["tok_embeddings.weight"].shape) or \
                not torch.equal(sd[name].to(sd["tok_embeddings.weight"]), sd["tok_embeddings.weight"]):
            raise ValueError(f"{name} differs from tok_embeddings.weight but weight_tying is on")
    for name, dst in targets.items():
        dst.copy_(sd[name])
    for i, block in enumerate(model.layers):
        p = f"layers.{i}.attention."
        try:
            block.attention.load_official_state_dict(sd, prefix=p)
        except KeyError as e:
            raise KeyError(f"{p}: {e.args[0]}") from None
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    return model


def load_official_checkpoint(args: Mapping, state_dict: Mapping, backend: str = "fused",
                             dtype: Optional[torch.dtype] = None, prefix: str = "") -> MTATransformer:
    """An ``MTATransformer`` from the authors' model arguments and state dict.

    args: their ``model`` section (dim, n_layers, ..., ``mta: {...}``); state_dict: their names, or a
    consolidated checkpoint ``{"model": state_dict, ...}``. dtype: the model's (default: that of
    ``tok_embeddings.weight`` in the checkpoint). Returns the model in eval mode.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    model = from_official_args(backend=backend, **args)
    embedding = state_dict.get(prefix + "tok_embeddings.weight")
    dtype = dtype or (embedding.dtype if isinstance(embedding, torch.Tensor) else None)
    if dtype is not None:
        model.to(dtype)
    return load_official_state_dict(model, state_dict, prefix=prefix).eval()


__all__ = ["OfficialTransformerConfig", "official_transformer_config", "build_model", "from_official_args",
           "load_official_state_dict", "official_state_dict", "load_official_checkpoint"]
