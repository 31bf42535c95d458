"""Synthetic tasks with exact answers: deterministic, seeded generators of training data.

Each task is a string-rewriting rule with a short, checkable answer. The demo uses them to
show an adapter learning something the base model cannot guess zero-shot, and to measure
it on held-out inputs the training never saw.

    from adapterkit.tasks import make_splits
    train, heldout = make_splits("dates", n_train=1000, n_eval=100, seed=0)
    train[0]  # {"prompt": "Convert the date 1987-03-09.", "completion": "9 March 1987"}

Splits are disjoint by construction (one pool of distinct inputs, cut in two) and checked
again by :func:`assert_disjoint`.

:data:`TASKS` holds the three easy rewriting rules (the demo and the methods benchmark use
exactly these); :data:`HARD_TASKS` holds harder ones meant for evaluation, where a base model
scores low and fine-tuning has room to differ (see ``adapterkit.eval``): ``arithmetic``
(2-4 step word problems, numeric answer, worked steps in the completion), ``commonsense_mc``
(multiple choice with distractors: the examples carry ``choices`` and the ``answer`` index) and
``sentiment`` (two-label classification with negations). :func:`get_task` finds both.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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

Example = dict[str, Any]  # prompt, completion (str); MC tasks add choices (list[str]), answer (int)


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
        choices: for multiple-choice tasks, the options for an input (the answer among them).
    """

    name: str
    description: str
    sample_input: Callable[[random.Random], str]
    prompt: Callable[[str], str]
    answer: Callable[[str], str]
    input_space: int
    choices: Callable[[str], list[str]] | None = None

    def example(self, inp: str) -> Example:
        ex: Example = {"prompt": self.prompt(inp), "completion": self.answer(inp)}
        if self.choices is not None:
            opts = self.choices(inp)
            ex["choices"] = opts
            ex["answer"] = opts.index(ex["completion"])
        return ex


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


# ---- harder tasks (evaluation): inputs are compact specs, the prompt renders them ----------
# An input is a "|"-separated spec string, so a Task stays three pure functions of one string
# and distinct specs mean distinct prompts (the splits stay disjoint by construction).

NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Kenji", "Ines", "Tariq",
         "Nora", "Diego", "Hana", "Felix", "Priya", "Jonas", "Amara", "Luca")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "coins", "books",
         "buttons", "beads")
# (op, phrase) -- the phrase reads "<name> <phrase> <k> ..." and is applied to the running total
_OPS = {
    "+": ("buys {k} more", "gets {k} more"),
    "-": ("gives away {k}", "loses {k}"),
    "*": ("ends up with {k} times as many",),
    "/": ("shares them equally among {k} friends and keeps one share",),
}


def _sample_arith(rng: random.Random) -> str:
    """``name|item|start|variant|op k op k ...``: 2-4 operations; every running total is a
    whole number in [0, 999] (subtraction stays positive, division only where exact)."""
    while True:
        start = total = rng.randint(5, 60)
        steps: list[str] = []
        for _ in range(rng.randint(2, 4)):
            op = rng.choice("++--*/")
            if op == "+":
                k = rng.randint(2, 40)
            elif op == "-":
                if total < 3:
                    continue
                k = rng.randint(1, total - 1)
            elif op == "*":
                k = rng.randint(2, 4)
            else:
                ks = [d for d in (2, 3, 4, 5) if total % d == 0]
                if not ks:
                    continue
                k = rng.choice(ks)
            total = _apply(total, op, k)
            steps.append(f"{op}{k}")
        if len(steps) >= 2 and total <= 999:
            return f"{rng.choice(NAMES)}|{rng.choice(ITEMS)}|{start}|{rng.randint(0, 9)}|" + " ".join(steps)


