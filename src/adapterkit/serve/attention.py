"""Paged attention over the unified pool's KV pages, for one varlen step (plus a plain reference).

One step holds B sequences, T new tokens in all (sequence i owns a contiguous run of the flat
batch). Each new token's K/V is written into its pool row first, then every query attends over
its own sequence's context read through the sequence's block table: causal, optionally limited
to a sliding window (a key at position j is seen from position p when p - window < j <= p, the
rule of transformers' `sliding_window_overlay`), optionally with tanh logit soft-capping
(Gemma 2: `softcap * tanh(score / softcap)` before the softmax).

`build_meta` turns a step into the per-step tables every layer shares (built once per step):
the decode sequences (one query each, a leading run, as the scheduler packs them) and the
prefill chunks form two groups, each gathered with its own page table so decodes are never
padded to the longest prefill chunk.

    meta = build_meta(q_lens, ctx_lens, ctx_pages, cache_rows, block_size)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, scaling=hd ** -0.5)   # (T, H, hd)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttnGroup:
    """Sequences attended together: tokens [start, end) of the flat batch.

    pages (b * P,) page ids row-major; q_pos (b, Qm) absolute position of each query slot (0 for
    padding slots, so every row sees at least one key); seq_of / q_off (n,) sequence and slot
    of each token (None for a decode group: one token per sequence, no padding).
    """

    start: int
    end: int
    num_seqs: int
    ctx: int  # P * block_size keys per sequence (padded)
    q_max: int
    pages: torch.Tensor
    q_pos: torch.Tensor
    seq_of: torch.Tensor | None
    q_off: torch.Tensor | None
    masks: dict = field(default_factory=dict)  # sliding window (None: full) -> (b, 1, Qm, C) bool

    def mask(self, window: int | None) -> torch.Tensor:
        """True where a query may attend a key; cached per window (layers share it)."""
        m = self.masks.get(window)
        if m is None:
            k_pos = torch.arange(self.ctx, device=self.q_pos.device).view(1, 1, -1)
            qp = self.q_pos.unsqueeze(-1)  # (b, Qm, 1)
            m = k_pos <= qp
            if window is not None:
                m &= k_pos > qp - window
            m = self.masks[window] = m.unsqueeze(1)
        return m


@dataclass
class PagedMeta:
    """Everything one step's attention calls need, shared by all layers."""

    cache_rows: torch.Tensor  # (T,) pool row of each new token's K/V
    block_size: int
    groups: list[AttnGroup]


