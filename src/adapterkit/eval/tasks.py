"""Evaluation tasks: a JSONL file of examples plus a small spec (how to prompt, what to score).

Three kinds, one record shape each (extra keys are allowed and reach the template):

* ``generate``: ``{"prompt": str, "completion": str}``; greedy generation scored by
  ``metric`` ``"exact_match"`` or ``"numeric"`` (last number in the output).
* ``multiple_choice``: ``{"prompt": str, "choices": [str, ...], "answer": int}``; each choice is
  scored as a continuation of the prompt (log-likelihood; ``acc`` and ``acc_norm``).
* ``perplexity``: ``{"text": str}`` (the whole text is scored) or ``{"prompt", "completion"}``
  (only the completion is scored, given the prompt).

A spec file is JSON: ``{"name", "kind", "data": "examples.jsonl" (relative to the spec),
"metric", "template", "chat", "max_tokens", "stop"}`` (all but ``data`` optional). A bare
``.jsonl`` path works too (the kind follows from the first record's keys). A name from
:func:`adapterkit.tasks.get_task` gives that generated task's held-out split.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError, DataError
from adapterkit.tasks import ALL_TASKS, get_task, make_splits

KINDS = ("generate", "multiple_choice", "perplexity")
METRICS = {"generate": ("exact_match", "numeric"), "multiple_choice": ("acc",), "perplexity": ("perplexity",)}
# the built-in tasks' scoring: numeric answers for the word problems, choices for the MC one
_BUILTIN = {
    "arithmetic": {"metric": "numeric", "max_tokens": 96, "stop": ()},  # multi-line reasoning allowed
    "commonsense_mc": {"kind": "multiple_choice", "metric": "acc"},
}


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    Attributes:
        name: shown in tables and the results JSON.
        kind: ``generate``, ``multiple_choice`` or ``perplexity``.
        examples: the records (see the module doc).
        metric: ``exact_match``/``numeric`` (generate), ``acc`` (multiple_choice), ``perplexity``.
        template: ``str.format`` template over a record's fields giving the prompt text.
        chat: wrap the prompt in the tokenizer's chat template (when it has one), as the
            library's training and the demo do; perplexity ignores it.
        max_tokens: most generated tokens (generate).
        stop: stop strings (generate); the output is cut before them.
    """

    name: str
    kind: str
    examples: list[dict[str, Any]] = field(repr=False)
    metric: str = "exact_match"
    template: str = "{prompt}"
    chat: bool = True
    max_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: must be one of {list(KINDS)}, got {self.kind!r}")
        if self.metric not in METRICS[self.kind]:
            raise ConfigError(f"metric: a {self.kind} task takes one of {list(METRICS[self.kind])}, got {self.metric!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens: must be an int >= 1, got {self.max_tokens!r}")
        if not self.examples:
            raise DataError(f"task {self.name!r}: no examples")
        for i, rec in enumerate(self.examples):
            _check_record(rec, self.kind, f"task {self.name!r}, example {i}")

    def prompt(self, rec: dict[str, Any]) -> str:
        """The prompt text of one record (the template filled in)."""
        try:
            return self.template.format(**rec)
        except KeyError as e:
            raise DataError(f"template: the field {e.args[0]!r} is not in the record (has {sorted(rec)})") from None


def _check_record(rec: Any, kind: str, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: must be a JSON object, got {type(rec).__name__}")
    if kind == "generate":
        need = ("prompt", "completion")
    elif kind == "multiple_choice":
        need = ("prompt", "choices", "answer")
    else:
        need = ("text",) if "text" in rec else ("prompt", "completion")
    for k in need:
        if k not in rec:
            raise DataError(f"{where}: missing the key {k!r} (has {sorted(rec)})")
    for k in need:
        if k in ("prompt", "completion", "text") and not isinstance(rec[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(rec[k]).__name__}")
    if kind == "multiple_choice":
        ch = rec["choices"]
        if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch)):
            raise DataError(f"{where}: 'choices' must be a list of >= 2 non-empty strings, got {ch!r}")
        a = rec["answer"]
        if not (isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(ch)):
            raise DataError(f"{where}: 'answer' must be an index into 'choices' (0..{len(ch) - 1}), got {a!r}")


