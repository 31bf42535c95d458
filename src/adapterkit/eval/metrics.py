"""Evaluation metrics as pure functions of strings and log-probs (no model, no engine).

* :func:`exact_match`: equal after stripping surrounding whitespace.
* :func:`extract_number` / :func:`numeric_match`: the last number in a generation (``"... The
  answer is 1,234."`` -> 1234.0) against the reference's, as GSM8K-style scorers do.
* :func:`mc_predict`: multiple choice by log-likelihood: the choice whose continuation has the
  highest summed log-prob (``acc``) and the highest log-prob per character (``acc_norm``, as
  lm-eval normalises by the continuation's length so long options are not penalised).
* :func:`perplexity`: ``exp(total NLL / total tokens)`` over any number of scored spans.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def exact_match(prediction: str, answer: str) -> bool:
    """True when the two strings are equal after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()


def extract_number(text: str) -> float | None:
    """The last number in `text` (thousands commas dropped, a trailing period ignored), or None.

    Args:
        text: a generation such as ``"12 + 5 = 17. The answer is 17."``.

    Returns:
        The number as a float, or None when `text` has no digits.
    """
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def numeric_match(prediction: str, answer: str, tol: float = 1e-6) -> bool:
    """True when the last numbers of `prediction` and `answer` agree within `tol`.

    Raises:
        ValueError: `answer` holds no number (a broken reference, not a wrong prediction).
    """
    want = extract_number(answer)
    if want is None:
        raise ValueError(f"answer: no number in the reference answer {answer!r}")
    got = extract_number(prediction)
    return got is not None and abs(got - want) <= tol


def mc_predict(choice_logprobs: Sequence[float], choice_lengths: Sequence[int]) -> tuple[int, int]:
    """The predicted choice by summed log-prob and by log-prob per unit of length.

    Args:
        choice_logprobs: per choice, the sum of its continuation tokens' log-probs.
        choice_lengths: per choice, its length (characters of the continuation text; > 0).

    Returns:
        (index by sum, index by normalised score); ties go to the first choice.

    Raises:
        ValueError: the sequences are empty, differ in length, or a length is not positive.
    """
    if not choice_logprobs or len(choice_logprobs) != len(choice_lengths):
        raise ValueError(f"choices: need one length per log-prob, got {len(choice_logprobs)} and {len(choice_lengths)}")
    if any(n <= 0 for n in choice_lengths):
        raise ValueError(f"choice_lengths: must be positive, got {list(choice_lengths)}")
    by_sum = max(range(len(choice_logprobs)), key=lambda i: (choice_logprobs[i], -i))
    norm = [lp / n for lp, n in zip(choice_logprobs, choice_lengths)]
    by_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return by_sum, by_norm


def perplexity(token_logprobs: Sequence[Sequence[float]]) -> float:
    """Corpus perplexity: ``exp(-sum of all log-probs / number of tokens)``.

    Args:
        token_logprobs: per scored span, the log-probs of its tokens.

    Raises:
        ValueError: no tokens at all.
    """
    n = sum(len(s) for s in token_logprobs)
    if n == 0:
        raise ValueError("perplexity: no scored tokens")
    return math.exp(-sum(sum(s) for s in token_logprobs) / n)
