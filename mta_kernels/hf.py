"""Hugging Face transformers support: ``MTAHFConfig``, ``MTAForCausalLM`` and ``MTAHFCache``.

Importing this module registers model type "mta" with ``AutoConfig`` and ``AutoModelForCausalLM``
(``pip install -e ".[hf]"``; tested with transformers 5.17 and 5.25). ``mta_kernels`` never imports it::

    import mta_kernels.hf                      # registers the Auto classes
    model = MTAForCausalLM.from_mta(mta_transformer)          # or MTAForCausalLM(MTAHFConfig(...))
    model.save_pretrained(path)                # config.json + model.safetensors
    model = AutoModelForCausalLM.from_pretrained(path, backend="reference")
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)

``MTAForCausalLM.model`` is an ``MTATransformer`` (its state dict keys gain a "model." prefix):
the forward runs its embedding, blocks, norm and output with the package's decoding cache.

Padding. MTA's convolutions read neighbouring scores, so padding cannot be masked away inside the
op. Each forward instead gathers each row's real tokens (``attention_mask`` 1) into a right-padded
batch, runs those as the row's own sequence (positions 0, 1, ... over its real tokens only; the
right padding is never read by a real token, as attention is causal), and puts the outputs back
where the tokens came from. A padding position gets the output of the last real token before it
(zeros if there is none), so ``logits[:, -1]`` predicts each row's next token whether its prompt
was padded on the left or on the right. ``position_ids`` are not read. With a cache, every row
must have at least one real token in the first forward, and all of its tokens in later ones.

The cache (``MTAHFCache``, a transformers ``Cache``) wraps ``nn.cache.MTACache``: per layer K and V
and, in layers with key-query convs, the last queries the convs read. It grows as needed.
"""
from typing import Mapping, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .nn.cache import MTACache
from .nn.layer import BACKENDS, PAPER_CONV, PAPER_ROPE_THETA, MTAConfig
from .nn.model import LLAMA3_VOCAB, MTATransformer, MTATransformerConfig
from .nn.official import OfficialTransformerConfig, build_model, load_official_state_dict, official_transformer_config

# transformers 5.17 names the cache argument and output field past_key_values, later releases cache.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_MTA_FIELDS = tuple(MTATransformerConfig.__dataclass_fields__)


class MTAHFConfig(PretrainedConfig):
    """transformers config of an MTA decoder: every field of ``MTATransformerConfig`` (same names and
    defaults, the paper's 300M MTA model's sizes), plus

    layer_configs: None, or a list of per-layer dicts (``MTAConfig`` fields and ``official_post_mix``)
    for models whose layers do not follow the variant's pattern (the authors' checkpoints);
    backend: 'fused' (Triton) or 'reference' (plain PyTorch), e.g.
    ``from_pretrained(path, backend="reference")``.
    """

    model_type = "mta"
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "tie_word_embeddings": "weight_tying"}

    vocab_size: int = LLAMA3_VOCAB
    dim: int = 1024
    n_layers: int = 20
    n_heads: int = 16
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    variant: str = "mta"
    conv: tuple = PAPER_CONV
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
    layer_configs: Optional[list] = None
    backend: str = "fused"
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def __post_init__(self, **kwargs):
        self.conv = tuple(self.conv)
        super().__post_init__(**kwargs)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self.to_mta_config()        # fail here, naming the field

    def to_mta_config(self) -> MTATransformerConfig:
        """The package's config (an ``OfficialTransformerConfig`` where ``layer_configs`` is set)."""
        fields = {k: getattr(self, k) for k in _MTA_FIELDS}
        fields["conv"] = tuple(fields["conv"])
        if self.layer_configs is None:
            return MTATransformerConfig(**fields)
        layers, names = [], []
        for d in self.layer_configs:
            d = dict(d)
            names.append(d.pop("official_post_mix", "head_kernel"))
            for k in ("pre_conv", "post_conv"):
                d[k] = None if d.get(k) is None else tuple(d[k])
            layers.append(MTAConfig(**d))
        return OfficialTransformerConfig(**fields, layers=tuple(layers), post_mix_names=tuple(names))

    @classmethod
    def from_mta_config(cls, config: MTATransformerConfig, **kwargs) -> "MTAHFConfig":
        """From the package's config (layers listed one by one for an ``OfficialTransformerConfig``);
        ``kwargs``: other fields (backend, token ids, ...)."""
        fields = {k: getattr(config, k) for k in _MTA_FIELDS}
        if isinstance(config, OfficialTransformerConfig):
            fields["layer_configs"] = [{**c.__dict__, "official_post_mix": n}
                                       for c, n in zip(config.layers, config.post_mix_names)]
        return cls(**fields, **kwargs)


