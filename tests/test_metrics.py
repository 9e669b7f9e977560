"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from gem_bench.metrics import (
    exact_match,
    gsm8k_gold,
    gsm8k_prediction,
    normalize_answer,
    pass_at_k,
    squad_metrics,
    squad_scores,
    token_f1,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Denver Broncos!", "denver broncos"),
        ("An apple, a day.", "apple day"),
        ("theory of anathema", "theory of anathema"),  # articles only as whole words
        ("  a\tthe\nan ", ""),
        ("Levi's Stadium", "levis stadium"),  # punctuation removed, not replaced by a space
        ("24–10", "24–10"),  # the en dash is not in string.punctuation (as in the official script)
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_partial_overlap():
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    # pred {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [b, b], gold [b, b, b, c]: P = 1, R = 1/2
    assert token_f1("a b b", "b b b c") == pytest.approx(2 / 3)
    assert token_f1("Carolina", "Denver Broncos") == 0.0


def test_squad_scores_max_over_golds():
    # "Denver" vs "Broncos": 0; vs "Denver Broncos": P = 1, R = 1/2 -> 2/3
    assert squad_scores("Denver", ["Broncos", "Denver Broncos"]) == (0.0, pytest.approx(2 / 3))
    assert squad_scores("broncos", ["Broncos", "Denver Broncos"]) == (1.0, 1.0)


def test_squad_v2_no_answer():
    assert squad_scores("", []) == (1.0, 1.0)  # abstaining on an unanswerable question
    assert squad_scores("France", []) == (0.0, 0.0)
    assert squad_scores("", ["France"]) == (0.0, 0.0)
    assert squad_scores("", ["the", "."]) == (1.0, 1.0)  # golds that normalise to nothing: no answer


def test_squad_metrics_v1_and_v2_breakdowns():
    v1 = squad_metrics(["Denver Broncos", "Denver"], [["Denver Broncos"], ["Denver Broncos"]])
    assert v1 == {"exact": 50.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 2), "total": 2.0}
    v2 = squad_metrics(
        ["Denver Broncos team", "", "Paris", ""],
        [["the Denver Broncos"], [], [], ["France"]],
    )
    assert v2["HasAns_total"] == 2.0 and v2["NoAns_total"] == 2.0
    assert v2["HasAns_exact"] == 0.0 and v2["HasAns_f1"] == pytest.approx(40.0)  # (0.8 + 0) / 2
    assert v2["NoAns_exact"] == 50.0 and v2["NoAns_f1"] == 50.0
    assert v2["exact"] == 25.0 and v2["f1"] == pytest.approx(100 * 1.8 / 4)
    with pytest.raises(ValueError, match="3 predictions for 2 questions"):
        squad_metrics(["a", "b", "c"], [["a"], ["b"]])


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("She pays $1,000.", "1000"),
        ("The temperature drops to -3", "-3"),
        ("so the answer is 7 apples", "7"),
        ("it weighs 1,234.5 kg", "1234.5"),
        ("3 + 4 = 7\n#### 7.", "7"),
        ("I had 3 and then 12,", "12"),
        ("no numbers here", None),
    ],
)
def test_gsm8k_prediction(generation, expected):
    assert gsm8k_prediction(generation) == expected


def test_gsm8k_gold():
    assert gsm8k_gold("80,000+50,000=$<<80000+50000=130000>>130,000\n#### 70,000") == "70000"
    assert gsm8k_gold("#### -3") == "-3"
    with pytest.raises(ValueError, match="without '####'"):
        gsm8k_gold("the answer is 5")


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 3), (5, 2, 2), (20, 2, 5), (5, 0, 1), (3, 1, 3), (5, 5, 3)])
def test_pass_at_k_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_hand_values_and_errors():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    with pytest.raises(ValueError, match="k=4"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c=4"):
        pass_at_k(3, 4, 1)
