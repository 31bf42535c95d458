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
import torch.nn.functional as F
from torch import nn

from adapterkit.errors import UnsupportedModuleError
from adapterkit.ops.lora import LoraPlan, add_lora, make_plan
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


@dataclass
class _AttnGroup:
    """Sequences attended together in one step: tokens [start, end) of the flat batch."""

    start: int
    end: int
    pages: torch.Tensor  # (b * P,) page ids, row-major
    num_seqs: int
    ctx: int  # P * block_size (keys, padded)
    q_max: int
    mask: torch.Tensor  # (b, 1, Qm, C) True = attend
    seq_of: torch.Tensor | None  # (n,) sequence of each token (None: decode, one token each)
    q_off: torch.Tensor | None  # (n,) offset of each token in its sequence's chunk


class LoraWeightsLike:
    """What the runner reads from the adapter slots (implemented by `adapters.LoraSlots`)."""

    scale: torch.Tensor  # (S,) 1 for a loaded slot: B holds the adapter's scaling
    ranks: torch.Tensor  # (S,) true rank per slot
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> A (S,R,in), B (S,out,R)


class ModelRunner:
    """Holds the base weights (fused copies) and runs `forward`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        arch = type(model).__name__
        if arch not in SUPPORTED:
            raise UnsupportedModuleError(f"serving supports {', '.join(SUPPORTED)}; got {arch}")
        cfg = model.config
        self.config = cfg
        self.dtype, self.device = dtype, torch.device(device)
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
        self.lm_head = t(model.lm_head.weight)  # (V, d)
        self.layers: list[LayerWeights] = []
        for layer in base.layers:
            at, mlp = layer.self_attn, layer.mlp
            if getattr(mlp.gate_proj, "bias", None) is not None or getattr(at.o_proj, "bias", None) is not None:
                raise UnsupportedModuleError("serving does not support biases on o_proj / MLP projections yet")
            bias = [getattr(at, n).bias for n in ("q_proj", "k_proj", "v_proj")]
            self.layers.append(LayerWeights(
                ln1=t(layer.input_layernorm.weight),
                w_qkv=t(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])),
                b_qkv=t(torch.cat(bias)) if all(b is not None for b in bias) else None,
                w_o=t(at.o_proj.weight), ln2=t(layer.post_attention_layernorm.weight),
                w_gu=t(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), w_down=t(mlp.down_proj.weight)))

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

    def _groups(self, step: StepInput, bs: int) -> list[_AttnGroup]:
        """Split the step's sequences into a decode group (q_len 1, a leading run) and a prefill
        group, each with its own page table (trimmed to its longest context) and key mask, so
        decodes are not padded to the longest prefill chunk. bs: tokens per KV page."""
        dev = self.device
        q_lens, ctx_lens = step.q_lens, step.ctx_lens
        B = q_lens.shape[0]
        nd = 0
        for n in q_lens.tolist():
            if n != 1:
                break
            nd += 1
        groups = []
        tok = 0
        for lo, hi in ((0, nd), (nd, B)):
            if hi == lo:
                continue
            ql, cl = q_lens[lo:hi], ctx_lens[lo:hi]
            n_tok = int(ql.sum())
            P = -(-int(cl.max()) // bs)  # pages of the longest context in the group
            pages = step.ctx_pages[lo:hi, :P]
            C = P * bs
            q_max = int(ql.max())
            # query i of seq b sits at position ctx_len - q_len + i and sees keys j <= that position
            q_pos = (cl - ql).view(-1, 1) + torch.arange(q_max).view(1, q_max)  # (b, Qm)
            mask = (torch.arange(C).view(1, 1, C) <= q_pos.unsqueeze(-1)).unsqueeze(1)  # (b, 1, Qm, C)
            if q_max == 1:
                g = _AttnGroup(tok, tok + n_tok, pages.to(dev).reshape(-1), hi - lo, C, 1, mask.to(dev), None, None)
            else:
                seq_of = torch.repeat_interleave(torch.arange(hi - lo), ql)  # (n,)
                q_off = torch.arange(n_tok) - (torch.cumsum(ql, 0) - ql)[seq_of]
                g = _AttnGroup(tok, tok + n_tok, pages.to(dev).reshape(-1), hi - lo, C, q_max, mask.to(dev),
                               seq_of.to(dev), q_off.to(dev))
            groups.append(g)
            tok += n_tok
        return groups

    def _attend(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, g: _AttnGroup) -> torch.Tensor:
        """q (n, H, hd) of one group -> (n, nq). k_pages, v_pages: (num_pages, bs, KVH, hd)."""
        KVH, hd, H = self.num_kv_heads, self.head_dim, self.num_heads
        kc = k_pages.index_select(0, g.pages).view(g.num_seqs, g.ctx, KVH, hd).transpose(1, 2)  # (b, KVH, C, hd)
        vc = v_pages.index_select(0, g.pages).view(g.num_seqs, g.ctx, KVH, hd).transpose(1, 2)
        if g.seq_of is None:  # decode: one query per sequence, no padding
            qp = q.view(g.num_seqs, 1, H, hd)
        else:
            qp = q.new_zeros(g.num_seqs, g.q_max, H, hd)
            qp[g.seq_of, g.q_off] = q
        att = F.scaled_dot_product_attention(qp.transpose(1, 2), kc, vc, attn_mask=g.mask, scale=self.scaling,
                                             enable_gqa=True).transpose(1, 2)  # (b, Qm, H, hd)
        att = att.reshape(-1, H, hd) if g.seq_of is None else att[g.seq_of, g.q_off]
        return att.reshape(-1, self.nq)

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
        groups = self._groups(step, pool.block_size)
        cache_rows = step.cache_rows.to(dev)
        num_pages, bs = pool.num_pages, pool.block_size

        x = self.embed[ids]  # (T, d)
        for li, lw in enumerate(self.layers):
            h = self._rms(x, lw.ln1)
            qkv = h @ lw.w_qkv.T  # (T, nq + 2 nkv)
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
            k_cache[cache_rows] = k.to(k_cache.dtype)
            v_cache[cache_rows] = qkv[:, nq + nkv:].view(T, KVH, hd).to(v_cache.dtype)
            k_pages, v_pages = k_cache.view(num_pages, bs, KVH, hd), v_cache.view(num_pages, bs, KVH, hd)
            if len(groups) == 1:
                att = self._attend(q, k_pages, v_pages, groups[0])
            else:
                att = torch.cat([self._attend(q[g.start:g.end], k_pages, v_pages, g) for g in groups])  # (T, nq)
            a = att @ lw.w_o.T  # (T, d)
            if plan is not None:
                self._lora(a, att, lora, li, "o_proj", plan)
            x = x + a

            h = self._rms(x, lw.ln2)
            gu = h @ lw.w_gu.T  # (T, 2 ff)
            if plan is not None:
                self._lora(gu[:, :self.ff], h, lora, li, "gate_proj", plan)
                self._lora(gu[:, self.ff:], h, lora, li, "up_proj", plan)
            m = self.act(gu[:, :self.ff]) * gu[:, self.ff:]  # (T, ff)
            dn = m @ lw.w_down.T
            if plan is not None:
                self._lora(dn, m, lora, li, "down_proj", plan)
            x = x + dn

        x = self._rms(x[step.sample_rows.to(dev)], self.norm)  # (N, d)
        return (x @ self.lm_head.T).float()  # (N, V)

    @staticmethod
    def _lora(y: torch.Tensor, x: torch.Tensor, lora: LoraWeightsLike, layer: int, name: str,
              plan: LoraPlan) -> None:
        w = lora.weights.get((layer, name))
        if w is not None:
            add_lora(y, x, w[0], w[1], None, plan)  # B is pre-scaled (LoraSlots)


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
                max_model_len: int | None = None) -> ModelRunner:
    """The runner the engine uses for `model` (one place decides, so new runners plug in here).

    Every decoder-only causal LM runs through `hf_runner.HFModelRunner` (the model's own
    modules); plain Llama / Mistral / Qwen2 without attached adapters, whose sliding window (if
    any) `max_model_len` cannot reach, take the fused `ModelRunner` (faster: see
    docs/serving.md; equal logits are tested in tests/serve/test_hf_runner.py).

    Args:
        model: a transformers causal LM.
        dtype, device: what the runner computes in.
        max_model_len: the longest sequence the engine admits (None: unknown).

    Raises:
        UnsupportedModuleError: no runner can serve this model (names the architecture).
    """
    if FUSED_FAST_PATH and _fused_ok(model, max_model_len):
        return ModelRunner(model, dtype=dtype, device=device)
    from adapterkit.serve.hf_runner import HFModelRunner

    return HFModelRunner(model, dtype=dtype, device=device)  # type: ignore[return-value]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _act(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]
