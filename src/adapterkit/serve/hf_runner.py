"""The generic serving forward: the model's OWN transformers modules over the paged KV cache.

Like vLLM's Transformers backend, nothing of the architecture is re-implemented: one step's
flat varlen batch (prefill chunks and decode tokens of many sequences) runs through the
model's forward as batch 1, sequence T, with per-token `position_ids`. Attention goes through
transformers' attention-function registry: the runner registers `adapterkit_paged`
(`serve.attention.paged_attention`), names it in the model's config for the duration of the
step only, and hands the step's tables to it through a context variable. With a name the mask
registry does not know, transformers skips building masks; our function builds its own
(causal, sliding window per layer, Gemma 2 soft-capping, each module's `scaling`).

Batched multi-adapter LoRA applies through forward hooks on the decoder layers' linear modules
(one slot index per token, `ops.lora.add_lora`), named in layer-relative form (the shortest
unique suffix of the path inside a layer: `q_proj`, `c_attn`, `attn.c_proj`, `fc1`) so the
adapter store's (layer, module) keys work for any architecture. Adapters attached in Python
(`adapterkit.add_adapter`, including PiSSA/OLoRA's rewritten base) are part of the model's
forward, so they serve exactly as they compute in Python.

Only the rows in `sample_rows` go through the LM head (transformers' `logits_to_keep`, which
also applies the head's own extras such as Gemma's final soft-capping).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterkit.errors import UnsupportedModuleError
from adapterkit.ops.linear import linear_bias
from adapterkit.ops.lora import LoraPlan, add_lora, make_plan
from adapterkit.serve.attention import PagedMeta, build_meta, paged_attention
from adapterkit.serve.pool import UnifiedPool
from adapterkit.serve.runner import LoraWeightsLike, StepInput

ATTN_NAME = "adapterkit_paged"


@dataclass
class _Step:
    meta: PagedMeta
    pool: UnifiedPool
    seen: set[int] | None = None  # layers whose attention ran (the construction probe only)


_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("adapterkit_paged_step", default=None)


def _paged_attention_fn(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                        sliding_window: int | None = None, softcap: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (1, H, T, hd), key/value (1, KVH, T, hd) ->
    ((1, T, H, hd), None). Writes K/V into the pool at `module.layer_idx`."""
    st = _STEP.get()
    if st is None:
        raise RuntimeError(f"attention {ATTN_NAME!r} ran outside an engine step (the model is being served; "
                           "do not call it from another thread while the engine runs a step)")
    layer = getattr(module, "layer_idx", None)
    pool = st.pool
    if not isinstance(layer, int) or not 0 <= layer < pool.num_layers:
        raise UnsupportedModuleError(f"{type(module).__name__}: attention module without a valid layer_idx "
                                     f"({layer!r}); cannot place its K/V in the paged cache")
    if query.shape[0] != 1 or key.shape[1] != pool.num_kv_heads or key.shape[-1] != pool.head_dim \
            or value.shape[-1] != pool.head_dim:
        raise UnsupportedModuleError(
            f"{type(module).__name__} layer {layer}: keys {tuple(key.shape)} / values {tuple(value.shape)} do not fit "
            f"the paged cache ({pool.num_kv_heads} kv heads x head_dim {pool.head_dim})")
    if st.seen is not None:
        st.seen.add(layer)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    k_cache, v_cache = pool.layer_kv(layer)
    out = paged_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache,
                          v_cache, st.meta, scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
                          sliding_window=sliding_window, softcap=softcap)
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _paged_attention_fn)


def _is_linear(mod: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, (nn.Linear, Conv1D))


