"""Synthetic tasks with exact answers: deterministic, seeded generators of training data.

Each task is a string-rewriting rule with a short, checkable answer. The demo uses them to
show an adapter learning something the base model cannot guess zero-shot, and to measure
it on held-out inputs the training never saw.

    from adapterkit.tasks import make_splits
    train, heldout = make_splits("dates", n_train=1000, n_eval=100, seed=0)
    train[0]  # {"prompt": "Convert the date 1987-03-09.", "completion": "9 March 1987"}

Splits are disjoint by construction (one pool of distinct inputs, cut in two) and checked
again by :func:`assert_disjoint`.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from adapterkit.errors import ConfigError, did_you_mean

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")

# Plain, common two-syllable nouns: each is one or two tokens for most BPE vocabularies.
WORDS = tuple("""
apple river stone cloud tiger lemon candle forest window garden silver rocket pencil ocean
mountain violin butter castle dragon feather planet rabbit shadow thunder winter yellow basket
bridge cherry desert engine falcon guitar harbor island jacket kettle ladder marble needle
orange parrot ribbon saddle tomato umbrella valley wagon zebra anchor bottle carpet dinner
eagle fabric glacier hammer insect jungle kitten lantern magnet napkin orchid pepper puzzle
rainbow sandal teapot tunnel velvet walnut blanket cactus donkey emerald fountain gravel
helmet iceberg lizard meadow nickel oyster pillow turtle violet whistle copper mirror spider
pocket sugar
""".split())

Example = dict[str, str]


@dataclass(frozen=True)
class Task:
    """A rewriting rule.

    Attributes:
        name: registry key.
        description: one line for tables and logs.
        sample_input: draws one input string from ``rng``.
        prompt: the user message for an input (states the task, not the output format).
        answer: the exact expected completion for an input.
        input_space: how many distinct inputs exist (caps the split sizes).
    """

    name: str
    description: str
    sample_input: Callable[[random.Random], str]
    prompt: Callable[[str], str]
    answer: Callable[[str], str]
    input_space: int

    def example(self, inp: str) -> Example:
        return {"prompt": self.prompt(inp), "completion": self.answer(inp)}


# ---- dates: ISO date -> "day Monthname year" --------------------------------------------


def _sample_date(rng: random.Random) -> str:
    # days 1..28 exist in every month, so every sample is a valid date
    return f"{rng.randint(1950, 2049):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def date_answer(iso: str) -> str:
    """``"2023-07-04"`` -> ``"4 July 2023"`` (day without leading zero, full month name)."""
    y, m, d = iso.split("-")
    return f"{int(d)} {MONTHS[int(m) - 1]} {int(y)}"


# ---- reverse_words: "a b c" -> "c b a" --------------------------------------------------


def _sample_words(rng: random.Random) -> str:
    return " ".join(rng.sample(WORDS, rng.randint(3, 4)))


def reverse_answer(words: str) -> str:
    """``"apple river stone"`` -> ``"stone river apple"``."""
    return " ".join(reversed(words.split()))


# ---- digit_shift: add 3 to each digit mod 10 --------------------------------------------


def _sample_digits(rng: random.Random) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(4, 6)))


def digit_shift_answer(digits: str) -> str:
    """``"4721"`` -> ``"7054"``: each digit plus 3, mod 10 (a rule no one guesses)."""
    return "".join(str((int(c) + 3) % 10) for c in digits)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("dates", "ISO date -> 'day Month year'", _sample_date,
             lambda s: f"Convert the date {s}.", date_answer, 100 * 12 * 28),
        Task("reverse_words", "reverse the order of 3-4 words", _sample_words,
             lambda s: f"Reverse the order of the words: {s}", reverse_answer,
             len(WORDS) * (len(WORDS) - 1) * (len(WORDS) - 2)),
        Task("digit_shift", "add 3 to every digit (mod 10)", _sample_digits,
             lambda s: f"Encode {s}", digit_shift_answer, 10**4),
    )
}
DEFAULT_TASK = "dates"


def get_task(name: str) -> Task:
    """The task called ``name``; ConfigError naming the closest one if unknown."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {sorted(TASKS)}.{did_you_mean(name, TASKS)}")
    return TASKS[name]


def generate(task: str | Task, n: int, seed: int = 0) -> list[Example]:
    """``n`` examples with distinct inputs, the same for the same ``(task, n, seed)``.

    Raises:
        ConfigError: ``n`` is not a positive int or exceeds half the task's input space
            (sampling distinct inputs would crawl).
    """
    t = task if isinstance(task, Task) else get_task(task)
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if n > t.input_space // 2:
        raise ConfigError(f"task {t.name!r} has {t.input_space} distinct inputs; at most {t.input_space // 2} examples, got {n}")
    rng = random.Random(f"adapterkit.tasks/{t.name}/{seed}")  # str seeds hash deterministically
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        inp = t.sample_input(rng)
        if inp not in seen:
            seen.add(inp)
            out.append(t.example(inp))
    return out


def assert_disjoint(train: Sequence[Example], heldout: Sequence[Example]) -> None:
    """Raise AssertionError if any held-out prompt also occurs in the training split."""
    overlap = {e["prompt"] for e in train} & {e["prompt"] for e in heldout}
    if overlap:
        raise AssertionError(f"{len(overlap)} held-out prompts also occur in training, e.g. {sorted(overlap)[:3]}")


def make_splits(task: str | Task, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Disjoint (train, held-out) splits: one pool of distinct inputs, the first ``n_eval``
    held out, so the held-out set does not change when ``n_train`` does."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    pool = generate(task, n_train + n_eval, seed)
    heldout, train = pool[:n_eval], pool[n_eval:]
    assert_disjoint(train, heldout)
    return train, heldout


def exact_match(prediction: str, answer: str) -> bool:
    """The demo's metric: equal after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()
