"""Classification metrics: accuracy, and SuperGLUE's MultiRC F1a and exact match.

MultiRC has one row per (paragraph, question, answer option), label 1 when the option is
correct. F1a is the binary F1 over all answer options with class 1 positive; EM is the share of
questions whose options are all predicted right (SuperGLUE's definitions).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence


def _check_lengths(**columns: Sequence) -> int:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"metric inputs differ in length: {lengths}")
    return next(iter(lengths.values()))


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    n = _check_lengths(labels=labels, predictions=predictions)
    if n == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(int(p) == int(y) for y, p in zip(labels, predictions)) / n


def multirc_f1a(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """F1 over all answer options, class 1 positive; 0.0 when there are no true positives."""
    _check_lengths(labels=labels, predictions=predictions)
    true_pos = sum(int(y) == 1 and int(p) == 1 for y, p in zip(labels, predictions))
    pred_pos = sum(int(p) == 1 for p in predictions)
    gold_pos = sum(int(y) == 1 for y in labels)
    if true_pos == 0:
        return 0.0
    precision, recall = true_pos / pred_pos, true_pos / gold_pos
    return 2 * precision * recall / (precision + recall)


def multirc_em(
    question_ids: Sequence[Hashable], labels: Sequence[int], predictions: Sequence[int]
) -> float:
    """Share of questions (grouped by ``question_ids``) with every answer option right."""
    n = _check_lengths(question_ids=question_ids, labels=labels, predictions=predictions)
    if n == 0:
        raise ValueError("MultiRC exact match of an empty set is undefined")
    all_right: dict[Hashable, bool] = defaultdict(lambda: True)
    for question, y, p in zip(question_ids, labels, predictions):
        all_right[question] &= int(y) == int(p)
    return sum(all_right.values()) / len(all_right)