class _MTALayerView(CacheLayerMixin):
    """One layer of an ``MTAHFCache`` as transformers sees it: keys / values are the layer's buffers
    (B, Hkv, capacity, D), of which each row's first ``cache.mta.lengths[b]`` positions are filled."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: "MTAHFCache", index: int):
        self.cache, self.index = cache, index
        self.is_initialized = True

    def _layer(self):
        return None if self.cache.mta is None else self.cache.mta.layers[self.index]

    @property
    def keys(self):
        return None if self._layer() is None else self._layer().k

    @property
    def values(self):
        return None if self._layer() is None else self._layer().v

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("MTA layers write their cache through MultiTokenAttention.forward")

    def get_mask_sizes(self, query_length: int):
        return self.cache.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reset(self):
        pass

    def reorder_cache(self, beam_idx):
        pass


class MTAHFCache(Cache):
    """A transformers ``Cache`` over the package's ``MTACache`` (per layer K, V and conv query window).

    ``MTAHFCache(model)`` for an ``MTATransformer`` or ``MTAForCausalLM``. The buffers are made at the
    first forward (for its batch) with room for ``capacity`` more tokens, and grow by as much when
    full. ``get_seq_length()`` counts the columns seen (padding included, as transformers counts
    them); ``mta.lengths`` (B,) the real tokens of each row. Rows can be reordered or selected (beam
    search); tokens cannot be cropped.
    """

    def __init__(self, model, capacity: int = 256):
        model = model.model if isinstance(model, MTAForCausalLM) else model
        if not isinstance(model, MTATransformer):
            raise TypeError(f"model must be an MTATransformer or MTAForCausalLM, got {type(model).__name__}")
        self.layer_configs = [model.config.layer_config(i) for i in range(model.config.n_layers)]
        self.capacity = capacity
        self.mta: Optional[MTACache] = None
        self.seen = 0
        super().__init__(layers=[_MTALayerView(self, i) for i in range(len(self.layer_configs))])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return -1 if self.mta is None else self.mta.batch

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def prepare(self, batch: int, new_len: int, dtype, device) -> MTACache:
        """The ``MTACache`` for a forward of ``new_len`` more tokens per row, made or grown to fit."""
        if self.mta is None:
            self.mta = MTACache(self.layer_configs, batch, new_len + self.capacity, dtype, device)
        elif self.mta.batch != batch:
            raise ValueError(f"the cache holds {self.mta.batch} sequences, the input has {batch}")
        need = int(self.mta.lengths.max()) + new_len
        if need > self.mta.max_len:
            size = need + self.capacity
            for layer in self.mta.layers:
                for name in ("k", "v"):
                    old = getattr(layer, name)
                    new = old.new_zeros(*old.shape[:2], size, old.shape[3])
                    new[:, :, :old.shape[2]] = old
                    setattr(layer, name, new)
            self.mta.max_len = size
        return self.mta

    def _select_rows(self, index: torch.Tensor):
        if self.mta is None:
            return
        for layer in self.mta.layers:
            for name in ("k", "v", "q_window"):
                t = getattr(layer, name)
                setattr(layer, name, t.index_select(0, index.to(t.device)))
        cpu = index.cpu()
        self.mta.lengths = self.mta.lengths.index_select(0, cpu)
        self.mta.new_tokens = self.mta.new_tokens.index_select(0, cpu)
        self.mta.batch = len(cpu)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Rows become ``beam_idx`` (B,) of the old ones (beam search)."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.mta is not None:
            self._select_rows(torch.arange(self.mta.batch).repeat_interleave(repeats))

    def crop(self, *args, **kwargs):
        raise NotImplementedError("an MTA cache cannot drop tokens: the conv query window would need them back")

    def reset(self):
        self.mta, self.seen = None, 0


class MTAForCausalLM(PreTrainedModel, GenerationMixin):
    """``MTATransformer`` as a transformers causal LM: forward, loss, ``generate``, save / load.

    forward(input_ids (B, S), attention_mask (B, seen + S) or None, cache / past_key_values,
    labels (B, S), use_cache, logits_to_keep) -> CausalLMOutputWithPast(loss, logits (B, S', vocab),
    cache). See the module docstring for how padding is handled.
    """

    config_class = MTAHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerBlock"]
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: MTAHFConfig):
        super().__init__(config)
        self.model = build_model(config.to_mta_config(), backend=config.backend)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False        # the forward makes its own MTAHFCache

    @torch.no_grad()
    def _init_weights(self, module):
        # MTATransformer's own initialisation (MTA weights at identity), keeping loaded parameters.
        if isinstance(module, MTATransformer):
            keep = {n: p.detach().clone() for n, p in module.named_parameters()
                    if getattr(p, "_is_hf_initialized", False)}
            module.reset_parameters()
            for n, t in keep.items():
                module.get_parameter(n).copy_(t)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.output

    def set_output_embeddings(self, value: nn.Linear):
        self.model.output = value

    def set_backend(self, backend: str) -> "MTAForCausalLM":
        """Run every attention layer on 'fused' or 'reference' (saved in the config); returns self."""
        self.model.set_backend(backend)
        self.config.backend = backend
        return self

    @classmethod
    def from_mta(cls, model: MTATransformer, **config_kwargs) -> "MTAForCausalLM":
        """A transformers model with a copy of ``model``'s weights (same dtype and device);
        ``config_kwargs``: other ``MTAHFConfig`` fields (backend defaults to the model's)."""
        backend = next((l.attention.backend for l in model.layers), "fused")
        config = MTAHFConfig.from_mta_config(model.config, **{"backend": backend, **config_kwargs})
        p = model.tok_embeddings.weight
        out = cls(config).to(device=p.device, dtype=p.dtype)
        out.model.load_state_dict(model.state_dict())
        for mine, theirs in zip(out.model.layers, model.layers):
            mine.attention.official_post_mix = theirs.attention.official_post_mix
        return out.eval()

    @classmethod
    def from_official(cls, args: Mapping, state_dict: Mapping, dtype: Optional[torch.dtype] = None,
                      prefix: str = "", **config_kwargs) -> "MTAForCausalLM":
        """The authors' checkpoint (their model arguments and state dict, ``nn/official.py``)."""
        if "model" in state_dict and isinstance(state_dict["model"], Mapping):
            state_dict = state_dict["model"]
        config = MTAHFConfig.from_mta_config(official_transformer_config(**args), **config_kwargs)
        out = cls(config)
        embedding = state_dict.get(prefix + "tok_embeddings.weight")
        dtype = dtype or (embedding.dtype if isinstance(embedding, torch.Tensor) else None)
        if dtype is not None:
            out.to(dtype)
        load_official_state_dict(out.model, state_dict, prefix=prefix)
        return out.eval()

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep=0, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """See the class docstring. logits_to_keep: 0 for all positions, k for the last k, or an index tensor."""
        kwargs.pop("position_ids", None)        # positions follow the attention mask
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        m = self.model
        h = m.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = h.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is not None and not isinstance(cache, MTAHFCache):
            if cache.get_seq_length() != 0:
                raise TypeError(f"an MTA model needs an MTAHFCache, got a filled {type(cache).__name__}")
            cache, use_cache = None, True
        if use_cache and cache is None:
            cache = MTAHFCache(m)

        real = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < S:
                raise ValueError(f"attention_mask must be (B={B}, seen + S) with S={S}, "
                                 f"got {tuple(attention_mask.shape)}")
            real = attention_mask[:, -S:].to(h.device) != 0                         # (B, S)
            if bool(real.all()):
                real = None
        if real is None:
            n = torch.full((B,), S, dtype=torch.int64)
            hc = h
        else:
            n = real.sum(1).cpu()
            if bool((n == 0).any()):
                raise ValueError("every row needs at least one real token (attention_mask 1) in each forward")
            order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :int(n.max())]
            hc = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))      # (B, max n, dim), right-padded

        if cache is None:
            for block in m.layers:
                hc = block(hc)
        else:
            mta = cache.prepare(B, hc.shape[1], h.dtype, h.device)
            mta.begin(hc.shape[1], None if real is None else n)
            hc = m._through_cache(hc, mta)
            mta.end()
            cache.seen += S

        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
        else:
            keep = logits_to_keep
        if real is None:
            hk = hc[:, keep]
        else:
            rank = (real.cumsum(1) - 1)[:, keep]                     # index among real tokens, -1 before the first
            hk = hc.gather(1, rank.clamp(min=0)[..., None].expand(-1, -1, hc.shape[-1]))
            hk = hk.masked_fill((rank < 0)[..., None], 0.0)
        logits = m.output(m.norm(hk))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


def mta_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """An ``MTATransformer`` state dict -> ``MTAForCausalLM``'s (keys prefixed with "model.")."""
    return {f"model.{k}": v for k, v in state_dict.items()}


def hf_to_mta_state_dict(state_dict: Mapping[str, torch.Tensor], weight_tying: bool = True) -> dict:
    """An ``MTAForCausalLM`` state dict (or a saved one, without the tied output) -> ``MTATransformer``'s;
    with ``weight_tying`` a missing ``output.weight`` is the embedding."""
    out = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    if weight_tying and "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


AutoConfig.register("mta", MTAHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MTAHFConfig, MTAForCausalLM, exist_ok=True)

__all__ = ["MTAHFConfig", "MTAForCausalLM", "MTAHFCache", "mta_to_hf_state_dict", "hf_to_mta_state_dict"]
