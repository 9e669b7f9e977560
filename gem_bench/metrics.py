"""Metrics of the generation tasks: SQuAD EM/F1 (v1.1 and v2), GSM8k answer extraction, pass@k.

SQuAD follows the official evaluation scripts (v1.1 ``evaluate-v1.1.py`` and v2
``evaluate-v2.0.py``): answers are normalised (lower-case, punctuation and the articles
a/an/the removed, white space collapsed); EM and token F1 of a prediction are the maxima over
the gold answers. Scores are percentages (0-100), as the official scripts print them.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower, drop punctuation, drop articles, fix white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings. As in the v2 script, if either side is empty
    (an unanswerable question, or an answer made only of articles/punctuation) F1 is 1 when
    both are empty and 0 otherwise."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction against its gold answers, each the max over the golds.
    No gold answers (SQuAD v2 unanswerable): correct only for an empty prediction. Like the v2
    script, golds that normalise to nothing are dropped first."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    return (
        max(exact_match(prediction, g) for g in golds),
        max(token_f1(prediction, g) for g in golds),
    )


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``exact`` and ``f1`` over all questions (percent). When some questions have no gold answer
    (v2) also ``HasAns_*`` / ``NoAns_*`` with their counts ``*_total``, as the v2 script does."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if not predictions:
        return {}
    scores = np.array([squad_scores(p, r) for p, r in zip(predictions, references)], dtype=float)
    has_answer = np.array([any(normalize_answer(g) for g in r) for r in references])
    out = {"exact": 100 * scores[:, 0].mean(), "f1": 100 * scores[:, 1].mean(), "total": float(len(scores))}
    if not has_answer.all():
        for name, subset in (("HasAns", has_answer), ("NoAns", ~has_answer)):
            out[f"{name}_total"] = float(subset.sum())
            if subset.any():
                out[f"{name}_exact"] = 100 * scores[subset, 0].mean()
                out[f"{name}_f1"] = 100 * scores[subset, 1].mean()
    return {k: float(v) for k, v in out.items()}


# A number: optional minus, digits with optional thousands commas, optional decimals. A leading
# "$" is simply not part of the match.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").strip().rstrip(".")


def gsm8k_gold(answer: str) -> str:
    """The gold final answer: the text after ``####``, commas (and a stray ``$``) removed."""
    if "####" not in answer:
        raise ValueError(f"GSM8k answer without '####': {answer[-80:]!r}")
    return _clean_number(answer.split("####")[-1])


def gsm8k_prediction(generation: str) -> str | None:
    """The predicted final answer: the LAST number in the generation, commas stripped, a
    trailing ``.`` dropped, ``$`` ignored. None if the generation holds no number."""
    numbers = _NUMBER.findall(generation)
    return _clean_number(numbers[-1]) if numbers else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)`` for n samples of
    which c pass, in their numerically stable product form."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