def _apply(total: int, op: str, k: int) -> int:
    return {"+": total + k, "-": total - k, "*": total * k, "/": total // k}[op]


def _arith_parts(spec: str) -> tuple[str, str, int, int, list[tuple[str, int]]]:
    name, item, start, variant, steps = spec.split("|")
    return name, item, int(start), int(variant), [(s[0], int(s[1:])) for s in steps.split()]


def arithmetic_prompt(spec: str) -> str:
    """The word problem for a spec, e.g. ``"Mia has 12 apples. She buys 5 more. ... How many
    apples does Mia have now?"`` (phrasing varies with the spec's variant digit)."""
    name, item, start, variant, steps = _arith_parts(spec)
    sents = [f"{name} has {start} {item}."]
    for j, (op, k) in enumerate(steps):
        phrases = _OPS[op]
        phrase = phrases[(variant + j) % len(phrases)].format(k=k)
        sents.append(f"{'Then' if j else 'First'} {name} {phrase}.")
    return " ".join(sents) + f" How many {item} does {name} have now?"


def arithmetic_answer(spec: str) -> str:
    """Worked steps, then ``"The answer is N."`` (score with a numeric match on the last number)."""
    _, _, total, _, steps = _arith_parts(spec)
    lines = []
    for op, k in steps:
        new = _apply(total, op, k)
        lines.append(f"{total} {op} {k} = {new}.")
        total = new
    return " ".join(lines) + f" The answer is {total}."


def arithmetic_value(spec: str) -> int:
    """The final number of a spec's problem."""
    _, _, total, _, steps = _arith_parts(spec)
    for op, k in steps:
        total = _apply(total, op, k)
    return total


# commonsense-style multiple choice: category membership and odd-one-out, with distractors
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "mango", "pear", "plum", "grape", "lemon"),
    "animal": ("tiger", "rabbit", "zebra", "donkey", "parrot", "lizard", "turtle", "falcon"),
    "tool": ("hammer", "wrench", "saw", "shovel", "pliers", "drill", "chisel", "rake"),
    "musical instrument": ("violin", "guitar", "flute", "trumpet", "drum", "piano", "harp", "cello"),
    "vehicle": ("truck", "bicycle", "tractor", "bus", "scooter", "van", "canoe", "tram"),
    "piece of clothing": ("jacket", "sock", "scarf", "glove", "shirt", "sweater", "coat", "skirt"),
    "body of water": ("river", "lake", "ocean", "pond", "stream", "sea", "lagoon", "bay"),
}
_CATS = tuple(CATEGORIES)


def _sample_mc(rng: random.Random) -> str:
    """``kind|category|answer|option,option,option,option`` (kind: ``is`` = which one is a
    <category>, ``odd`` = which one does not belong); options in presentation order."""
    cat = rng.choice(_CATS)
    others = [c for c in _CATS if c != cat]
    if rng.random() < 0.5:
        ans = rng.choice(CATEGORIES[cat])
        distract = [rng.choice(CATEGORIES[c]) for c in rng.sample(others, 3)]
        kind = "is"
    else:
        ans = rng.choice(CATEGORIES[rng.choice(others)])
        distract = rng.sample(CATEGORIES[cat], 3)
        kind = "odd"
    opts = distract + [ans]
    rng.shuffle(opts)
    return f"{kind}|{cat}|{ans}|{','.join(opts)}"


def mc_prompt(spec: str) -> str:
    kind, cat, _, opts = spec.split("|")
    article = "an" if cat[0] in "aeiou" else "a"
    q = f"Which of these is {article} {cat}?" if kind == "is" else "Which one does not belong with the others?"
    return f"{q} Options: {', '.join(opts.split(','))}."


def mc_choices(spec: str) -> list[str]:
    return spec.split("|")[3].split(",")


# sentiment classification with negation and contrast: the label follows the final clause
_POS = ("delicious", "friendly", "wonderful", "comfortable", "charming", "reliable", "fresh", "excellent")
_NEG = ("bland", "rude", "awful", "cramped", "dull", "broken", "stale", "terrible")
_SUBJ = ("food", "staff", "room", "movie", "service", "hotel", "phone", "concert", "book", "car")


def _sample_sentiment(rng: random.Random) -> str:
    """``subject|adjective|negated(0/1)|contrast adjective or -``."""
    adj = rng.choice(_POS + _NEG)
    contrast = rng.choice(_POS + _NEG + ("-",) * 8)
    return f"{rng.choice(_SUBJ)}|{adj}|{rng.randint(0, 1)}|{contrast}"


def sentiment_prompt(spec: str) -> str:
    subj, adj, neg, contrast = spec.split("|")
    text = f"The {subj} was {'not ' if neg == '1' else ''}{adj}"
    if contrast != "-":
        text += f", but in the end it was {contrast}"
    return f"Is this review positive or negative? Review: {text}."


def sentiment_answer(spec: str) -> str:
    """The final clause decides: the contrast adjective if any, else the (maybe negated) one."""
    _, adj, neg, contrast = spec.split("|")
    if contrast != "-":
        return "positive" if contrast in _POS else "negative"
    return "positive" if (adj in _POS) != (neg == "1") else "negative"


HARD_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arithmetic", "2-4 step word problems, numeric answer", _sample_arith, arithmetic_prompt,
             arithmetic_answer, 10**7),
        Task("commonsense_mc", "category / odd-one-out multiple choice (4 options)", _sample_mc, mc_prompt,
             lambda s: s.split("|")[2], 10**5, choices=mc_choices),
        Task("sentiment", "positive/negative review with negation and contrast", _sample_sentiment,
             sentiment_prompt, sentiment_answer, len(_SUBJ) * 16 * 2 * 17),
    )
}

ALL_TASKS: dict[str, Task] = {**TASKS, **HARD_TASKS}


def get_task(name: str) -> Task:
    """The task called ``name`` (easy or hard); ConfigError naming the closest one if unknown."""
    if name not in ALL_TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {sorted(ALL_TASKS)}.{did_you_mean(name, ALL_TASKS)}")
    return ALL_TASKS[name]


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
