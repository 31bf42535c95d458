"""Prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691).

``P = num_virtual_tokens`` trainable embeddings are prepended to the token embeddings of
every sequence of a causal language model::

    x = [prompt_embeddings ; embed(input_ids)]          # (B, P + L, hidden)

Parameters (one piece on the root model, host path ``""``):

* ``prompt_embeddings``: (P, hidden) -- state-dict key ``adapterkit.<name>.prompt_embeddings``,
  saved (native format) under the key ``prompt_embeddings``. PEFT's prompt-tuning file
  holds the same tensor under the same key ``prompt_embeddings`` (shape
  (num_virtual_tokens, token_dim), ``num_transformer_submodules=1`` for causal LMs), so
  PEFT interop is the identity mapping.

Call semantics (the root model's pre-hook rewrites the call's keyword arguments):

* first call (no cache, or an empty one): ``input_ids`` become ``inputs_embeds`` with the
  prompt in front; ``attention_mask`` gets P ones in front, ``labels`` P ``-100``,
  ``position_ids`` (if given) become ``[0..P-1, position_ids + P]`` so real tokens sit at
  positions ``P..`` exactly as in PEFT (which recomputes them as ``arange(P + L)``; the two
  agree unless the batch is left-padded, where ours honours the padding).
  ``logits_to_keep`` given as index tensor is shifted by P.
* the output's ``logits`` (ModelOutput, or the tuple of ``return_dict=False``) are cut to the
  user's tokens, (B, L, vocab): they align with ``input_ids``. PEFT keeps the P virtual
  positions (compare PEFT's ``logits[:, P:]``). The loss is PEFT's: computed over the
  extended labels, so the first real token *is* predicted from the prompt.
  ``hidden_states`` / ``attentions`` keep the virtual positions.
* later calls with a non-empty cache (``generate()`` decode steps, or a user passing back
  the ``cache`` (``past_key_values`` before transformers 5.24) this adapter produced): the cache already holds the virtual tokens;
  nothing is prepended, a 2-D ``attention_mask`` that does not cover them gets P ones in
  front and ``position_ids`` move by P.

Only one prompt/prefix-tuning adapter may run in a call, and mixed batches
(``ak.adapter_batch``) that give it to some rows only are refused (AdapterError): every row
of the call must use it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, UnsupportedModuleError
from ..registry import MethodSpec, register
from ..state import container_of, get_state
from .base import AdapterConfig, AdapterModule


@dataclass(frozen=True)
class PromptTuningConfig(AdapterConfig):
    """Prompt-tuning hyper-parameters.

    num_virtual_tokens: P, the number of trainable embeddings prepended to every sequence.
    init: "random" (N(0, s^2), s = std of the model's token embeddings, so virtual tokens
    start at the scale of real ones; PEFT's RANDOM uses N(0, 1)), "vocab" (embeddings of P
    random vocabulary tokens, PEFT's SAMPLE_VOCAB) or "text" (embeddings of
    ``init_token_ids``, repeated / cut to P tokens, PEFT's TEXT).
    init_token_ids: token ids of the init text (tokenise it yourself), for init="text".
    ``targets`` must stay None: the piece sits on the root model.
    """

    method = "prompt"
    num_virtual_tokens: int = 20
    init: Literal["random", "vocab", "text"] = "random"
    init_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.targets is not None:
            raise ConfigError(f"{name}.targets must be None: prompt tuning attaches to the root model, "
                              f"got {self.targets!r}")
        check_virtual_tokens(name, self.num_virtual_tokens)
        if self.init not in ("random", "vocab", "text"):
            raise ConfigError(f"{name}.init must be one of random, vocab, text; got {self.init!r}")
        ids = self.init_token_ids
        if ids is not None:
            if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise ConfigError(f"{name}.init_token_ids must be a non-empty list of token ids >= 0, got {ids!r}")
            object.__setattr__(self, "init_token_ids", tuple(ids))  # hashable, JSON-able via to_dict
        if self.init == "text" and ids is None:
            raise ConfigError(f"{name}.init='text' needs init_token_ids (the token ids of the init text)")
        if self.init != "text" and ids is not None:
            raise ConfigError(f"{name}.init_token_ids is only used with init='text', got init={self.init!r}")


def check_virtual_tokens(name: str, n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ConfigError(f"{name}.num_virtual_tokens must be a positive integer, got {n!r}")


# -- shared by prompt and prefix tuning ---------------------------------------------------------
class VirtualTokenPiece(AdapterModule):
    """A piece on the root model that rewrites the call's keyword arguments (prompt, prefix)."""

    has_pre = True
    has_post = False  # output rewriting, where needed, is done by the piece's own hook

    def __init__(self, model: nn.Module, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        # positional arguments of the model's forward, to turn args into kwargs
        self._arg_names = forward_arg_names(model)

    def hook_pre(
        self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], rows: torch.Tensor | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self._check_call(host, rows)
        kw = dict(kwargs)
        if args:
            if len(args) > len(self._arg_names):
                raise AdapterError(f"{type(host).__name__} got {len(args)} positional arguments; pass them by name")
            for n, v in zip(self._arg_names, args):
                if n in kw:
                    raise AdapterError(f"{type(host).__name__} got argument {n!r} twice")
                kw[n] = v
        return (), self.rewrite(host, kw)

    def rewrite(self, host: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _check_call(self, host: nn.Module, rows: torch.Tensor | None) -> None:
        state = get_state(host)
        c = container_of(host)
        here = [n for n, p, _ in state.running(c) if isinstance(p, VirtualTokenPiece)] if c is not None else []
        if len(here) > 1:
            raise AdapterError(
                f"adapters {here} are all prompt/prefix-tuning adapters; only one of them can be active in a call"
            )
        # a mixed batch that gives this adapter to every row is an ordinary call
        if rows is not None and rows.numel() != state.batch_size:
            raise AdapterError(
                f"{type(self).__name__.removesuffix('Piece').lower()}-tuning adapters cannot run on part of a mixed "
                f"batch (ak.adapter_batch): give every row of the call the same prompt/prefix adapter, or run them "
                f"in separate calls"
            )

    def extend_mask(self, mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
        """A 2-D ``attention_mask`` covering ``total`` keys: P ones in front if it lacks them."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise AdapterError(f"prompt/prefix tuning needs a 2-D attention_mask (batch, keys), got {shape}")
        p = self.num_virtual_tokens
        if mask.shape[1] == total:  # the caller already counted the virtual tokens
            return mask
        if mask.shape[1] + p != total:
            raise AdapterError(
                f"attention_mask has {mask.shape[1]} columns; with {p} virtual tokens this call needs "
                f"{total - p} (or {total} including them)"
            )
        return torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)


def forward_arg_names(model: nn.Module) -> list[str]:
    """Names of the model's forward parameters that can be passed positionally."""
    params = inspect.signature(model.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


# transformers >= 5.24 names the forward's KV-cache argument ``cache``; earlier releases (and
# callers still using the deprecated name, which transformers renames inside ``forward``) use
# ``past_key_values``. A pre-hook sees the call's kwargs before that renaming, so it reads both.
CACHE_ARGS = ("cache", "past_key_values")


def cache_arg(model: nn.Module) -> str | None:
    """The name of ``model.forward``'s KV-cache argument (``cache`` or ``past_key_values``), or None."""
    names = inspect.signature(model.forward).parameters
    return next((n for n in CACHE_ARGS if n in names), None)


def get_cache(kw: dict[str, Any]) -> Any:
    """The KV cache a call was given, under either argument name (None when there is none)."""
    given = [kw[n] for n in CACHE_ARGS if kw.get(n) is not None]
    if len(given) > 1:
        raise AdapterError("the call passes both cache and past_key_values; pass only cache")
    return given[0] if given else None


def past_length(cache: Any) -> int:
    """Number of positions already held by a KV cache (None, a Cache, or legacy tuples)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if len(cache) and len(cache[0]) else 0
    raise AdapterError(f"unsupported KV cache of type {type(cache).__name__}")


def check_causal_lm(model: nn.Module, what: str, needs: tuple[str, ...]) -> None:
    """Refuse models the method cannot drive (by the arguments their forward accepts)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModuleError(f"{what} supports decoder-only models; {type(model).__name__} is encoder-decoder")
    names = set(inspect.signature(model.forward).parameters)
    missing = [n for n in needs if n not in names]
    if missing:
        raise UnsupportedModuleError(
            f"{what} needs a model whose forward accepts {', '.join(needs)}; "
            f"{type(model).__name__}.forward has no {', '.join(missing)}"
        )


def batch_size_of(kw: dict[str, Any], host: nn.Module) -> tuple[int, int]:
    """(B, L) of the call from ``input_ids`` or ``inputs_embeds`` (exactly one must be given)."""
    ids, emb = kw.get("input_ids"), kw.get("inputs_embeds")
    if (ids is None) == (emb is None):
        raise AdapterError(f"{type(host).__name__} needs exactly one of input_ids or inputs_embeds")
    t = ids if ids is not None else emb
    if t.dim() < 2:
        raise AdapterError(f"input_ids / inputs_embeds must be batched (B, L, ...), got shape {tuple(t.shape)}")
    return int(t.shape[0]), int(t.shape[1])


# -- prompt tuning --------------------------------------------------------------------------------
class PromptPiece(VirtualTokenPiece):
    """Prompt tuning on a causal LM: ``prompt_embeddings`` (P, hidden)."""

    def __init__(self, model: nn.Module, cfg: PromptTuningConfig) -> None:
        super().__init__(model, cfg.num_virtual_tokens)
        emb = model.get_input_embeddings()
        w = emb.weight  # (vocab, hidden)
        p = cfg.num_virtual_tokens
        with torch.no_grad():
            if cfg.init == "random":
                init = torch.randn(p, w.shape[1], device=w.device, dtype=torch.float32) * w.float().std()
            else:
                if cfg.init == "vocab":
                    ids = torch.randint(0, w.shape[0], (p,), device=w.device)
                else:
                    ids_list = list(cfg.init_token_ids or ())
                    ids_list = (ids_list * -(-p // len(ids_list)))[:p]  # repeat, then cut to P (as PEFT)
                    ids = torch.tensor(ids_list, dtype=torch.long, device=w.device)
                init = emb(ids).detach()
        self.prompt_embeddings = nn.Parameter(init.to(w.dtype).clone())  # (P, hidden)
        #: (user's sequence length, labels given) for the call in flight: logits are cut to it
        self._keep: tuple[int, bool] | None = None
        self._handles: list[Any] = []

    def bind(self, host: nn.Module) -> None:
        super().bind(host)
        if not self._handles:
            # reset first (prepend) so that a call that raised never leaves a stale cut behind
            self._handles = [
                host.register_forward_pre_hook(self._reset, prepend=True),
                host.register_forward_hook(self._cut_logits),
            ]

    def on_delete(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _reset(self, host: nn.Module, args: Any) -> None:
        self._keep = None

    def _cut_logits(self, host: nn.Module, args: Any, output: Any) -> Any:
        todo, self._keep = self._keep, None
        if todo is None:
            return None
        keep, has_loss = todo

        def cut(logits: torch.Tensor) -> torch.Tensor:  # (B, n, vocab): the last n of P + L positions
            return logits[:, -keep:] if logits.dim() == 3 and logits.shape[1] > keep else logits

        if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
            output["logits"] = cut(output["logits"])
            return output
        i = 1 if has_loss else 0  # return_dict=False: (loss, logits, ...) or (logits, ...)
        if isinstance(output, tuple) and len(output) > i and isinstance(output[i], torch.Tensor):
            return (*output[:i], cut(output[i]), *output[i + 1:])
        raise AdapterError(
            f"prompt tuning cannot find the logits in the {type(output).__name__} {type(host).__name__} returned"
        )

    def rewrite(self, host: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        p = self.num_virtual_tokens
        b, n = batch_size_of(kw, host)
        past = past_length(get_cache(kw))
        if past > 0:  # decode step: the cache already holds the virtual tokens
            kw["attention_mask"] = self.extend_mask(kw.get("attention_mask"), past + n)
            if kw.get("position_ids") is not None:
                kw["position_ids"] = kw["position_ids"] + p
            return kw

        if kw.get("token_type_ids") is not None:
            raise AdapterError("prompt tuning does not support token_type_ids (the virtual tokens have none)")
        emb = kw.pop("inputs_embeds", None)
        ids = kw.pop("input_ids", None)
        if emb is None:
            emb = host.get_input_embeddings()(ids)  # (B, L, hidden)
        prompt = self.prompt_embeddings.to(emb.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, P, hidden)
        kw["inputs_embeds"] = torch.cat([prompt, emb], dim=1)  # (B, P + L, hidden)
        kw["input_ids"] = None
        kw["attention_mask"] = self.extend_mask(kw.get("attention_mask"), p + n)
        pos = kw.get("position_ids")
        if pos is not None:
            if pos.dim() != 2:
                raise AdapterError(f"prompt tuning needs 2-D position_ids (batch, L), got shape {tuple(pos.shape)}")
            front = torch.arange(p, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], p)
            kw["position_ids"] = torch.cat([front, pos + p], dim=1)  # (B|1, P + L)
        labels = kw.get("labels")
        if labels is not None:
            kw["labels"] = torch.cat([labels.new_full((labels.shape[0], p), -100), labels], dim=1)
        keep = kw.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):
            kw["logits_to_keep"] = keep + p  # indices into the user's sequence
        else:
            self._keep = (n, labels is not None)
        return kw


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, PromptTuningConfig)
    what = f"prompt-tuning adapter {name!r}"
    check_causal_lm(model, what, ("input_ids", "inputs_embeds", "attention_mask"))
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    w = getattr(emb, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise UnsupportedModuleError(
            f"{what} needs model.get_input_embeddings() to return an embedding with a 2-D weight")
    if cfg.init_token_ids is not None:
        bad = [i for i in cfg.init_token_ids if i >= w.shape[0]]
        if bad:
            raise ConfigError(f"PromptTuningConfig.init_token_ids has id {bad[0]} >= the vocabulary size {w.shape[0]}")
    return {"": PromptPiece(model, cfg)}


register(MethodSpec(name="prompt", config_cls=PromptTuningConfig, attach=attach, mergeable=False,
                    paper="The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021)"))