def _in_out(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    return int(mod.weight.shape[0]), int(mod.weight.shape[1])  # GPT-2 Conv1D: weight (in, out)


def _short_names(paths: list[str]) -> dict[str, str]:
    """path -> its shortest dotted suffix that no other path ends with."""
    out = {}
    for p in paths:
        parts = p.split(".")
        for i in range(len(parts) - 1, -1, -1):
            s = ".".join(parts[i:])
            if not any(q != p and (q == s or q.endswith("." + s)) for q in paths):
                out[p] = s
                break
    return out


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList of the model's decoder layers (the first one with `num_layers` entries)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and ".adapterkit" not in f".{name}":
            return mod
    raise UnsupportedModuleError(f"{type(model).__name__}: found no list of {num_layers} decoder layers")


def _attached_root_pieces(model: nn.Module) -> list[str]:
    """Active adapterkit adapters that act on the root call (prompt/prefix tuning): they change the
    sequence the model sees, which the paged cache cannot follow."""
    st = model.__dict__.get("_adapterkit_state")
    if st is None:
        return []
    return [n for n in st.active_names() if n in st.adapters and "" in st.adapters[n].pieces]


def _dense_forward(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear_bias(x, mod.weight, mod.bias)


class HFModelRunner:
    """Runs the model's own transformers modules over the paged pool; same interface as
    `runner.ModelRunner`.

    The model is served in place: it is put in eval mode, and its parameters are cast to
    `dtype` / moved to `device` if they differ (no second copy of the weights).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        arch = type(model).__name__
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
            raise UnsupportedModuleError(f"serving needs a decoder-only causal LM; got {arch}")
        roots = _attached_root_pieces(model)
        if roots:
            raise UnsupportedModuleError(f"{arch}: the attached adapters {roots} act on the whole input (prompt/prefix "
                                         "tuning); the engine cannot serve them")
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.model, self.config = model, text
        self.dtype, self.device = dtype, torch.device(device)
        self.num_layers = int(text.num_hidden_layers)
        self.num_heads = int(text.num_attention_heads)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None) or self.num_heads)
        self.layers = decoder_layers(model, self.num_layers)
        attn = [m for m in self.layers[0].modules() if isinstance(getattr(m, "layer_idx", None), int)
                and isinstance(getattr(m, "head_dim", None), int)]
        self.head_dim = attn[0].head_dim if attn else (getattr(text, "head_dim", None)
                                                       or text.hidden_size // self.num_heads)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        for p in model.parameters():
            if p.dtype != dtype and p.is_floating_point() or p.device != self.device:
                p.data = p.data.to(device=self.device, dtype=dtype if p.is_floating_point() else p.dtype)
        model.eval()
        self._configs = {id(c): c for c in [cfg, text] + [m.config for m in model.modules()
                                                           if isinstance(getattr(m, "config", None), type(text))]}
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._lora: tuple[LoraWeightsLike, LoraPlan] | None = None
        self._shapes, self._handles = self._hook_linears()
        # plain nn.Linear modules run through ops.linear's oneDNN path during a step (fp32 CPU
        # matmuls ~1.5-2x faster than torch's default; same math). Modules whose forward is
        # already replaced on the instance (accelerate's hooks) are left alone.
        self._dense = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__]
        _register()
        self._probe(arch)

    # ------------------------------------------------------------------ construction
    def _hook_linears(self) -> tuple[dict[str, tuple[int, int]], list]:
        """Forward hooks on every decoder-layer linear; (in, out) per layer-relative name."""
        per_layer = []
        for layer in self.layers:
            per_layer.append({n: m for n, m in layer.named_modules()
                              if n and _is_linear(m) and "adapterkit" not in n.split(".")})
        short = _short_names(list(per_layer[0]))
        shapes = {short[p]: _in_out(m) for p, m in per_layer[0].items()}
        for i, mods in enumerate(per_layer[1:], 1):  # a LoRA slot needs one shape per name
            for p, m in mods.items():
                if p in short and _in_out(m) != shapes[short[p]]:
                    del shapes[short[p]]
        handles = []
        for i, mods in enumerate(per_layer):
            for p, m in mods.items():
                if p in short and short[p] in shapes:
                    handles.append(m.register_forward_hook(self._make_hook((i, short[p]))))
        return shapes, handles

    def _make_hook(self, key: tuple[int, str]):
        def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            st = self._lora
            if st is None or not isinstance(out, torch.Tensor):
                return None
            w = st[0].weights.get(key)
            if w is None:
                return None
            x = args[0]
            add_lora(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), w[0], w[1], None, st[1])
            return out
        return hook

    def _probe(self, arch: str) -> None:
        """One tiny step: every layer's attention must come through the registry (else the
        architecture computes attention its own way and cannot use the paged cache)."""
        pool = UnifiedPool(self.num_layers, self.num_kv_heads, self.head_dim, 4, 1, self.dtype, self.device)
        step = StepInput(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2]),
                         torch.tensor([[0]]), torch.tensor([2]), torch.tensor([-1, -1]), torch.tensor([1]))
        seen: set[int] = set()
        try:
            self._run(step, pool, None, seen)
        except UnsupportedModuleError:
            raise
        except Exception as e:  # noqa: BLE001 - anything the model's forward raises on our inputs
            raise UnsupportedModuleError(f"serving cannot drive {arch}: its forward failed on a paged step "
                                         f"({type(e).__name__}: {e})") from e
        if seen != set(range(self.num_layers)):
            raise UnsupportedModuleError(f"serving cannot drive {arch}: attention of layers "
                                         f"{sorted(set(range(self.num_layers)) - seen)} does not go through "
                                         "transformers' attention interface")

    def remove_hooks(self) -> None:
        """Detach the LoRA hooks from the model (the runner is unusable afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ interface
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable module, by layer-relative name."""
        return dict(self._shapes)

    @torch.inference_mode()
    def forward(self, step: StepInput, pool: UnifiedPool, lora: LoraWeightsLike | None = None) -> torch.Tensor:
        """Run one step; writes the new K/V into `pool`; returns logits (N, V) for sample_rows.

        Raises:
            UnsupportedModuleError: an adapter acting on the whole input was activated meanwhile.
        """
        roots = _attached_root_pieces(self.model)
        if roots:
            raise UnsupportedModuleError(f"the attached adapters {roots} act on the whole input; cannot serve them")
        plan = make_plan(step.lora_slots.to(self.device), ranks=lora.ranks) if lora is not None else None
        return self._run(step, pool, lora if plan is not None and plan.any else None, None, plan)

    def _run(self, step: StepInput, pool: UnifiedPool, lora: LoraWeightsLike | None, seen: set[int] | None,
             plan: LoraPlan | None = None) -> torch.Tensor:
        dev = self.device
        meta = build_meta(step.q_lens, step.ctx_lens, step.ctx_pages, step.cache_rows, pool.block_size, dev)
        ids = step.input_ids.to(dev).view(1, -1)
        pos = step.positions.to(dev).view(1, -1)
        rows = step.sample_rows.to(dev)
        token = _STEP.set(_Step(meta, pool, seen))
        self._lora = (lora, plan) if lora is not None and plan is not None else None
        saved = {k: c._attn_implementation_internal for k, c in self._configs.items()}
        was_training = self.model.training
        try:
            for c in self._configs.values():
                c._attn_implementation_internal = ATTN_NAME
            for m in self._dense:
                m.forward = functools.partial(_dense_forward, m)
            if was_training:  # e.g. a co-served training step left it so: serve without dropout
                self.model.eval()
            with torch.inference_mode():
                if self._keep:
                    out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=rows)
                    logits = out.logits[0]
                else:
                    logits = self.model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, rows]
        finally:
            for k, c in self._configs.items():
                c._attn_implementation_internal = saved[k]
            for m in self._dense:
                m.__dict__.pop("forward", None)
            if was_training:
                self.model.train()
            self._lora = None
            _STEP.reset(token)
        return logits.float()
