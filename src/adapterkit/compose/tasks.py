"""Multi-task data for routing experiments: task mixtures with task ids, and a task-id
function the :class:`~adapterkit.train.Trainer` can use.

    from adapterkit.compose.tasks import MultiTask
    mt = MultiTask(["dates", "reverse_words", "digit_shift"], n_train=320, n_eval=50)
    records, ids = mt.train_records(tokenizer)          # a shuffled mixture; ids[i] = task of records[i]
    fn = mt.task_id_fn(tokenizer)                       # input_ids (B, T) right-padded -> (B,) task ids
    with ak.compose.task_ids(model, fn):
        Trainer(model, records, ...).train()
    mt.accuracy(model, tokenizer, task=0)                # exact match on task 0's held-out split

Tasks come from :mod:`adapterkit.tasks` (synthetic exact-match rewriting rules).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..tasks import Example, get_task, make_splits


class MultiTask:
    """Disjoint train / held-out splits of several tasks; task ``i`` is ``tasks[i]``."""

    def __init__(self, tasks: Sequence[str], n_train: int, n_eval: int, seed: int = 0) -> None:
        if len(tasks) < 2 or len(set(tasks)) != len(tasks):
            raise ConfigError(f"MultiTask needs at least two distinct task names, got {list(tasks)}")
        self.tasks = tuple(tasks)
        self.splits = {t: make_splits(get_task(t), n_train, n_eval, seed) for t in self.tasks}
        self.seed = seed

    def train(self, task: int) -> list[Example]:
        return self.splits[self.tasks[task]][0]

    def heldout(self, task: int) -> list[Example]:
        return self.splits[self.tasks[task]][1]

    def train_records(self, tokenizer: Any, tasks: Sequence[int] | None = None) -> tuple[list[dict], list[int]]:
        """A seeded shuffle of the tasks' training examples as Trainer records, and their task ids."""
        from ..demo import training_records

        pairs = [(i, e) for i in (tasks if tasks is not None else range(len(self.tasks))) for e in self.train(i)]
        random.Random(self.seed).shuffle(pairs)
        return training_records([e for _, e in pairs], tokenizer), [i for i, _ in pairs]

    def task_id_fn(self, tokenizer: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """``input_ids`` (B, T) of RIGHT-padded rendered examples -> task ids (B,).

        Every task's prompt starts with its own instruction (``Convert the date``, ``Encode``,
        ...), so the first token after the chat template's common prefix names the task. This is
        the row's task label read back from its tokens (the Trainer passes tokens only); it is
        not a prediction. Checked on every training example of every task.
        """
        from ..demo import render_prompt

        seqs = [[tokenizer(render_prompt(tokenizer, e["prompt"]), add_special_tokens=False)["input_ids"]
                 for e in self.train(i)] for i in range(len(self.tasks))]
        flat = [s for per in seqs for s in per]
        pos = 0
        while all(len(s) > pos for s in flat) and len({s[pos] for s in flat}) == 1:
            pos += 1
        table: dict[int, int] = {}
        for i, per in enumerate(seqs):
            for s in per:
                if table.setdefault(s[pos], i) != i:
                    raise ConfigError(f"tasks {self.tasks[table[s[pos]]]!r} and {self.tasks[i]!r} start with the same "
                                      f"token after the common prefix: cannot tell them apart")
        lut = torch.full((max(table) + 1,), -1, dtype=torch.long)
        for tok, i in table.items():
            lut[tok] = i

        def fn(input_ids: torch.Tensor) -> torch.Tensor:
            tok = input_ids[:, pos].cpu()
            ids = lut[tok.clamp(max=lut.numel() - 1)]
            if bool((ids < 0).any()) or bool((tok >= lut.numel()).any()):
                raise ConfigError("task_id_fn: a row does not start like any known task (left-padded, or another task?)")
            return ids

        fn.position = pos  # type: ignore[attr-defined]
        return fn

    @torch.no_grad()
    def accuracy(self, model: nn.Module, tokenizer: Any, task: int, limit: int | None = None,
                 batch_size: int = 50, generate: bool = False) -> float:
        """Exact-match accuracy on task ``task``'s held-out split (the model as it is).

        Default: teacher-forced (:func:`forced_exact_match`, one forward per batch); with
        ``generate=True``: greedy generation, decoded and compared as strings (slower).
        """
        ex = self.heldout(task)[:limit]
        if generate:
            from ..demo import accuracy, answer_budget

            return accuracy(model, tokenizer, ex, answer_budget(tokenizer, ex), batch_size)[0]
        hits = forced_exact_match(model, tokenizer, ex, batch_size)
        return sum(hits) / len(hits)


@torch.no_grad()
def forced_exact_match(model: nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 50
                       ) -> list[bool]:
    """Per example: does greedy decoding reproduce the gold answer token for token, up to and
    including the first end-of-turn/EOS token of the answer?

    Greedy decoding emits the gold tokens exactly when, at every answer position, the argmax
    given the gold prefix is the gold token; so one teacher-forced forward per batch decides
    it (no sampling loop). The answer is tokenized as in training (chat template, loss on the
    answer); an answer the model would spell with other tokens counts as wrong.
    """
    from ..demo import training_records
    from ..train.data import IGNORE_INDEX, PadCollator, build_dataset, pad_token_id_for

    was_training = model.training
    model.eval()
    stops = {i for i in (tokenizer.eos_token_id, tokenizer.get_vocab().get("<|im_end|>")) if isinstance(i, int)}
    ds = build_dataset(training_records(examples, tokenizer), tokenizer)
    collate = PadCollator(pad_token_id_for(tokenizer))
    device = next(model.parameters()).device
    out: list[bool] = []
    try:
        for i in range(0, len(ds), batch_size):
            b = collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            pred = logits[:, :-1].argmax(-1).cpu()  # (B, T-1): the prediction of token t+1
            gold = b["labels"][:, 1:]
            for row in range(gold.shape[0]):
                pos = (gold[row] != IGNORE_INDEX).nonzero().squeeze(-1).tolist()
                end = next((k for k, p in enumerate(pos) if int(gold[row, p]) in stops), len(pos) - 1)
                pos = pos[:end + 1]  # the answer through its first stop token
                out.append(bool(pos) and bool((pred[row, pos] == gold[row, pos]).all()))
    finally:
        model.train(was_training)
    return out


__all__ = ["MultiTask", "forced_exact_match"]
