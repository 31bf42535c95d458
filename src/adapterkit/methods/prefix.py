"""Prefix tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190) for causal LMs.

Every attention layer ``l`` gets ``P = num_virtual_tokens`` trainable key and value
vectors in front of the sequence's own: it attends over ``[K_l^prefix ; K_l]``. The
prefix is handed to the model as its KV cache (the forward argument ``cache``, named
``past_key_values`` before transformers 5.24): a transformers ``DynamicCache`` whose
layer ``l`` holds keys and values of shape (B, num_kv_heads, P, head_dim). The prefix
tensor is built exactly like PEFT's ``PrefixEncoder`` (so the two are interchangeable)::

    flat = prompt_embeddings                                   # (P, num_layers*2*kv_dim)
    # or, with prefix_projection:
    flat = transform(embedding.weight)                         # Linear -> Tanh -> Linear
    kv   = flat.view(P, num_layers*2, num_kv_heads, head_dim)  # kv_dim = num_kv_heads * head_dim
    K_l, V_l = kv[:, 2l], kv[:, 2l + 1]                        # each (P, num_kv_heads, head_dim)

Parameters (one piece on the root model, host path ``""``; native file keys in brackets):

* ``prefix_projection=False``: ``prompt_embeddings`` (P, num_layers*2*kv_dim)
  [``prompt_embeddings``] -- the same tensor, key and shape as PEFT's saved file.
* ``prefix_projection=True`` (PEFT's PrefixEncoder module names):
  ``embedding.weight`` (P, kv_dim), ``transform.0.weight`` (encoder_hidden_size, kv_dim),
  ``transform.0.bias`` (encoder_hidden_size,), ``transform.2.weight``
  (num_layers*2*kv_dim, encoder_hidden_size), ``transform.2.bias`` (num_layers*2*kv_dim,).
  PEFT saves only the MLP's output as ``prompt_embeddings`` (P, num_layers*2*kv_dim):
  :func:`flatten_prefix` computes it from these tensors, and a PEFT prefix file loads as
  ``prefix_projection=False``. :func:`prefix_dims` gives PEFT's token_dim (= kv_dim),
  num_attention_heads (= num_kv_heads) and num_layers for a model.

Call semantics (as PEFT's PeftModelForCausalLM): on the first call (no cache or an empty
one) the KV cache is replaced by the prefix cache; on every call a 2-D
``attention_mask`` that does not cover the prefix gets P ones in front and
``position_ids`` (if given) move by P, so real tokens sit at positions ``P..`` (the model
derives them from the cache length when not given). Outputs are unchanged: logits align
with ``input_ids``; the returned cache holds the prefix. Later calls with a non-empty cache
(``generate()`` decode steps) keep the cache. Not mergeable (no weight delta). Not usable
with gradient checkpointing (transformers drops the cache in checkpointed layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, UnsupportedModuleError
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .prompt import (CACHE_ARGS, VirtualTokenPiece, batch_size_of, cache_arg, check_causal_lm,
                     check_virtual_tokens, get_cache, past_length)


@dataclass(frozen=True)
class PrefixTuningConfig(AdapterConfig):
    """Prefix-tuning hyper-parameters.

    num_virtual_tokens: P, the prefix length per layer.
    prefix_projection: reparameterise the prefix through an MLP (embedding (P, kv_dim) ->
    Linear(kv_dim, encoder_hidden_size) -> Tanh -> Linear(., num_layers*2*kv_dim)).
    encoder_hidden_size: the MLP's hidden size; None = kv_dim (PEFT's default).
    init: "random" (as PEFT: embedding ~ N(0, 1), Linear default init) or "zero" (the last
    Linear, or the embedding without projection, starts at 0).
    ``targets`` must stay None: the piece sits on the root model.
    """

    method = "prefix"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: Literal["random", "zero"] = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.targets is not None:
            raise ConfigError(f"{name}.targets must be None: prefix tuning attaches to the root model, "
                              f"got {self.targets!r}")
        check_virtual_tokens(name, self.num_virtual_tokens)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"{name}.prefix_projection must be a bool, got {self.prefix_projection!r}")
        e = self.encoder_hidden_size
        if e is not None and (not isinstance(e, int) or isinstance(e, bool) or e <= 0):
            raise ConfigError(f"{name}.encoder_hidden_size must be a positive integer or None, got {e!r}")
        if e is not None and not self.prefix_projection:
            raise ConfigError(f"{name}.encoder_hidden_size is only used with prefix_projection=True")
        if self.init not in ("random", "zero"):
            raise ConfigError(f"{name}.init must be one of random, zero; got {self.init!r}")


class PrefixDims(NamedTuple):
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def prefix_dims(model: nn.Module) -> PrefixDims:
    """Layer count and key/value shape of a transformers causal LM (as PEFT infers them)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModuleError(
            f"prefix tuning needs a transformers model with a config; {type(model).__name__} has none")
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (isinstance(layers, int) and isinstance(heads, int)):
        raise UnsupportedModuleError(
            f"prefix tuning cannot read num_hidden_layers / num_attention_heads from {type(cfg).__name__}"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None)
    if not head_dim:
        if not isinstance(hidden, int) or hidden % heads:
            raise UnsupportedModuleError(f"prefix tuning cannot infer head_dim from {type(cfg).__name__}")
        head_dim = hidden // heads
    return PrefixDims(int(layers), int(kv_heads), int(head_dim))


