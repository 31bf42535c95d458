"""Evaluate a base model and many adapters on the serving engine, all in one pass.

Every (model, example) request goes to one :class:`adapterkit.serve.engine.Engine`, submitted
example by example with the models interleaved, so the continuous batcher puts rows of many
adapters into every forward step (heterogeneous batching) instead of one model at a time.
Generation tasks decode greedily; multiple-choice and perplexity tasks are prompt scoring
(``max_tokens=0`` with ``prompt_logprobs``), so they cost one prefill per choice.

    res = evaluate(model, tokenizer, ["arithmetic", "commonsense_mc"], {"math": "out/math"})
    res.scores["math"]["arithmetic"]  # {"numeric": 0.41, "n": 200}
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError
from adapterkit.eval import metrics
from adapterkit.eval.tasks import TaskSpec, load_task

BASE = "base"  # the name of the base model's row


@dataclass
class BatchStats:
    """What the forward steps held: how many mixed more than one model (adapter or base)."""

    steps: int = 0
    mixed_steps: int = 0
    max_models_per_step: int = 0


@dataclass
class EvalResults:
    """Scores per model and task, with what is needed to report them.

    Attributes:
        scores: ``{model: {task: {metric: value, "n": examples}}}``; ``model`` is ``"base"``
            or an adapter name.
        params: trainable parameters per model (0 for the base).
        predictions: ``{model: {task: [generated text per example]}}`` (generate tasks).
        logliks: ``{model: {task: [[summed log-prob per choice] per example]}}`` (multiple
            choice), ``[[summed log-prob, tokens] per example]`` (perplexity).
        seconds: wall time of the whole pass (engine built to last request done).
        batching: forward-step counts (see :class:`BatchStats`).
        tasks: task name -> kind and metric.
    """

    scores: dict[str, dict[str, dict[str, float]]]
    params: dict[str, int]
    predictions: dict[str, dict[str, list[str]]]
    logliks: dict[str, dict[str, list[list[float]]]]
    seconds: float
    batching: BatchStats
    tasks: dict[str, dict[str, str]] = field(default_factory=dict)
    model: str = ""


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's own special tokens (a leading BOS), no second
    BOS when the text already starts with it (a rendered chat template), no trailing EOS."""
    bos = getattr(tokenizer, "bos_token", None)
    ids = list(tokenizer(text, add_special_tokens=not (isinstance(bos, str) and bos and text.startswith(bos)))["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if ids and eos is not None and ids[-1] == eos and len(ids) > 1 and not text.endswith(str(tokenizer.eos_token)):
        ids.pop()
    return ids


def _cont_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _context(tokenizer: Any, spec: TaskSpec, rec: dict[str, Any]) -> list[int]:
    """The ids the model sees before its answer (as the library's training renders them)."""
    from adapterkit.demo import has_chat_template, render_prompt

    text = spec.prompt(rec)
    if spec.chat and has_chat_template(tokenizer):
        return _cont_ids(tokenizer, render_prompt(tokenizer, text))
    return _prompt_ids(tokenizer, text + "\n")


@dataclass
class _Req:
    """One engine request and where its result goes."""

    model: str
    task: int  # index into specs
    example: int
    ids: list[int]
    scored_from: int = 0  # prompt scoring: log-probs of ids[scored_from:] are summed
    choice: int = -1
    max_tokens: int = 0
    stop: tuple[str, ...] = ()


def _requests(specs: Sequence[TaskSpec], models: Sequence[str], tokenizer: Any) -> list[_Req]:
    """All requests, example-major with the models innermost (so each step mixes models)."""
    out: list[_Req] = []
    for ti, spec in enumerate(specs):
        for ei, rec in enumerate(spec.examples):
            base: list[_Req] = []
            if spec.kind == "generate":
                base.append(_Req("", ti, ei, _context(tokenizer, spec, rec), max_tokens=spec.max_tokens,
                                 stop=spec.stop))
            elif spec.kind == "multiple_choice":
                ctx = _context(tokenizer, spec, rec)
                for ci, choice in enumerate(rec["choices"]):
                    base.append(_Req("", ti, ei, ctx + _cont_ids(tokenizer, choice), len(ctx), ci))
            elif "text" in rec:
                base.append(_Req("", ti, ei, _prompt_ids(tokenizer, rec["text"]), 1))
            else:
                ctx = _prompt_ids(tokenizer, spec.prompt(rec))
                base.append(_Req("", ti, ei, ctx + _cont_ids(tokenizer, rec["completion"]), len(ctx)))
            for m in models:
                out += [_Req(m, r.task, r.example, r.ids, r.scored_from, r.choice, r.max_tokens, r.stop) for r in base]
    return out


def _read_adapters(adapters: Mapping[str, Any] | Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(name -> what to register: the path as given, or the in-memory adapter;
    name -> in-memory adapter with method/config/tensors, for its rank and parameter count)."""
    from adapterkit.formats import read_adapter

    if not isinstance(adapters, Mapping):
        adapters = {Path(a).name: a for a in adapters}
    sources, out = {}, {}
    for name, src in adapters.items():
        if name == BASE:
            raise ConfigError(f"adapters: the name {BASE!r} is reserved for the base model's row")
        sources[name] = src  # registered by path, so the engine's errors name the file
        out[name] = src if hasattr(src, "tensors") else read_adapter(src)
    return sources, out


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str | Path | TaskSpec],
             adapters: Mapping[str, Any] | Sequence[Any] = (), include_base: bool = True,
             engine_config: Any = None, limit: int | None = None, progress: bool = True,
             window: int = 2048) -> EvalResults:
    """Score the base model and every adapter on every task in one engine pass.

    Args:
        model: a Hugging Face causal LM the engine supports (Llama/Qwen/Mistral-style).
        tokenizer: its tokenizer.
        tasks: built-in task names, spec/JSONL paths, or TaskSpecs (see :mod:`adapterkit.eval.tasks`).
        adapters: ``{name: directory or in-memory adapter}``, or a list of directories (named
            by their folder name). LoRA adapters (native or PEFT files).
        include_base: also score the base model (row ``"base"``).
        engine_config: an :class:`adapterkit.serve.types.EngineConfig`; by default one slot per
            adapter (up to 32), the largest adapter rank, fp32.
        limit: most examples per task.
        progress: a progress bar on stderr.
        window: most requests in flight at once (the engine's queue is bounded).

    Returns:
        :class:`EvalResults`.

    Raises:
        ConfigError: no models to evaluate, a bad task (DataError: a bad task file).
        AdapterError: an adapter the engine refuses (IncompatibleBaseError: made for another
            base model; AdapterFileError: unreadable or NaN/Inf weights).
        RuntimeError: a request failed inside the engine.
    """
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams

    specs = [load_task(t, n=limit) for t in tasks]
    if not specs:
        raise ConfigError("tasks: give at least one task")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: names must be distinct, got {names}")
    sources, saved = _read_adapters(adapters)
    models = ([BASE] if include_base else []) + list(saved)
    if not models:
        raise ConfigError("adapters: nothing to evaluate (no adapters and include_base=False)")
    reqs = _requests(specs, models, tokenizer)
    if engine_config is None:
        rank = max([int(a.config.get("r", 8)) for a in saved.values()] or [8])
        longest = max(len(r.ids) + r.max_tokens for r in reqs)
        engine_config = EngineConfig(max_loras=max(1, min(len(saved), 32)), max_lora_rank=rank,
                                     max_model_len=max(256, longest + 1))
    t0 = time.perf_counter()
    engine = Engine(model, tokenizer, engine_config, start=True)
    batching = BatchStats()
    forward = engine.runner.forward

    def counted(step: Any, pool: Any, lora: Any = None) -> Any:
        k = len(set(step.lora_slots.tolist()))  # distinct slots (-1 = base): models in this step
        batching.steps += 1
        batching.mixed_steps += k > 1
        batching.max_models_per_step = max(batching.max_models_per_step, k)
        return forward(step, pool, lora)

    engine.runner.forward = counted  # an observer on this engine only; the math is unchanged
    bar = None
    try:
        for name, src in sources.items():
            engine.register_adapter(name, str(src) if isinstance(src, Path) else src)
        results: list[Any] = [None] * len(reqs)
        bar = _progress(len(reqs), progress)
        cv = threading.Condition()
        inflight = [0]
        limit_inflight = max(1, min(window, engine_config.max_queue))

        def sink_for(i: int):
            parts: list[Any] = []

            def sink(chunk: Any) -> None:
                parts.append(chunk)
                if chunk.finished:
                    if bar is not None:
                        bar.update(1)
                    with cv:
                        results[i] = parts
                        inflight[0] -= 1
                        cv.notify_all()

            return sink

        for i, r in enumerate(reqs):
            with cv:
                cv.wait_for(lambda: inflight[0] < limit_inflight)
                inflight[0] += 1
            if r.max_tokens:
                params = SamplingParams(max_tokens=r.max_tokens, temperature=0, stop=r.stop)
            else:
                params = SamplingParams(max_tokens=0, prompt_logprobs=0)
            engine.submit(GenerationRequest(prompt_token_ids=r.ids, adapter=None if r.model == BASE else r.model,
                                            params=params), sink_for(i))
        with cv:
            cv.wait_for(lambda: inflight[0] == 0)
        seconds = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        engine.shutdown()
    scores, preds, logliks = _score(specs, models, reqs, results)
    params = {BASE: 0, **{n: sum(t.numel() for t in a.tensors.values()) for n, a in saved.items()}}
    return EvalResults(scores=scores, params={m: params[m] for m in models}, predictions=preds, logliks=logliks,
                       seconds=seconds,
                       batching=batching, tasks={s.name: {"kind": s.kind, "metric": s.metric} for s in specs},
                       model=engine.model_name)


def _progress(total: int, on: bool) -> Any:
    if not on:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar then
        return None
    return tqdm(total=total, desc="eval", unit="req", file=sys.stderr)


def _score(specs: Sequence[TaskSpec], models: Sequence[str], reqs: Sequence[_Req],
           results: Sequence[Any]) -> tuple[dict, dict, dict]:
    """Turn the finished chunks into per-model, per-task scores."""
    gen: dict[tuple[str, int, int], str] = {}
    summed: dict[tuple[str, int, int], dict[int, tuple[float, int]]] = {}  # choice -> (sum lp, tokens)
    spans: dict[tuple[str, int], list[list[float]]] = {}
    for r, parts in zip(reqs, results):
        last = parts[-1]
        if last.finish_reason == "error" or last.finish_reason == "abort":
            raise RuntimeError(f"eval: a request for {r.model!r} on task {specs[r.task].name!r} "
                               f"(example {r.example}) failed: {last.error or last.finish_reason}")
        key = (r.model, r.task, r.example)
        if r.max_tokens:
            gen[key] = "".join(c.text for c in parts)
            continue
        lps = next(c.prompt_logprobs for c in parts if c.prompt_logprobs is not None)
        vals = [lp.logprob for lp in lps[r.scored_from:]]
        summed.setdefault(key, {})[r.choice] = (sum(vals), len(vals))
        if specs[r.task].kind == "perplexity":
            spans.setdefault((r.model, r.task), []).append(vals)
    scores: dict[str, dict[str, dict[str, float]]] = {m: {} for m in models}
    preds: dict[str, dict[str, list[str]]] = {m: {} for m in models}
    logliks: dict[str, dict[str, list[list[float]]]] = {m: {} for m in models}
    for ti, spec in enumerate(specs):
        n = len(spec.examples)
        for m in models:
            if spec.kind == "generate":
                texts = [gen[(m, ti, e)] for e in range(n)]
                fn = metrics.numeric_match if spec.metric == "numeric" else metrics.exact_match
                hits = sum(fn(t, rec["completion"]) for t, rec in zip(texts, spec.examples))
                scores[m][spec.name] = {spec.metric: hits / n, "n": n}
                preds[m][spec.name] = texts
            elif spec.kind == "multiple_choice":
                acc = acc_norm = 0
                lls = logliks[m][spec.name] = []
                for e, rec in enumerate(spec.examples):
                    got = summed[(m, ti, e)]
                    lls.append([got[c][0] for c in range(len(rec["choices"]))])
                    by_sum, by_norm = metrics.mc_predict(lls[-1], [len(c) for c in rec["choices"]])
                    acc += by_sum == rec["answer"]
                    acc_norm += by_norm == rec["answer"]
                scores[m][spec.name] = {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
            else:
                scores[m][spec.name] = {"perplexity": metrics.perplexity(spans[(m, ti)]), "n": n}
                logliks[m][spec.name] = [[summed[(m, ti, e)][-1][0], summed[(m, ti, e)][-1][1]] for e in range(n)]
    return scores, preds, logliks
