"""The model forward for serving: a Llama-family decoder run from the HF module's weights over a
paged KV cache, with batched multi-adapter LoRA (one slot index per token).

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (SmolLM2 is Llama). Others
whose layers look the same can be added to SUPPORTED. Mistral's sliding window is not applied
(exact up to `sliding_window` tokens). One step processes a flat list of tokens from many
sequences (prefill chunks and decode tokens mixed, "varlen"); linear layers run on the flat
(T, d) matrix, attention per sequence over its paged context.

    step = StepInput(...)                       # built by the scheduler
    logits = runner.forward(step, kv, lora)     # (num sampled rows, vocab)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapterkit.errors import UnsupportedModuleError
from adapterkit.ops.linear import linear, prepack
from adapterkit.ops.lora import LoraPlan, add_lora, make_plan
from adapterkit.serve.attention import build_meta, paged_attention
from adapterkit.serve.pool import UnifiedPool

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES


@dataclass
class StepInput:
    """One forward step over B sequences, T tokens in all (seq i owns a contiguous run).

    input_ids (T,), positions (T,), cache_rows (T,) pool rows where the new K/V go,
    q_lens (B,) new tokens per seq, ctx_pages (B, P) KV page ids of each seq's whole context
    (its block table, padded with 0), ctx_lens (B,), lora_slots (T,) slot per token (-1 = base),
    sample_rows (N,) rows of T whose logits are wanted. Sequences that decode (q_len 1) come
    first (the scheduler packs them so); they get their own attention call without padding.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cache_rows: torch.Tensor
    q_lens: torch.Tensor
    ctx_pages: torch.Tensor
    ctx_lens: torch.Tensor
    lora_slots: torch.Tensor
    sample_rows: torch.Tensor


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # (d,)
    w_qkv: torch.Tensor  # (nq + 2 nkv, d): q, k, v fused so one matmul
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor  # (d, nq)
    ln2: torch.Tensor  # (d,)
    w_gu: torch.Tensor  # (2 ff, d): gate, up fused
    w_down: torch.Tensor  # (d, ff)


class LoraWeightsLike:
    """What the runner reads from the adapter slots (implemented by `adapters.LoraSlots`)."""

    scale: torch.Tensor  # (S,) 1 for a loaded slot: B holds the adapter's scaling
    ranks: torch.Tensor  # (S,) true rank per slot
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> A (S,R,in), B (S,out,R)