def builtin_task(name: str, n: int = 200, seed: int = 0) -> TaskSpec:
    """The held-out split of a generated task (:mod:`adapterkit.tasks`) as a TaskSpec.

    The examples are ``make_splits(name, n_train, n_eval=n, seed)[1]``, the first `n` of the
    task's pool, so an adapter trained on ``make_splits(name, n_train, n_eval >= n, seed)[0]``
    has never seen them.

    Raises:
        ConfigError: unknown task name (with the closest one) or a bad `n`.
    """
    task = get_task(name)
    _, held = make_splits(task, n_train=1, n_eval=n, seed=seed)
    opts: dict[str, Any] = {"kind": "generate", "metric": "exact_match", "max_tokens": 32}
    opts.update(_BUILTIN.get(name, {}))
    return TaskSpec(name=name, examples=held, **opts)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return out


def _infer_kind(rec: dict[str, Any]) -> str:
    if "choices" in rec:
        return "multiple_choice"
    if "text" in rec:
        return "perplexity"
    return "generate"


def load_task(source: str | Path | TaskSpec, n: int | None = None, seed: int = 0, **overrides: Any) -> TaskSpec:
    """A TaskSpec from a built-in task name, a spec ``.json`` or a ``.jsonl`` file.

    Args:
        source: a name (see :data:`adapterkit.tasks.ALL_TASKS`), a path, or a TaskSpec.
        n: most examples (the first `n`); built-in tasks default to 200.
        seed: the built-in tasks' generator seed.
        **overrides: TaskSpec fields replacing the spec's (e.g. ``metric="numeric"``).

    Raises:
        ConfigError: unknown name / field, bad kind or metric.
        DataError: unreadable file, bad JSON, a record missing a key.
    """
    if isinstance(source, TaskSpec):
        spec = source
    elif isinstance(source, str) and source in ALL_TASKS:
        spec = builtin_task(source, n or 200, seed)
    else:
        path = Path(source)
        if not path.is_file():
            if isinstance(source, str) and "/" not in source and "." not in source:
                get_task(source)  # raises ConfigError with the closest task name
            raise DataError(f"task: {source!s} is neither a built-in task nor a file")
        if path.suffix == ".json":
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg})") from None
            if not isinstance(cfg, dict) or "data" not in cfg:
                raise DataError(f"{path}: a task spec is a JSON object with a 'data' key (the JSONL file)")
            data = _read_jsonl(path.parent / cfg.pop("data"))
            cfg.setdefault("name", path.stem)
            cfg.setdefault("kind", _infer_kind(data[0]) if data else "generate")
            if "stop" in cfg:
                cfg["stop"] = tuple(cfg["stop"])
            known = set(TaskSpec.__dataclass_fields__) - {"examples"}
            bad = sorted(set(cfg) - known)
            if bad:
                raise ConfigError(f"{path}: unknown spec field(s) {bad}; known: {sorted(known)}")
            spec = TaskSpec(examples=data, **cfg)
        else:
            data = _read_jsonl(path)
            if not data:
                raise DataError(f"{path}: no examples")
            kind = overrides.get("kind", _infer_kind(data[0]))
            spec = TaskSpec(name=path.stem, kind=kind, examples=data,
                            metric=METRICS[kind][0] if kind in METRICS else "exact_match")
    if n is not None and len(spec.examples) > n:
        spec = replace(spec, examples=spec.examples[:n])
    if "kind" in overrides and "metric" not in overrides and overrides["kind"] in METRICS:
        overrides["metric"] = METRICS[overrides["kind"]][0]
    try:
        return replace(spec, **overrides) if overrides else spec
    except TypeError as e:  # an unknown field name
        known = sorted(set(TaskSpec.__dataclass_fields__) - {"examples"})
        raise ConfigError(f"task overrides: {e}; known fields: {known}") from None
