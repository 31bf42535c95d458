"""Token sampling (greedy, temperature, top-k, top-p, per-request seeds) and stop handling
(EOS, stop token ids, stop strings, min_tokens) with incremental detokenization."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapterkit.serve.types import SamplingParams, TokenLogprob


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf (vectorised).

    logits (N, V) fp32; top_k (N,) int64 (0 = off); top_p (N,) fp32 in (0, 1].
    A token is kept if fewer than k tokens beat it and the mass of strictly better tokens
    is < p (so the best token is always kept). Ties at the threshold are all kept.
    """
    V = logits.shape[-1]
    srt, _ = logits.sort(dim=-1, descending=True)  # (N, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    kth = srt.gather(1, (k - 1).view(-1, 1))  # (N, 1) the k-th best value
    probs = srt.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each sorted position
    keep_sorted = before < top_p.view(-1, 1)
    # threshold value: the smallest sorted logit still kept by top-p
    n_keep = keep_sorted.sum(-1).clamp(min=1)
    pth = srt.gather(1, (n_keep - 1).view(-1, 1))
    thr = torch.maximum(kth, pth)
    return logits.masked_fill(logits < thr, float("-inf"))


def top_k_top_p_filter_ref(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Reference: one row at a time, walking tokens best first in float64."""
    out = logits.clone()
    for i in range(logits.shape[0]):
        row = logits[i].double()
        probs = row.softmax(-1).tolist()
        vals = row.tolist()
        order = sorted(range(len(vals)), key=lambda j: -vals[j])
        k = top_k[i] if top_k[i] > 0 else len(vals)
        kept, mass = [], 0.0
        for rank, j in enumerate(order):
            if rank < k and mass < top_p[i]:
                kept.append(vals[j])
            mass += probs[j]
        thr = min(kept)
        out[i, row < thr] = float("-inf")
    return out


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                  banned: Sequence[Sequence[int]]) -> list[int]:
    """One token per row. logits (N, V) fp32; banned[i]: token ids masked for row i (EOS and
    stop tokens while fewer than min_tokens are out)."""
    logits = logits.float()
    for i, b in enumerate(banned):
        if b:
            logits[i, list(b)] = float("-inf")
    out = logits.argmax(-1).tolist()  # greedy rows done; sampled rows overwritten below
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = logits[rows] / torch.tensor([params[i].temperature for i in rows]).view(-1, 1)
        if any(params[i].top_k > 0 or params[i].top_p < 1 for i in rows):
            # top_k beyond the vocabulary means "off"; clamped first so any int fits the int64 tensor
            sub = top_k_top_p_filter(sub, torch.tensor([min(params[i].top_k, sub.shape[-1]) for i in rows]),
                                     torch.tensor([params[i].top_p for i in rows], dtype=torch.float32))
        probs = sub.softmax(-1)
        for j, i in enumerate(rows):  # per-request generator: a loop over sampled rows only
            out[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
    return out


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in fp32 of raw logits (N, V): the distribution log-probs are reported from
    (before temperature, top-k/top-p and min_tokens masking)."""
    return logits.float().log_softmax(-1)


def token_logprobs(logprobs: torch.Tensor, targets: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """One `TokenLogprob` per row: the log-prob of ``targets[i]`` and the ``ks[i]`` most likely tokens.

    Args:
        logprobs: (N, V) fp32 log-probs (`raw_logprobs`).
        targets: the token whose log-prob each row reports.
        ks: alternatives wanted per row (0 = none); only the largest k is searched.

    Returns:
        N entries; ``top`` holds (token id, log-prob) pairs, best first.
    """
    if not targets:
        return []
    chosen = logprobs.gather(1, torch.tensor(list(targets), device=logprobs.device).view(-1, 1)).view(-1).tolist()
    kmax = max(ks)
    vals: list[list[float]] = [[] for _ in targets]
    idx: list[list[int]] = [[] for _ in targets]
    if kmax > 0:
        v, i = logprobs.topk(min(kmax, logprobs.shape[-1]), dim=-1)
        vals, idx = v.tolist(), i.tolist()
    return [TokenLogprob(int(t), c, tuple(zip(idx[r][:k], vals[r][:k])))
            for r, (t, c, k) in enumerate(zip(targets, chosen, ks))]


class OutputState:
    """Per-request output bookkeeping: tokens, stop checks, incremental text.

    `step(token)` returns (token_ids_delta, text_delta, finish_reason or None).
    Text is held back while it could be the start of a stop string or ends in an incomplete
    UTF-8 character ("\\ufffd"), so streamed text never has to be retracted.
    """

    def __init__(self, params: SamplingParams, tokenizer: Any | None, eos_ids: set[int], prompt_len: int,
                 max_len: int) -> None:
        self.params, self.tokenizer, self.eos_ids = params, tokenizer, eos_ids
        self.prompt_len, self.max_len = prompt_len, max_len
        self.token_ids: list[int] = []
        self.text = ""  # full decoded text of token_ids (up to a stop string)
        self.emitted_chars = 0
        self.emitted_tokens = 0
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    def banned(self) -> list[int]:
        if len(self.token_ids) >= self.params.min_tokens:
            return []
        return sorted((set() if self.params.ignore_eos else self.eos_ids) | set(self.params.stop_token_ids))

    def step(self, token: int) -> tuple[list[int], str, str | None]:
        p = self.params
        self.token_ids.append(token)
        n = len(self.token_ids)
        finish: str | None = None
        if n >= p.min_tokens and ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids):
            finish = "stop"
        elif n >= p.max_tokens or self.prompt_len + n >= self.max_len:
            finish = "length"
        if self.tokenizer is not None:
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            if p.stop and n >= p.min_tokens:
                # search only where a new match can start
                start = max(0, len(self.text) - self._holdback - 1)
                hits = [j for j in (full.find(s, start) for s in p.stop) if j >= 0]
                if hits:
                    full, finish = full[:min(hits)], "stop"
            self.text = full
        safe = len(self.text)
        if finish is None:
            safe = max(self.emitted_chars, safe - self._holdback)
            while safe > self.emitted_chars and self.text[safe - 1] == "\ufffd":
                safe -= 1
        delta_text = self.text[self.emitted_chars:safe]
        self.emitted_chars = safe
        delta_ids = self.token_ids[self.emitted_tokens:]
        self.emitted_tokens = n
        return delta_ids, delta_text, finish
