"""The demo (`make demo`): teach the default model a rule it cannot guess, in minutes on a CPU.

    python -m adapterkit.demo               # train, evaluate, save, reload, print the table
    python -m adapterkit.demo --serve       # then serve the base model + the demo adapter

Steps, all with the public API:
  1. load the embedded SmolLM2-135M-Instruct (``ak.models.load_default``);
  2. generate a task's train / held-out splits (``adapterkit.tasks``, seeded, disjoint);
  3. greedy exact-match accuracy of the base model on the held-out split;
  4. ``ak.add_adapter`` a LoRA and train it with ``adapterkit.train.Trainer`` (loss on the
     answer tokens only; prompts rendered with the tokenizer's chat template);
  5. accuracy with the adapter; ``ak.save_adapter``;
  6. ``ak.load_adapter`` into a fresh copy of the base model, accuracy again;
  7. print a before/after table.

``run()`` takes an optional model/tokenizer so tests can drive it with a tiny random model.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

import adapterkit as ak
from adapterkit.errors import ConfigError
from adapterkit.tasks import DEFAULT_TASK, Example, exact_match, get_task, make_splits

ADAPTER_NAME = "demo"
DEFAULT_OUT = Path("out/demo")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The bar the default run must clear (the demo exits 1 otherwise).
MAX_BASE_ACC = 0.30
MIN_ADAPTER_ACC = 0.90


@dataclass
class DemoResult:
    """What :func:`run` measured (accuracies are fractions in [0, 1])."""

    task: str
    n_train: int
    n_heldout: int
    acc_base: float
    acc_adapter: float
    acc_reload: float
    reload_identical: bool  # the reloaded adapter gave exactly the same answers
    train_s: float
    steps: int
    final_loss: float | None
    trainable_params: int
    adapter_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str, str, str]] = field(default_factory=list)  # prompt, want, base, adapter

    def passed(self) -> bool:
        return (self.acc_base <= MAX_BASE_ACC and self.acc_adapter >= MIN_ADAPTER_ACC
                and self.acc_reload >= MIN_ADAPTER_ACC and self.reload_identical)

    def table(self) -> str:
        """The before/after table as aligned plain text."""
        head = ("task", "n held-out", "acc base", "acc adapter", "acc reloaded", "train time", "steps", "trainable params")
        row = (self.task, str(self.n_heldout), f"{self.acc_base:.1%}", f"{self.acc_adapter:.1%}",
               f"{self.acc_reload:.1%}", f"{self.train_s:.0f} s", str(self.steps), f"{self.trainable_params:,}")
        w = [max(len(h), len(r)) for h, r in zip(head, row)]
        line = lambda cells: "| " + " | ".join(c.ljust(n) for c, n in zip(cells, w)) + " |"  # noqa: E731
        return "\n".join([line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|", line(row)])


# ---- prompting and greedy evaluation ----------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model sees before its answer: the chat template with the generation
    prompt if the tokenizer has one (what a chat server sends), else ``prompt + "\\n"``."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def training_records(examples: Sequence[Example], tokenizer: Any) -> list[dict[str, Any]]:
    """Trainer records whose rendering matches :func:`render_prompt` at inference; the
    trainer puts the loss on the answer (and its end-of-turn/EOS token) only."""
    if has_chat_template(tokenizer):
        return [{"messages": [{"role": "user", "content": e["prompt"]},
                              {"role": "assistant", "content": e["completion"]}]} for e in examples]
    return [{"prompt": e["prompt"] + "\n", "completion": e["completion"]} for e in examples]


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    # decoder-only batched generation needs the prompts right-aligned
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


def _stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16,
                   batch_size: int = 50) -> list[str]:
    """Greedy completions (HF ``generate``, no sampling) of ``prompts``, decoded without
    special tokens; batches are left-padded."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        with _left_padding(tokenizer):
            for i in range(0, len(prompts), batch_size):
                texts = [render_prompt(tokenizer, p) for p in prompts[i:i + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=_stop_ids(model, tokenizer))
                out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # (B, new)
    finally:
        model.train(was_training)
    return out


def accuracy(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int = 16,
             batch_size: int = 50) -> tuple[float, list[str]]:
    """Exact-match accuracy (after stripping whitespace) of greedy answers, and the answers."""
    preds = greedy_answers(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, batch_size)
    hits = sum(exact_match(p, e["completion"]) for p, e in zip(preds, examples))
    return hits / len(examples), preds


def answer_budget(tokenizer: Any, examples: Sequence[Example]) -> int:
    """New tokens to generate: the longest expected answer + room for the stop token."""
    return max(len(tokenizer(e["completion"], add_special_tokens=False)["input_ids"]) for e in examples) + 4


# ---- the demo ---------------------------------------------------------------------------


def run(
    model: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    task: str = DEFAULT_TASK,
    steps: int = 40,
    batch_size: int = 8,
    lr: float = 2e-3,
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = LORA_TARGETS,
    n_train: int = 2000,
    n_eval: int = 100,
    seed: int = 0,
    out_dir: str | Path = DEFAULT_OUT,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo end to end; returns the measurements (see the module docstring).

    Args:
        model, tokenizer: the base model (not modified before step 4; a deep copy taken first
            is the 'fresh base' of the reload check); None: the embedded default model, and
            the reload goes into a second copy loaded from the cache.
        task: a name from :data:`adapterkit.tasks.TASKS`.
        steps, batch_size, lr: training length, examples per step, peak AdamW lr.
        r, alpha, targets: the LoRA's rank, scaling numerator and target module names.
        n_train, n_eval: sizes of the disjoint training / held-out splits.
        out_dir: the adapter is saved to ``out_dir/adapter``, trainer logs to ``out_dir/train``.
    """
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    get_task(task)  # unknown names fail before the model loads
    out = Path(out_dir)

    t = time.perf_counter()
    fresh_base: Callable[[], tuple[nn.Module, Any]]
    if model is None:
        model, tokenizer = ak.models.load_default()
        fresh_base = ak.models.load_default
        timings["load"] = time.perf_counter() - t
        log(f"loaded {ak.models.DEFAULT_MODEL_NAME} in {timings['load']:.1f} s")
    else:
        if tokenizer is None:
            raise ConfigError("run(model=...) needs the model's tokenizer too")
        pristine = copy.deepcopy(model)
        fresh_base = lambda: (copy.deepcopy(pristine), tokenizer)  # noqa: E731

    train, heldout = make_splits(task, n_train=n_train, n_eval=n_eval, seed=seed)
    budget = answer_budget(tokenizer, heldout)
    log(f"task {task!r} ({get_task(task).description}): {len(train)} train / {len(heldout)} held-out examples, "
        f"e.g. {heldout[0]['prompt']!r} -> {heldout[0]['completion']!r}")

    t = time.perf_counter()
    acc_base, preds_base = accuracy(model, tokenizer, heldout, budget)
    timings["eval_base"] = time.perf_counter() - t
    log(f"base model held-out accuracy: {acc_base:.1%} ({timings['eval_base']:.1f} s)")

    from adapterkit.train import TrainConfig, Trainer  # lazy: the trainer pulls in matplotlib

    ak.add_adapter(model, ADAPTER_NAME, ak.LoRAConfig(r=r, alpha=alpha, targets=list(targets)))
    n_params = ak.trainable_parameters(model, ADAPTER_NAME)
    cfg = TrainConfig(out_dir=out / "train", lr=lr, steps=steps, batch_size=batch_size,
                      warmup_steps=max(1, steps // 10), schedule="cosine", seed=seed,
                      log_every=max(1, steps // 10), progress=progress)
    log(f"training LoRA r={r} on {', '.join(targets)} ({n_params:,} params), {steps} steps x {batch_size} examples")
    t = time.perf_counter()
    result = Trainer(model, training_records(train, tokenizer), config=cfg, tokenizer=tokenizer).train()
    timings["train"] = time.perf_counter() - t
    log(f"trained in {timings['train']:.1f} s, final loss {result.final_loss:.4f}")

    t = time.perf_counter()
    acc_adapter, preds_adapter = accuracy(model, tokenizer, heldout, budget)
    timings["eval_adapter"] = time.perf_counter() - t
    log(f"with adapter held-out accuracy: {acc_adapter:.1%} ({timings['eval_adapter']:.1f} s)")

    adapter_dir = Path(ak.save_adapter(model, ADAPTER_NAME, out / "adapter"))
    t = time.perf_counter()
    del model  # the reload must not see the trained model's memory
    base2, tok2 = fresh_base()
    ak.load_adapter(base2, adapter_dir, name=ADAPTER_NAME)
    ak.set_adapter(base2, ADAPTER_NAME)
    acc_reload, preds_reload = accuracy(base2, tok2, heldout, budget)
    timings["reload_eval"] = time.perf_counter() - t
    log(f"saved to {adapter_dir}; reloaded into a fresh base: {acc_reload:.1%} ({timings['reload_eval']:.1f} s)")
    timings["total"] = time.perf_counter() - t_all

    return DemoResult(
        task=task, n_train=len(train), n_heldout=len(heldout), acc_base=acc_base, acc_adapter=acc_adapter,
        acc_reload=acc_reload, reload_identical=preds_reload == preds_adapter, train_s=timings["train"],
        steps=result.steps, final_loss=result.final_loss, trainable_params=n_params, adapter_dir=adapter_dir,
        timings=timings,
        samples=[(e["prompt"], e["completion"], b.strip(), a.strip())
                 for e, b, a in zip(heldout[:3], preds_base, preds_adapter)],
    )


def report(res: DemoResult) -> str:
    """The table plus a few held-out examples and the pass/fail verdict."""
    lines = ["", res.table(), ""]
    for prompt, want, base, adapted in res.samples:
        lines.append(f"  {prompt!r}\n      expected {want!r} | base {base[:40]!r} | adapter {adapted!r}")
    verdict = "PASS" if res.passed() else "FAIL"
    lines += ["", f"{verdict}: base <= {MAX_BASE_ACC:.0%}, adapter and reloaded >= {MIN_ADAPTER_ACC:.0%}, "
                  f"reloaded answers identical: {res.reload_identical}; total {res.timings.get('total', 0):.0f} s "
                  f"({', '.join(f'{k} {v:.0f} s' for k, v in res.timings.items() if k != 'total')})"]
    return "\n".join(lines)


def serve(adapter_dir: Path, port: int) -> int:
    """Start ``adapterkit serve`` on the default model with the demo adapter registered."""
    try:
        from adapterkit.serve.cli import add_serve_parser
    except ImportError as e:
        print(f"error: --serve needs adapterkit.serve, which cannot be imported here ({e}); "
              "install the serve extra: pip install 'adapterkit[serve]'", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="adapterkit")
    add_serve_parser(parser.add_subparsers())
    # fine-tuning on too: docs/fine-tuning.md's walk-through runs against this server
    args = parser.parse_args(["serve", "--model", "default", "--adapter", f"{ADAPTER_NAME}={adapter_dir}",
                              "--port", str(port), "--enable-fine-tuning",
                              "--state-dir", str(adapter_dir.parent / "serve-state")])
    print(f"serving {ak.models.DEFAULT_MODEL_NAME} + adapter {ADAPTER_NAME!r} on http://127.0.0.1:{port}/v1 "
          f"(use model={ADAPTER_NAME!r} in requests; fine-tuning jobs: docs/fine-tuning.md)")
    return int(args.fn(args))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapterkit.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=DEFAULT_TASK, help="task name (see adapterkit.tasks.TASKS)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output dir (adapter in OUT/adapter)")
    p.add_argument("--serve", action="store_true",
                   help="serve the demo adapter afterwards (trains it first if OUT/adapter does not exist)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.serve and (out / "adapter" / "adapter_config.json").is_file():
        return serve(out / "adapter", a.port)
    if a.serve:  # fail fast, before minutes of training, if serving is impossible anyway
        try:
            import adapterkit.serve.cli  # noqa: F401
        except ImportError as e:
            print(f"error: --serve needs adapterkit.serve, which cannot be imported here ({e})", file=sys.stderr)
            return 2
    res = run(task=a.task, steps=a.steps, batch_size=a.batch_size, lr=a.lr, r=a.rank, alpha=2.0 * a.rank,
              n_eval=a.n_eval, seed=a.seed, out_dir=out, progress=not a.no_progress)
    print(report(res))
    if a.serve:
        return serve(res.adapter_dir, a.port)
    return 0 if res.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
