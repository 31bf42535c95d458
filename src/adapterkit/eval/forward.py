"""Evaluate one model as it is, with the library's own forward (no serving engine).

For adapters the engine cannot serve (anything but LoRA: bottleneck / Series / Parallel,
prefix, prompt, IA3 ...) and for models it does not know. The requests, prompts and scoring
are exactly :func:`adapterkit.eval.evaluate`'s (the same ``_requests`` and ``_score``), only
computed with ``model(...)`` and HF ``generate`` on the model with its adapter attached:

* prompt scoring (multiple choice, perplexity): right-padded batches, ``log_softmax`` of the
  logits, the log-prob of every scored token;
* generation: left-padded batches, greedy ``generate`` to ``max_tokens`` or an end-of-turn /
  EOS token, decoded without special tokens and cut at the task's stop strings.

    res = evaluate_forward(model, tokenizer, ["commonsense_mc"], name="series", limit=100)
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterkit.errors import ConfigError
from adapterkit.eval.runner import BatchStats, EvalResults, _progress, _Req, _requests, _score
from adapterkit.eval.tasks import TaskSpec, load_task


@dataclass(frozen=True)
class _Logprob:
    logprob: float


@dataclass(frozen=True)
class _Done:
    """The one finished 'chunk' of a request, shaped like the engine's for ``_score``."""

    text: str = ""
    prompt_logprobs: list[Any] | None = None
    finish_reason: str = "stop"
    error: str | None = None
    finished: bool = True


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {getattr(tokenizer, "eos_token_id", None)}
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return sorted(i for i in ids if i is not None)


def _cut(text: str, stop: Sequence[str]) -> str:
    for s in stop:
        j = text.find(s)
        if j >= 0:
            text = text[:j]
    return text


@torch.no_grad()
def _score_batch(model: Any, reqs: Sequence[_Req], pad: int, device: Any) -> list[_Done]:
    """Log-prob of every token given the ones before it, for right-padded prompts."""
    width = max(len(r.ids) for r in reqs)
    ids = torch.tensor([r.ids + [pad] * (width - len(r.ids)) for r in reqs], device=device)  # (B, T)
    mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in reqs], device=device)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]  # (B, T, V)
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return [_Done(prompt_logprobs=[None] + [_Logprob(float(v)) for v in lp[i, :len(r.ids) - 1]])
            for i, r in enumerate(reqs)]


@torch.no_grad()
def _generate_batch(model: Any, tokenizer: Any, reqs: Sequence[_Req], pad: int, device: Any) -> list[_Done]:
    """Greedy continuations of left-padded prompts (all with the same max_tokens and stop)."""
    width = max(len(r.ids) for r in reqs)
    ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in reqs], device=device)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in reqs], device=device)
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=reqs[0].max_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=_stop_ids(model, tokenizer))
    texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return [_Done(text=_cut(t, reqs[0].stop)) for t in texts]


def evaluate_forward(model: Any, tokenizer: Any, tasks: Sequence[str | Path | TaskSpec], name: str = "model",
                     params: int = 0, limit: int | None = None, batch_size: int = 16,
                     progress: bool = False) -> EvalResults:
    """Score ``model`` (with whatever adapter is active on it) on ``tasks`` by its own forward.

    Args:
        model: an HF causal LM (``model(input_ids, attention_mask).logits``, ``generate``),
            adapters attached as the library attaches them.
        tokenizer: its tokenizer.
        tasks: built-in task names, spec/JSONL paths or TaskSpecs (as :func:`evaluate`).
        name: the row name in the results.
        params: the trainable-parameter count to report for the row.
        limit: most examples per task.
        batch_size: requests per forward / ``generate`` call.
        progress: a progress bar on stderr.
    Returns:
        :class:`EvalResults` with one row, ``name`` (``batching`` is empty: no engine steps).
    Raises:
        ConfigError: no tasks, duplicate task names, or a bad ``batch_size``.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    specs = [load_task(t, n=limit) for t in tasks]
    if not specs:
        raise ConfigError("tasks: give at least one task")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: names must be distinct, got {names}")
    reqs = _requests(specs, [name], tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    results: list[Any] = [None] * len(reqs)
    # similar lengths share a batch (less padding); generation groups need one max_tokens/stop
    order = sorted(range(len(reqs)), key=lambda i: (reqs[i].max_tokens, reqs[i].stop, len(reqs[i].ids)))
    was_training = model.training
    model.eval()
    bar = _progress(len(reqs), progress)
    t0 = time.perf_counter()
    try:
        k = 0
        while k < len(order):
            head = reqs[order[k]]
            group = [order[k]]
            while (len(group) < batch_size and k + len(group) < len(order)
                   and (reqs[order[k + len(group)]].max_tokens, reqs[order[k + len(group)]].stop) == (head.max_tokens, head.stop)):
                group.append(order[k + len(group)])
            batch = [reqs[i] for i in group]
            done = (_generate_batch(model, tokenizer, batch, pad, device) if head.max_tokens
                    else _score_batch(model, batch, pad, device))
            for i, d in zip(group, done):
                results[i] = [d]
            if bar is not None:
                bar.update(len(group))
            k += len(group)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    scores, preds, logliks = _score(specs, [name], reqs, results)
    return EvalResults(scores=scores, params={name: params}, predictions=preds, logliks=logliks, seconds=seconds,
                       batching=BatchStats(), tasks={s.name: {"kind": s.kind, "metric": s.metric} for s in specs},
                       model=type(model).__name__)
