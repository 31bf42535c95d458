"""Training metrics: an append-only ``metrics.jsonl`` and a loss plot (PNG).

Each line of ``metrics.jsonl`` is one JSON object with a ``step``; train records carry
``loss, lr, grad_norm, tokens_per_s, ...`` and eval records carry ``eval_loss``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file (a torn last line from a crash is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


class MetricsWriter:
    """Appends records to ``metrics.jsonl``, one flushed line each (readable while training)."""

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        """Open ``path``; keep records up to ``keep_until_step`` (resume) or start empty (None)."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(path) if r["step"] <= keep_until_step] if keep_until_step is not None else []
        # rewrite atomically: on resume the records after the checkpoint will be produced again
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
        self._f = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class NullMetricsWriter:
    """The writer of the ranks other than 0 in a multi-process run: drops every record."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def plot_losses(metrics_path: Path, png_path: Path, title: str | None = None) -> Path:
    """Plot train ``loss`` and ``eval_loss`` against step into a PNG.

    Uses matplotlib's object API with the Agg canvas (no pyplot), so it never touches the
    caller's global backend or opens a window.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)
    return png_path
