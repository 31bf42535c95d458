"""Token sampling (presence/frequency/repetition penalties, greedy, temperature, top-k, top-p,
per-request seeds) and stop handling (EOS, stop token ids, stop strings, min_tokens) with
incremental detokenization."""
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


def _token_counts(ids: Sequence[Sequence[int]], V: int) -> torch.Tensor:
    """(N, V) float counts of each token id in each row's list."""
    n = max((len(r) for r in ids), default=0)
    counts = torch.zeros(len(ids), V + 1)
    if n:  # ragged rows padded with the extra column V, dropped below
        idx = torch.tensor([list(r) + [V] * (n - len(r)) for r in ids], dtype=torch.int64)
        counts.scatter_add_(1, idx, torch.ones(idx.shape))
    return counts[:, :V]


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """vLLM's penalties, in place on `logits` (N, V) fp32, in vLLM's order.

    For row i with p = params[i], over the token ids v:
      1. repetition (prompt and output): if v occurs in prompt_ids[i] or output_ids[i], then
         logit /= p.repetition_penalty where logit > 0, else logit *= p.repetition_penalty;
      2. frequency (output only): logit -= p.frequency_penalty * count of v in output_ids[i];
      3. presence (output only): logit -= p.presence_penalty if v occurs in output_ids[i].

    Args:
        logits: (N, V) fp32, modified in place (and returned).
        params: one per row; rows with no penalty set are left untouched.
        prompt_ids: each row's prompt token ids.
        output_ids: each row's generated token ids so far.

    Returns:
        `logits`.
    """
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    V = logits.shape[-1]
    sub = logits[rows]  # (R, V) copy
    out_counts = _token_counts([output_ids[i] for i in rows], V)
    seen_out = out_counts > 0
    rep = torch.tensor([params[i].repetition_penalty for i in rows]).view(-1, 1)
    seen = seen_out | (_token_counts([prompt_ids[i] for i in rows], V) > 0)
    scale = torch.where(sub > 0, 1.0 / rep, rep)
    sub = torch.where(seen, sub * scale, sub)
    sub -= torch.tensor([params[i].frequency_penalty for i in rows]).view(-1, 1) * out_counts
    sub -= torch.tensor([params[i].presence_penalty for i in rows]).view(-1, 1) * seen_out
    logits[rows] = sub
    return logits


def apply_penalties_ref(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                        output_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Reference for `apply_penalties`: one token at a time in float64, returns a new tensor."""
    out = logits.double().clone()
    for i, p in enumerate(params):
        for v in range(out.shape[1]):
            x = float(out[i, v])
            if v in prompt_ids[i] or v in output_ids[i]:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            c = list(output_ids[i]).count(v)
            x -= p.frequency_penalty * c
            x -= p.presence_penalty * (c > 0)
            out[i, v] = x
    return out.float()


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                  banned: Sequence[Sequence[int]],
                  histories: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> list[int]:
    """One token per row.

    Args:
        logits: (N, V) raw logits.
        params: one per row.
        generators: per-row generators for sampled rows (None: torch's default).
        banned: token ids masked for each row (EOS and stop tokens while fewer than min_tokens
            are out).
        histories: each row's (prompt ids, output ids so far); needed by rows with penalties.

    Returns:
        The N chosen token ids.

    Raises:
        ValueError: a row has penalties but no history was given.
    """
    logits = logits.float()
    penalized = any(p.penalized for p in params)
    if logits.is_inference() and (penalized or any(banned)):
        logits = logits.clone()  # the runner's output cannot be written outside inference mode
    for i, b in enumerate(banned):
        if b:
            logits[i, list(b)] = float("-inf")
    if penalized:
        if histories is None:
            raise ValueError("sample_tokens: penalties need each row's (prompt ids, output ids) in `histories`")
        apply_penalties(logits, params, [h[0] for h in histories], [h[1] for h in histories])
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


class Detokenizer:
    """Incremental decoding: each token decodes a small window, not the whole output.

    Two offsets into the tokens: text for tokens[:read] is final; tokens[prefix:read] (the last
    token that is not a skipped special one, and any after it) is the context the next window is
    decoded with (BPE byte pieces and SentencePiece's leading-space rule depend on neighbours). A step decodes tokens[prefix:] and tokens[prefix:read]; the
    difference is the new text. Text ending in an incomplete UTF-8 character ("\\ufffd") waits
    for more tokens, so the concatenation equals ``tokenizer.decode(all tokens)``. Where a
    window's text does not extend its context's (tokenizers that clean up spaces across token
    boundaries), or the tokenizer cleans up spaces at all, the whole output is decoded instead.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode(ids, skip_special_tokens=True)``).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0
        # cleaning spaces (" ." -> ".") joins text across any boundary: windows cannot see it
        self.full = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.special = set(getattr(tokenizer, "all_special_ids", ()))

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int, last: bool = False) -> str:
        """Append `token`; return the text so far (a trailing incomplete character left out,
        except after the `last` token or in whole-output mode, where it shows as "\\ufffd")."""
        self.ids.append(token)
        if self.full or last:
            return self.flush()
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if not now.startswith(before):
            self.full = True  # this tokenizer's windows disagree with its whole decode: stop using them
            return self.flush()
        if now.endswith("\ufffd"):
            return self.text  # a character split across tokens: wait for its other bytes
        self.text += now[len(before):]
        self.read = len(self.ids)
        # context = the last token that decodes to something: a skipped special token first
        # in the window would hand the leading-space rule to the next token
        self.prefix = self.read - 1
        while self.prefix > 0 and self.ids[self.prefix] in self.special:
            self.prefix -= 1
        return self.text

    def flush(self) -> str:
        """The whole decode of every token so far (an incomplete character as "\\ufffd")."""
        self.text = self._decode(self.ids)
        return self.text


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
        self._detok = Detokenizer(tokenizer) if tokenizer is not None else None

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
        if self._detok is not None:
            # a finished output is decoded whole once, so a trailing partial character shows
            full = self._detok.add(token, last=finish is not None)
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