class PrefixPiece(VirtualTokenPiece):
    """Prefix tuning on a causal LM; see the module docstring for parameters and shapes."""

    def __init__(self, model: nn.Module, cfg: PrefixTuningConfig, dims: PrefixDims, cache_name: str) -> None:
        super().__init__(model, cfg.num_virtual_tokens)
        self.dims = dims
        self.cache_name = cache_name  # the model's forward argument for the KV cache
        ref = model.get_input_embeddings().weight  # the prefix lives on the model's device, in its dtype
        dev, dt = ref.device, ref.dtype
        p, kv, out = cfg.num_virtual_tokens, dims.kv_dim, dims.num_layers * 2 * dims.kv_dim
        self.prefix_projection = cfg.prefix_projection
        if cfg.prefix_projection:
            enc = cfg.encoder_hidden_size or kv
            self.embedding = nn.Embedding(p, kv, device=dev, dtype=dt)  # N(0, 1), as PEFT
            self.transform = nn.Sequential(
                nn.Linear(kv, enc, device=dev, dtype=dt), nn.Tanh(), nn.Linear(enc, out, device=dev, dtype=dt)
            )
            if cfg.init == "zero":
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)
        else:
            w = torch.zeros(p, out, device=dev, dtype=dt)
            if cfg.init == "random":
                nn.init.normal_(w)  # nn.Embedding's default, as PEFT
            self.prompt_embeddings = nn.Parameter(w)  # (P, num_layers*2*kv_dim)

    def prefix_states(self) -> torch.Tensor:
        """The flat prefix, (P, num_layers*2*kv_dim): what PEFT saves as ``prompt_embeddings``."""
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.prompt_embeddings

    def make_cache(self, batch: int, dtype: torch.dtype) -> Any:
        """A DynamicCache holding the prefix: layer l keys/values (B, num_kv_heads, P, head_dim)."""
        from transformers import DynamicCache  # transformers is only needed once a prefix runs

        d = self.dims
        p = self.num_virtual_tokens
        kv = self.prefix_states().to(dtype).view(p, d.num_layers * 2, d.num_kv_heads, d.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (layers*2, kv_heads, P, head_dim)
        shape = (batch, d.num_kv_heads, p, d.head_dim)
        layers = [(kv[2 * i].unsqueeze(0).expand(shape), kv[2 * i + 1].unsqueeze(0).expand(shape))
                  for i in range(d.num_layers)]
        # no config: plain (non-sliding) layers, as PEFT builds it
        return DynamicCache(layers)

    def rewrite(self, host: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        p = self.num_virtual_tokens
        b, n = batch_size_of(kw, host)
        cache = get_cache(kw)
        past = past_length(cache)
        if past == 0:
            if cache is not None and type(cache).__name__ not in ("DynamicCache",):
                raise AdapterError(
                    f"prefix tuning replaces the (empty) cache with a DynamicCache; got {type(cache).__name__} "
                    f"(use the default cache_implementation)"
                )
            if host.training and torch.is_grad_enabled() and any(
                getattr(m, "gradient_checkpointing", False) for m in host.modules()
            ):
                raise AdapterError("prefix tuning does not work with gradient checkpointing (it drops the cache); "
                                   "disable it with model.gradient_checkpointing_disable()")
            ref = kw.get("inputs_embeds")
            dtype = ref.dtype if ref is not None else host.get_input_embeddings().weight.dtype
            for arg in CACHE_ARGS:
                kw.pop(arg, None)
            kw[self.cache_name] = self.make_cache(b, dtype)
            past = p
        kw["attention_mask"] = self.extend_mask(kw.get("attention_mask"), past + n)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + p
        return kw


def flatten_prefix(config: PrefixTuningConfig, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's ``prompt_embeddings`` (P, num_layers*2*kv_dim) from a native prefix adapter's tensors."""
    if not config.prefix_projection:
        return tensors["prompt_embeddings"]
    need = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")
    missing = [k for k in need if k not in tensors]
    if missing:
        raise ConfigError(f"prefix adapter with prefix_projection lacks tensor {missing[0]!r}")
    with torch.no_grad():
        h = torch.tanh(nn.functional.linear(tensors[need[0]], tensors[need[1]], tensors[need[2]]))
        return nn.functional.linear(h, tensors[need[3]], tensors[need[4]])


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, PrefixTuningConfig)
    what = f"prefix-tuning adapter {name!r}"
    check_causal_lm(model, what, ("input_ids", "attention_mask"))
    cache_name = cache_arg(model)
    if cache_name is None:
        raise UnsupportedModuleError(f"{what} needs a model whose forward accepts a KV cache (cache or "
                                     f"past_key_values); {type(model).__name__}.forward has neither")
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise UnsupportedModuleError(f"{what} needs a transformers model with get_input_embeddings()")
    return {"": PrefixPiece(model, cfg, prefix_dims(model), cache_name)}


register(MethodSpec(name="prefix", config_cls=PrefixTuningConfig, attach=attach, mergeable=False,
                    paper="Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021)"))