class ModelRunner:
    """Holds the base weights (q/k/v and gate/up stacked; see `_matrix` for when they are the
    model's own storage) and runs `forward`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 prepack: bool = False):
        arch = type(model).__name__
        if arch not in SUPPORTED:
            raise UnsupportedModuleError(f"serving supports {', '.join(SUPPORTED)}; got {arch}")
        cfg = model.config
        self.config = cfg
        self.dtype, self.device = dtype, torch.device(device)
        self.prepack = prepack
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.eps = cfg.rms_norm_eps
        self.act = _act(cfg.hidden_act)
        self.scaling = self.head_dim**-0.5
        self.nq, self.nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.ff = cfg.intermediate_size
        base = model.model
        self.rotary = base.rotary_emb  # HF's own module: same rope (incl. scaling variants) as HF
        t = lambda w: w.detach().to(device=self.device, dtype=dtype)  # noqa: E731
        self.embed = t(base.embed_tokens.weight)  # (V, d)
        self.norm = t(base.norm.weight)
        self.lm_head = self._matrix([model.lm_head])  # (V, d)
        self.layers: list[LayerWeights] = []
        for layer in base.layers:
            at, mlp = layer.self_attn, layer.mlp
            if getattr(mlp.gate_proj, "bias", None) is not None or getattr(at.o_proj, "bias", None) is not None:
                raise UnsupportedModuleError("serving does not support biases on o_proj / MLP projections yet")
            bias = [getattr(at, n).bias for n in ("q_proj", "k_proj", "v_proj")]
            self.layers.append(LayerWeights(
                ln1=t(layer.input_layernorm.weight),
                w_qkv=self._matrix([at.q_proj, at.k_proj, at.v_proj]),
                b_qkv=t(torch.cat(bias)) if all(b is not None for b in bias) else None,
                w_o=self._matrix([at.o_proj]), ln2=t(layer.post_attention_layernorm.weight),
                w_gu=self._matrix([mlp.gate_proj, mlp.up_proj]), w_down=self._matrix([mlp.down_proj])))

    def _matrix(self, linears: list[nn.Module]) -> torch.Tensor:
        """The weight `ops.linear.linear` multiplies for these modules: their weights stacked on
        the output dim (one matmul computes them all).

        Where the model's weights already have the runner's dtype and device, the runner keeps
        no copy of its own: each module's weight becomes a view of its rows of the stacked
        tensor (same values, shared storage), so serving holds one copy of the base. Where they
        do not (e.g. an fp32 model served in bf16), the runner's converted copy is its own and
        is prepacked for oneDNN (`ops.linear.prepack`, faster and no larger); `prepack=True`
        prepacks in every case, at the cost of a second copy of those weights.
        """
        ws = [lin.weight for lin in linears]
        same = all(w.dtype == self.dtype and w.device == self.device for w in ws)
        conv = [w.detach().to(device=self.device, dtype=self.dtype) for w in ws]
        fused = conv[0] if len(conv) == 1 else torch.cat(conv)
        if same and len(ws) > 1:
            o = 0
            for w in ws:
                w.data = fused[o:o + w.shape[0]]
                o += w.shape[0]
        return prepack(fused, _ROWS_HINT) if self.prepack or not same else fused

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable module (same in every layer)."""
        d, nq, nkv, ff = self.hidden, self.nq, self.nkv, self.ff
        return {"q_proj": (d, nq), "k_proj": (d, nkv), "v_proj": (d, nkv), "o_proj": (nq, d),
                "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # same op order as HF LlamaRMSNorm: normalise in fp32, cast back, then scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    @torch.inference_mode()
    def forward(self, step: StepInput, pool: UnifiedPool, lora: LoraWeightsLike | None = None) -> torch.Tensor:
        """Run one step; writes the new K/V into `pool`; returns logits (N, V) for sample_rows."""
        dev = self.device
        ids = step.input_ids.to(dev)
        T = ids.shape[0]
        H, KVH, hd = self.num_heads, self.num_kv_heads, self.head_dim
        nq, nkv = self.nq, self.nkv
        plan = make_plan(step.lora_slots.to(dev), ranks=lora.ranks) if lora is not None else None
        if plan is not None and not plan.any:
            plan = None

        # rope for every token at its own position; HF's module takes (x, position_ids (1, T))
        cos, sin = self.rotary(torch.empty(1, dtype=self.dtype, device=dev), step.positions.to(dev).view(1, T))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (T, 1, hd)
        meta = build_meta(step.q_lens, step.ctx_lens, step.ctx_pages, step.cache_rows, pool.block_size, device=dev)

        x = self.embed[ids]  # (T, d)
        for li, lw in enumerate(self.layers):
            h = self._rms(x, lw.ln1)
            qkv = linear(h, lw.w_qkv)  # (T, nq + 2 nkv)
            if lw.b_qkv is not None:
                qkv += lw.b_qkv
            if plan is not None:
                o = 0
                for name, n in (("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)):
                    self._lora(qkv[:, o:o + n], h, lora, li, name, plan)
                    o += n
            qk = qkv[:, :nq + nkv].view(T, H + KVH, hd)
            qk = qk * cos + _rotate_half(qk) * sin  # q and k heads rotated together
            q, k = qk.split([H, KVH], dim=1)
            k_cache, v_cache = pool.layer_kv(li)  # (rows, KVH, hd)
            att = paged_attention(q, k, qkv[:, nq + nkv:].view(T, KVH, hd), k_cache, v_cache, meta,
                                  self.scaling).reshape(T, nq)
            a = linear(att, lw.w_o)  # (T, d)
            if plan is not None:
                self._lora(a, att, lora, li, "o_proj", plan)
            x = x + a

            h = self._rms(x, lw.ln2)
            gu = linear(h, lw.w_gu)  # (T, 2 ff)
            if plan is not None:
                self._lora(gu[:, :self.ff], h, lora, li, "gate_proj", plan)
                self._lora(gu[:, self.ff:], h, lora, li, "up_proj", plan)
            m = self.act(gu[:, :self.ff]) * gu[:, self.ff:]  # (T, ff)
            dn = linear(m, lw.w_down)
            if plan is not None:
                self._lora(dn, m, lora, li, "down_proj", plan)
            x = x + dn

        x = self._rms(x[step.sample_rows.to(dev)], self.norm)  # (N, d)
        return linear(x, self.lm_head).float()  # (N, V)

    @staticmethod
    def _lora(y: torch.Tensor, x: torch.Tensor, lora: LoraWeightsLike, layer: int, name: str,
              plan: LoraPlan) -> None:
        w = lora.weights.get((layer, name))
        if w is not None:
            add_lora(y, x, w[0], w[1], None, plan)  # B is pre-scaled (LoraSlots)


#: rows of x oneDNN's prepacked layout is tuned for (a decode batch; any count works)
_ROWS_HINT = 48

#: use the fused `ModelRunner` for plain Llama / Mistral / Qwen2 (see `make_runner`); a switch
#: so tests and benchmarks can compare the two paths
FUSED_FAST_PATH = True


def _fused_ok(model: nn.Module, max_model_len: int | None) -> bool:
    """The fused runner computes exactly what the model computes: a supported architecture, no
    adapter attached in Python (e.g. a PiSSA residual base with its adapter on top), and no
    sliding window that a sequence of `max_model_len` tokens could reach."""
    if type(model).__name__ not in SUPPORTED:
        return False
    st = model.__dict__.get("_adapterkit_state")
    if st is not None and st.adapters:
        return False
    windows = {getattr(m, "sliding_window", None) for m in model.modules() if hasattr(m, "layer_idx")}
    if type(model).__name__ == "MistralForCausalLM":  # Mistral's window lives in its config only
        windows.add(getattr(model.config, "sliding_window", None))
    windows.discard(None)
    return not windows or (max_model_len is not None and max_model_len <= min(windows))


def make_runner(model: nn.Module, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                max_model_len: int | None = None, prepack: bool = False) -> ModelRunner:
    """The runner the engine uses for `model` (one place decides, so new runners plug in here).

    Every decoder-only causal LM runs through `hf_runner.HFModelRunner` (the model's own
    modules); plain Llama / Mistral / Qwen2 without attached adapters, whose sliding window (if
    any) `max_model_len` cannot reach, take the fused `ModelRunner` (faster: see
    docs/serving.md; equal logits are tested in tests/serve/test_hf_runner.py).

    Args:
        model: a transformers causal LM.
        dtype, device: what the runner computes in.
        max_model_len: the longest sequence the engine admits (None: unknown).
        prepack: the fused runner prepacks every base matrix for oneDNN, also where that makes a
            second copy (`ModelRunner._matrix`).

    Raises:
        UnsupportedModuleError: no runner can serve this model (names the architecture).
    """
    if FUSED_FAST_PATH and _fused_ok(model, max_model_len):
        return ModelRunner(model, dtype=dtype, device=device, prepack=prepack)
    from adapterkit.serve.hf_runner import HFModelRunner

    return HFModelRunner(model, dtype=dtype, device=device)  # type: ignore[return-value]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _act(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]
