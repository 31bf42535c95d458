"""adapterkit.tasks: determinism, disjoint splits, and the answer rules on hand-checked cases."""
from __future__ import annotations

import random

import pytest

from adapterkit.errors import ConfigError
from adapterkit.tasks import (
    ALL_TASKS,
    HARD_TASKS,
    TASKS,
    arithmetic_answer,
    arithmetic_prompt,
    arithmetic_value,
    assert_disjoint,
    date_answer,
    digit_shift_answer,
    exact_match,
    generate,
    get_task,
    make_splits,
    reverse_answer,
    sentiment_answer,
)


@pytest.mark.parametrize(("iso", "want"), [
    ("2023-07-04", "4 July 2023"),
    ("1950-01-01", "1 January 1950"),
    ("2049-12-28", "28 December 2049"),
    ("1999-10-10", "10 October 1999"),
])
def test_date_answer(iso, want):
    assert date_answer(iso) == want


def test_reverse_answer():
    assert reverse_answer("apple river stone") == "stone river apple"
    assert reverse_answer("a b c d") == "d c b a"


def test_digit_shift_answer():
    assert digit_shift_answer("4721") == "7054"
    assert digit_shift_answer("0789") == "3012"


@pytest.mark.parametrize("name", sorted(ALL_TASKS))
def test_generate_is_deterministic(name):
    a = generate(name, 50, seed=3)
    assert a == generate(name, 50, seed=3)
    assert a != generate(name, 50, seed=4)
    assert len({e["prompt"] for e in a}) == 50  # distinct inputs


@pytest.mark.parametrize("name", sorted(TASKS))  # the hard tasks render a spec: checked below
def test_examples_follow_the_rule(name):
    t = get_task(name)
    rng = random.Random(0)
    for _ in range(20):
        inp = t.sample_input(rng)
        ex = t.example(inp)
        assert inp in ex["prompt"] and ex["completion"] == t.answer(inp)


def test_date_samples_are_valid_dates():
    import datetime

    for e in generate("dates", 200):
        iso = e["prompt"].removeprefix("Convert the date ").removesuffix(".")
        d = datetime.date.fromisoformat(iso)
        assert e["completion"] == f"{d.day} {d.strftime('%B')} {d.year}"  # independent reference


@pytest.mark.parametrize("name", sorted(ALL_TASKS))
def test_splits_disjoint_and_heldout_stable(name):
    train, held = make_splits(name, n_train=300, n_eval=40, seed=1)
    assert len(train) == 300 and len(held) == 40
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
    # the held-out set does not depend on how much training data is asked for
    _, held2 = make_splits(name, n_train=100, n_eval=40, seed=1)
    assert held == held2


def test_assert_disjoint_catches_overlap():
    ex = {"prompt": "p", "completion": "c"}
    with pytest.raises(AssertionError, match="held-out"):
        assert_disjoint([ex], [ex])


def test_bad_arguments():
    with pytest.raises(ConfigError, match="did you mean|Closest"):
        get_task("date")
    with pytest.raises(ConfigError, match="positive"):
        generate("dates", 0)
    with pytest.raises(ConfigError, match="at most"):
        generate("digit_shift", 9000)
    with pytest.raises(ConfigError, match="n_eval"):
        make_splits("dates", 10, -1)


def test_exact_match():
    assert exact_match(" 4 July 2023\n", "4 July 2023")
    assert not exact_match("4 july 2023", "4 July 2023")


# ---- the harder evaluation tasks ----------------------------------------------------------


def test_easy_registry_unchanged():
    # the demo and the methods benchmark pretrain on every easy task: the hard ones stay apart
    assert sorted(TASKS) == ["dates", "digit_shift", "reverse_words"]
    assert sorted(HARD_TASKS) == ["arithmetic", "commonsense_mc", "sentiment"]


def test_arithmetic_hand_checked():
    spec = "Mia|apples|12|1|+5 *3 -4 /2"
    assert arithmetic_prompt(spec) == ("Mia has 12 apples. First Mia gets 5 more. Then Mia ends up with 3 times as many. "
                                       "Then Mia loses 4. Then Mia shares them equally among 2 friends and keeps one "
                                       "share. How many apples does Mia have now?")
    assert arithmetic_answer(spec) == "12 + 5 = 17. 17 * 3 = 51. 51 - 4 = 47. 47 / 2 = 23. The answer is 23."
    assert arithmetic_value(spec) == 23  # 47 // 2: the sampler never draws an inexact division (below)


def test_arithmetic_samples_are_well_formed():
    import re

    for e in generate("arithmetic", 300, seed=2):
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", e["completion"])
        assert 2 <= len(steps) <= 4
        for a, op, b, c in steps:  # every step is exact, non-negative and < 1000
            a, b, c = int(a), int(b), int(c)
            want = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
            assert want == c and 0 <= c <= 999
        assert e["completion"].endswith(f"The answer is {steps[-1][3]}.")
        # the names and items vary
    names = {e["prompt"].split()[0] for e in generate("arithmetic", 300)}
    assert len(names) >= 10


def test_commonsense_mc_examples():
    t = get_task("commonsense_mc")
    for e in generate(t, 200, seed=5):
        assert len(e["choices"]) == 4 and len(set(e["choices"])) == 4
        assert e["choices"][e["answer"]] == e["completion"]
        assert all(c in e["prompt"] for c in e["choices"])
    ex = t.example("is|fruit|pear|tiger,pear,saw,bus")
    assert ex == {"prompt": "Which of these is a fruit? Options: tiger, pear, saw, bus.", "completion": "pear",
                  "choices": ["tiger", "pear", "saw", "bus"], "answer": 1}


def test_commonsense_mc_answer_is_unique():
    from adapterkit.tasks import CATEGORIES

    cat_of = {w: c for c, ws in CATEGORIES.items() for w in ws}
    for e in generate("commonsense_mc", 300, seed=1):
        cats = [cat_of[c] for c in e["choices"]]
        if e["prompt"].startswith("Which of these is"):
            want = e["prompt"].split(" is ", 1)[1].split("?")[0].split(" ", 1)[1]
            assert [c for c in cats if c == want] == [cat_of[e["completion"]]]
        else:  # odd one out: three share a category, the answer does not
            assert cats.count(cat_of[e["completion"]]) == 1 and len(set(cats)) == 2


@pytest.mark.parametrize(("spec", "want"), [
    ("food|delicious|0|-", "positive"),
    ("food|delicious|1|-", "negative"),
    ("staff|rude|1|-", "positive"),
    ("room|awful|0|charming", "positive"),
    ("room|wonderful|1|stale", "negative"),
])
def test_sentiment_answer(spec, want):
    assert sentiment_answer(spec) == want


def test_hard_splits_are_disjoint_and_balanced():
    for name in HARD_TASKS:
        train, held = make_splits(name, n_train=1000, n_eval=200, seed=0)
        assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
    labels = [e["completion"] for e in generate("sentiment", 1000)]
    assert 0.35 < labels.count("positive") / len(labels) < 0.65
    answers = [e["answer"] for e in generate("commonsense_mc", 1000)]
    assert all(answers.count(i) > 150 for i in range(4))  # the answer position is shuffled
