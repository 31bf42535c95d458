"""Finding target modules. Pure functions over ``model.named_modules()``."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from .errors import ConfigError, TargetNotFoundError, UnsupportedModuleError, closest

#: the child holding adapter pieces; modules inside it are never targets
CONTAINER = "adapterkit"


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of the base model (adapter pieces excluded), root first."""
    out = []
    for name, mod in model.named_modules():
        if name == CONTAINER or name.startswith(CONTAINER + ".") or f".{CONTAINER}." in f".{name}.":
            continue
        out.append((name, mod))
    return out


def match_suffix(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str] | str | None,
    *,
    accept: Callable[[str, nn.Module], bool],
    defaults: Sequence[Sequence[str] | str] = (),
    fallback: Callable[[nn.Module], list[str]] | None = None,
    what: str = "adapter",
) -> list[str]:
    """Module paths the adapter attaches to, in model order.

    ``targets``: suffixes (each must match at least one module), a regex (full match on
    the module path; must match at least one), or ``None``: the first entry of
    ``defaults`` that matches the model, else ``fallback(model)``.
    Every matched module must be ``accept``-ed, else UnsupportedModuleError names it.
    """
    mods = base_modules(model)
    names = [n for n, _ in mods if n]
    by_name = dict(mods)

    def check(picked: list[str]) -> list[str]:
        for n in picked:
            if not accept(n, by_name[n]):
                raise UnsupportedModuleError(
                    f"{what} cannot attach to module {n!r} of type {type(by_name[n]).__name__}"
                )
        return picked

    if targets is None:
        for cand in defaults:
            picked = _select(names, cand)
            if picked and (isinstance(cand, str) or all(any(match_suffix(n, t) for n in picked) for t in cand)):
                picked = [n for n in picked if accept(n, by_name[n])]
                if picked:
                    return picked
        if fallback is not None:
            picked = fallback(model)
            if picked:
                return check(picked)
        raise TargetNotFoundError(
            f"no default target modules for {what} on {type(model).__name__}; pass targets=[...] "
            f"(some module names: {', '.join(_leaf_names(names)[:12])})"
        )

    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"targets regex {targets!r} is invalid: {e}") from None
        picked = [n for n in names if rx.fullmatch(n)]
        if not picked:
            raise TargetNotFoundError(
                f"targets regex {targets!r} matches no module of {type(model).__name__}. "
                f"Closest module names: {', '.join(closest(targets, names))}"
            )
        return check(picked)

    for t in targets:
        if not any(match_suffix(n, t) for n in names):
            hint = closest(t, _leaf_names(names) + names)
            raise TargetNotFoundError(
                f"target {t!r} matches no module of {type(model).__name__}. "
                f"Closest module names: {', '.join(repr(h) for h in hint)}"
            )
    return check(_select(names, targets))


def _select(names: Iterable[str], cand: Sequence[str] | str) -> list[str]:
    if isinstance(cand, str):
        rx = re.compile(cand)
        return [n for n in names if rx.fullmatch(n)]
    return [n for n in names if any(match_suffix(n, t) for t in cand)]


def _leaf_names(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def linear_layers_except_head(model: nn.Module) -> list[str]:
    """Fallback target set: every Linear-like layer except the output head."""
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    out = []
    for n, m in base_modules(model):
        if n and m is not head and is_linear_like(m) and not n.endswith(("lm_head", "classifier", "score")):
            out.append(n)
    return out


def is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def weight_io(host: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or transformers Conv1D (which stores W as (in, out))."""
    if isinstance(host, nn.Linear):
        return host.out_features, host.in_features
    w = host.weight
    return w.shape[1], w.shape[0]


#: PEFT's default ``modules_to_save`` per task (by the transformers class-name suffix)
TASK_HEADS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ForSequenceClassification", ("classifier", "score")),
    ("ForTokenClassification", ("classifier", "score")),
    ("ForQuestionAnswering", ("qa_outputs",)),
)


def task_heads(model: nn.Module) -> tuple[str, ...]:
    """The head names PEFT saves by default for this model's task (``()`` for LMs)."""
    cls = type(model).__name__
    return next((heads for suffix, heads in TASK_HEADS if cls.endswith(suffix)), ())


def resolve_modules_to_save(model: nn.Module, names: Sequence[str] | None, targets: Iterable[str],
                            exact: bool = False) -> list[str]:
    """Module paths an adapter trains in full (``AdapterConfig.modules_to_save``).

    Args:
        model: the model the adapter attaches to.
        names: module-name suffixes, each matching at least one module; ``None`` for the
            task's default heads (:func:`task_heads`; those the model lacks are skipped).
        targets: the module paths the adapter's own pieces attach to.
        exact: ``names`` are full module paths (as read from a file), not suffixes.

    Returns:
        The matched module paths in model order (a module inside another one listed is dropped:
        the outer copy holds it).

    Raises:
        TargetNotFoundError: a name matches no module.
        ConfigError: a module to save is, or contains, one of ``targets``.
    """
    mods = [n for n, _ in base_modules(model) if n]
    if names is None:
        wanted = [t for t in task_heads(model) if any(match_suffix(n, t) for n in mods)]
    else:
        wanted = list(names)
        for t in wanted:
            if not any(n == t if exact else match_suffix(n, t) for n in mods):
                hint = closest(t, _leaf_names(mods) + mods)
                raise TargetNotFoundError(
                    f"modules_to_save entry {t!r} matches no module of {type(model).__name__}. "
                    f"Closest module names: {', '.join(repr(h) for h in hint)}"
                )
    picked = [n for n in mods if n in wanted] if exact else _select(mods, wanted) if wanted else []
    picked = [n for n in picked if not any(n.startswith(o + ".") for o in picked)]
    for n in picked:
        for t in targets:
            if t == n or t.startswith(n + "."):  # the copy would hold (and so bypass) the adapter there
                raise ConfigError(
                    f"module {n!r} is in modules_to_save and the adapter also targets {t!r}; a module is either "
                    f"trained in full or adapted, not both (drop it from targets or from modules_to_save)"
                )
    return picked
