"""adapterkit.tasks: determinism, disjoint splits, and the answer rules on hand-checked cases."""
from __future__ import annotations

import random

import pytest

from adapterkit.errors import ConfigError
from adapterkit.tasks import (
    TASKS,
    assert_disjoint,
    date_answer,
    digit_shift_answer,
    exact_match,
    generate,
    get_task,
    make_splits,
    reverse_answer,
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


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generate_is_deterministic(name):
    a = generate(name, 50, seed=3)
    assert a == generate(name, 50, seed=3)
    assert a != generate(name, 50, seed=4)
    assert len({e["prompt"] for e in a}) == 50  # distinct inputs


@pytest.mark.parametrize("name", sorted(TASKS))
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


@pytest.mark.parametrize("name", sorted(TASKS))
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
