"""Evaluate a base model and many adapters on tasks, in one pass on the serving engine.

    import adapterkit.eval as ev
    res = ev.evaluate(model, tokenizer, ["arithmetic", "sentiment"], {"a": "out/a", "b": "out/b"})
    print(ev.format_table(res))
    ev.write_report(res, "eval_out")  # results.json, results.png
    ev.evaluate_forward(model_with_any_adapter, tokenizer, ["sentiment"], name="series")  # no engine

See docs/eval.md.
"""
from adapterkit.eval.forward import evaluate_forward
from adapterkit.eval.metrics import exact_match, extract_number, mc_predict, numeric_match, perplexity
from adapterkit.eval.report import format_table, plot_scores, to_json, write_report
from adapterkit.eval.runner import BASE, BatchStats, EvalResults, evaluate
from adapterkit.eval.tasks import TaskSpec, builtin_task, load_task

__all__ = [
    "BASE", "BatchStats", "EvalResults", "TaskSpec", "builtin_task", "evaluate", "evaluate_forward", "exact_match", "extract_number",
    "format_table", "load_task", "mc_predict", "numeric_match", "perplexity", "plot_scores", "to_json",
    "write_report",
]
