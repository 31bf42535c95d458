"""adapterkit.eval.metrics against hand-computed values."""
from __future__ import annotations

import math

import pytest

from adapterkit.eval import metrics as M


def test_exact_match():
    assert M.exact_match(" 4 July 2023\n", "4 July 2023")
    assert not M.exact_match("4 july 2023", "4 July 2023")
    assert not M.exact_match("", "x")


@pytest.mark.parametrize(("text", "want"), [
    ("12 + 5 = 17. The answer is 17.", 17.0),
    ("so 1,234 apples", 1234.0),
    ("-3 then 2.5", 2.5),
    ("owes -42.", -42.0),
    ("no digits here", None),
    ("", None),
])
def test_extract_number(text, want):
    assert M.extract_number(text) == want


def test_numeric_match():
    assert M.numeric_match("I think 6.", "21 * 3 = 63. 63 / 2... The answer is 6.")
    assert M.numeric_match("6.0", "6")
    assert not M.numeric_match("60", "6")
    assert not M.numeric_match("none", "6")
    with pytest.raises(ValueError, match="no number in the reference"):
        M.numeric_match("6", "six")


def test_mc_predict_sum_and_normalised():
    # sums: -3, -4, -10; lengths 1, 8, 2 -> per char: -3, -0.5, -5
    assert M.mc_predict([-3.0, -4.0, -10.0], [1, 8, 2]) == (0, 1)
    assert M.mc_predict([-1.0, -1.0], [2, 2]) == (0, 0)  # ties: the first
    with pytest.raises(ValueError, match="one length per"):
        M.mc_predict([-1.0], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        M.mc_predict([-1.0, -2.0], [1, 0])


def test_perplexity():
    # 3 tokens: log-probs ln(1/2), ln(1/4) | ln(1/8) -> mean NLL = ln 2 * (1 + 2 + 3) / 3 = 2 ln 2 -> 4
    spans = [[math.log(0.5), math.log(0.25)], [math.log(0.125)]]
    assert M.perplexity(spans) == pytest.approx(4.0)
    assert M.perplexity([[0.0, 0.0]]) == 1.0
    with pytest.raises(ValueError, match="no scored tokens"):
        M.perplexity([[], []])