def build_meta(q_lens: torch.Tensor, ctx_lens: torch.Tensor, ctx_pages: torch.Tensor, cache_rows: torch.Tensor,
               block_size: int, device: torch.device | str = "cpu") -> PagedMeta:
    """Per-step attention tables.

    Args:
        q_lens: (B,) new tokens per sequence; decodes (1) form a leading run.
        ctx_lens: (B,) context length of each sequence including its new tokens.
        ctx_pages: (B, P) block table of each sequence (padded with any page id).
        cache_rows: (T,) pool row where each new token's K/V goes.
        block_size: tokens per page.
        device: where the tables live (the pool's device).

    Returns:
        A PagedMeta.
    """
    q_list = q_lens.tolist()
    nd = 0
    while nd < len(q_list) and q_list[nd] == 1:
        nd += 1
    groups, tok = [], 0
    for lo, hi in ((0, nd), (nd, len(q_list))):
        if hi == lo:
            continue
        ql, cl = q_lens[lo:hi], ctx_lens[lo:hi]
        n_tok, q_max = int(ql.sum()), int(ql.max())
        P = -(-int(cl.max()) // block_size)  # pages of the longest context in the group
        pages = ctx_pages[lo:hi, :P].reshape(-1)
        slot = torch.arange(q_max).view(1, q_max)
        q_pos = torch.where(slot < ql.view(-1, 1), (cl - ql).view(-1, 1) + slot, 0)  # (b, Qm)
        seq_of = q_off = None
        if q_max > 1:
            seq_of = torch.repeat_interleave(torch.arange(hi - lo), ql)
            q_off = (torch.arange(n_tok) - (torch.cumsum(ql, 0) - ql)[seq_of]).to(device)
            seq_of = seq_of.to(device)
        groups.append(AttnGroup(tok, tok + n_tok, hi - lo, P * block_size, q_max, pages.to(device), q_pos.to(device),
                                seq_of, q_off))
        tok += n_tok
    return PagedMeta(cache_rows.to(device), block_size, groups)


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, num_seqs: int, ctx: int, block_size: int) -> torch.Tensor:
    """One layer's K (or V) rows of `num_seqs` sequences, read through their page tables.

    cache (num_pages * block_size, KVH, hd), contiguous; pages (num_seqs * P,) row-major page
    ids; ctx = P * block_size. Returns (num_seqs, KVH, ctx, hd), a transposed view of the copy.

    The gather runs on a 2-D (num_pages, block_size * KVH * hd) view: on CPU, fp32
    `index_select` over the 4-D page view takes a per-element path ~100x slower than the row
    copy it does in 2-D (measured at SmolLM2's decode shapes; docs/benchmarks.md, "Roofline").
    """
    KVH, hd = cache.shape[1], cache.shape[2]
    rows = cache.view(-1, block_size * KVH * hd).index_select(0, pages)
    return rows.view(num_seqs, ctx, KVH, hd).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
            softcap: float | None) -> torch.Tensor:
    """q (b, H, Qm, hd), k/v (b, KVH, C, hd), mask (b, 1, Qm, C) -> (b, H, Qm, hd).

    On CPU, bf16/fp16 attention computes in fp32 and casts back: torch's CPU flash kernel is
    ~5x slower in bf16 than in fp32 at serving shapes (one query per sequence over a short
    context), and fp32 scores are the more accurate. The casts copy one step's context only.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return _attend(q.float(), k.float(), v.float(), mask, scaling, softcap).to(q.dtype)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: PagedMeta, scaling: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend every query over its paged context.

    Args:
        q: (T, H, hd) queries; k, v: (T, KVH, hd) this step's keys and values.
        k_cache, v_cache: (num_pages * block_size, KVH, hd) one layer's pool rows (written in place).
        meta: the step's tables (`build_meta`).
        scaling: score multiplier (usually hd ** -0.5).
        sliding_window: keys older than this many positions are not seen (None: full causal).
        softcap: tanh logit soft-capping value (None: off).

    Returns:
        (T, H, hd) attention output, same dtype as q.
    """
    rows = meta.cache_rows
    k_cache[rows] = k.to(k_cache.dtype)
    v_cache[rows] = v.to(v_cache.dtype)
    T, H, hd = q.shape
    outs = []
    for g in meta.groups:
        kc = gather_pages(k_cache, g.pages, g.num_seqs, g.ctx, meta.block_size).to(q.dtype)
        vc = gather_pages(v_cache, g.pages, g.num_seqs, g.ctx, meta.block_size).to(q.dtype)
        qg = q[g.start:g.end]
        if g.seq_of is None:  # decode: one query per sequence
            qp = qg.view(g.num_seqs, 1, H, hd)
        else:
            qp = qg.new_zeros(g.num_seqs, g.q_max, H, hd)
            qp[g.seq_of, g.q_off] = qg
        att = _attend(qp.transpose(1, 2), kc, vc, g.mask(sliding_window), scaling, softcap).transpose(1, 2)
        outs.append(att.reshape(-1, H, hd) if g.seq_of is None else att[g.seq_of, g.q_off])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def paged_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, q_lens: list[int], ctx_lens: list[int], tables: list[list[int]],
                        cache_rows: list[int], block_size: int, scaling: float, sliding_window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """The plain reference: one query at a time, keys read position by position through the block
    table, fp32 softmax. Same arguments as `paged_attention` but as Python lists."""
    for t, r in enumerate(cache_rows):
        k_cache[r], v_cache[r] = k[t].to(k_cache.dtype), v[t].to(v_cache.dtype)
    T, H, hd = q.shape
    rep = H // k_cache.shape[1]
    out = torch.zeros(T, H, hd, dtype=torch.float32)
    t = 0
    for ql, cl, table in zip(q_lens, ctx_lens, tables):
        for i in range(ql):
            p = cl - ql + i
            lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
            rows = [table[j // block_size] * block_size + j % block_size for j in range(lo, p + 1)]
            keys = k_cache[rows].float().repeat_interleave(rep, dim=1)  # (n, H, hd)
            vals = v_cache[rows].float().repeat_interleave(rep, dim=1)
            for h in range(H):
                s = keys[:, h] @ q[t, h].float() * scaling
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                w = torch.softmax(s, dim=0)
                out[t, h] = w @ vals[:, h]
            t += 1
    return out.to(q.dtype)
