"""Reports of an :class:`~adapterkit.eval.runner.EvalResults`: a JSON file, a text table, a PNG.

The JSON (``schema: "adapterkit.eval/1"``)::

    {"schema", "model", "seconds", "batching": {"steps", "mixed_steps", "max_models_per_step"},
     "tasks": {task: {"kind", "metric"}},
     "models": {name: {"params": int, "scores": {task: {metric: float, "n": int}}}},
     "predictions": {name: {task: [str]}}   # only with predictions=True}
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adapterkit.eval.runner import EvalResults

SCHEMA = "adapterkit.eval/1"


def to_json(res: EvalResults, predictions: bool = False) -> dict[str, Any]:
    """The results as a JSON-ready dict (see the module doc)."""
    out: dict[str, Any] = {
        "schema": SCHEMA, "model": res.model, "seconds": round(res.seconds, 3), "batching": asdict(res.batching),
        "tasks": res.tasks,
        "models": {m: {"params": res.params[m], "scores": res.scores[m]} for m in res.scores},
    }
    if predictions:
        out["predictions"] = res.predictions
    return out


def _headline(res: EvalResults, task: str, model: str) -> float:
    """The task's main number for one model (its metric; acc for multiple choice)."""
    return res.scores[model][task][res.tasks[task]["metric"]]


def format_table(res: EvalResults) -> str:
    """A Markdown table: one row per model (by trainable parameters), one column per task."""
    tasks = list(res.tasks)
    head = ["model", "params"] + [f"{t} ({res.tasks[t]['metric']})" for t in tasks]
    rows = []
    for m in sorted(res.scores, key=lambda m: (res.params[m], m)):
        cells = [m, f"{res.params[m]:,}"]
        for t in tasks:
            s = res.scores[m][t]
            if res.tasks[t]["kind"] == "multiple_choice":
                cells.append(f"{s['acc']:.3f} / norm {s['acc_norm']:.3f}")
            elif res.tasks[t]["kind"] == "perplexity":
                cells.append(f"{s['perplexity']:.3f}")
            else:
                cells.append(f"{s[res.tasks[t]['metric']]:.3f}")
        rows.append(cells)
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(n) for c, n in zip(r, w)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(r) for r in rows])


def plot_scores(res: EvalResults, path: str | Path) -> Path:
    """A bar chart PNG, one panel per task: each model's score, models ordered by trainable
    parameters (the x labels carry the count). Perplexity panels plot log10 perplexity."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = list(res.tasks)
    models = sorted(res.scores, key=lambda m: (res.params[m], m))
    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6.0, 0.45 * len(models) + 2), 3.2 * len(tasks)),
                             squeeze=False)
    labels = [f"{m}\n{_short(res.params[m])}" for m in models]
    for ax, t in zip(axes[:, 0], tasks):
        vals = [_headline(res, t, m) for m in models]
        ylabel = res.tasks[t]["metric"]
        if res.tasks[t]["kind"] == "perplexity":
            vals, ylabel = [math.log10(v) for v in vals], "log10 perplexity"
        bars = ax.bar(range(len(models)), vals,
                      color=["#888888" if res.params[m] == 0 else "#3b75af" for m in models])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(models)), labels, rotation=60 if len(models) > 8 else 0, fontsize=7)
        ax.set_title(t)
        ax.set_ylabel(ylabel)
        if res.tasks[t]["kind"] != "perplexity":
            ax.set_ylim(0, 1)
    axes[-1, 0].set_xlabel("model (trainable parameters)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # never a half-written PNG under the final name
    return path


def _short(n: int) -> str:
    if n == 0:
        return "0"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def write_report(res: EvalResults, out_dir: str | Path, predictions: bool = False) -> dict[str, Path]:
    """Write ``results.json`` and ``results.png`` into `out_dir` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "results.json"
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(to_json(res, predictions), indent=2) + "\n", encoding="utf-8")
    tmp.replace(js)
    return {"json": js, "png": plot_scores(res, out / "results.png")}
