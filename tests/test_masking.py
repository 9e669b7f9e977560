"""GEM's math on a hand-computed example, and the mask rules of the baselines."""

import math

import pytest
import torch

from gem_bench import masking

LN2 = 0.6931471805599453
LN4 = 1.3862943611198906
SQRT8 = 2.8284271247461903


def hand_example():
    """Two matrices with |w| = 1, so rho = |g| (up to the 1e-8 eps):
    A (2x2): rho = [1, 1, 1, 1]  -> norm 2,       H = ln 4, alpha = 2 ln 4   = 2.7725887
    B (2x3): rho = [0, 2, 0, 0, 0, 2] -> norm sqrt 8, H = ln 2, alpha = sqrt8 ln 2 = 1.9605163
    alpha share: A 4 / (4 + 2 sqrt 2) = 0.5857864, B = 0.4142136."""
    weights = {
        "a.weight": torch.tensor([[1.0, -1.0], [-1.0, 1.0]]),
        "b.weight": torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]),
    }
    grads = {
        "a.weight": torch.tensor([[1.0, -1.0], [1.0, 1.0]]),
        "b.weight": torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -2.0]]),
    }
    return weights, grads


def test_gwr_scores_uses_abs_values_and_eps():
    w = torch.tensor([-2.0, 0.0, 0.5])
    g = torch.tensor([1.0, 3e-8, -1.0])
    rho = masking.gwr_scores(w, g)
    assert rho.dtype == torch.float32
    # 1 / (2 + 1e-8), 3e-8 / 1e-8, 1 / (0.5 + 1e-8)
    torch.testing.assert_close(rho, torch.tensor([0.5, 3.0, 2.0]))


def test_matrix_stats_hand_computed():
    s = masking.matrix_stats(torch.tensor([1.0, 3.0]))
    # p = [1/4, 3/4]: H = -(0.25 ln 0.25 + 0.75 ln 0.75)
    assert s.entropy == pytest.approx(0.5623351446188083, rel=1e-12)
    assert s.norm == pytest.approx(math.sqrt(10), rel=1e-12)
    assert s.numel == 2
    uniform = masking.matrix_stats(torch.ones(2, 2))
    assert uniform.entropy == pytest.approx(LN4) and uniform.norm == pytest.approx(2.0)
    # 0 log 0 = 0: zeros do not change the entropy; an all-zero matrix has entropy 0.
    assert masking.matrix_stats(torch.tensor([0.0, 2.0, 0.0, 2.0])).entropy == pytest.approx(LN2)
    assert masking.matrix_stats(torch.tensor([0.0, 5.0])).entropy == 0.0
    zero = masking.matrix_stats(torch.zeros(3))
    assert (zero.norm, zero.entropy) == (0.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        masking.matrix_stats(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize(
    "allocation, budget, expected",
    [
        ("norm_entropy", 5, {"a.weight": 2, "b.weight": 2}),  # floor(2.93), floor(2.07)
        ("norm_entropy", 10, {"a.weight": 4, "b.weight": 4}),  # floor(5.86) capped at 4, floor(4.14)
        ("entropy", 5, {"a.weight": 3, "b.weight": 1}),  # 5 * 2/3, 5 * 1/3
        ("norm", 5, {"a.weight": 2, "b.weight": 2}),  # 5 * 2 / (2 + sqrt 8) = 2.07, 2.93
        ("uniform", 5, {"a.weight": 2, "b.weight": 2}),  # floor(5 / 2)
    ],
)
def test_allocate_hand_computed(allocation, budget, expected):
    stats = {
        "a.weight": masking.MatrixStats(norm=2.0, entropy=LN4, numel=4),
        "b.weight": masking.MatrixStats(norm=SQRT8, entropy=LN2, numel=6),
    }
    assert masking.allocate(stats, budget, allocation) == expected


def test_allocate_unknown_allocation_names_the_choices():
    stats = {"a": masking.MatrixStats(1.0, 1.0, 4)}
    with pytest.raises(ValueError, match="'bogus'.*norm_entropy, norm, entropy, uniform"):
        masking.allocate(stats, 3, "bogus")


def test_select_gem_hand_computed():
    weights, grads = hand_example()
    sel = masking.select(weights, grads, total_params=5000, ratio=1e-3, strategy="gem")
    assert sel.budget == 5
    a, b = sel.matrices["a.weight"], sel.matrices["b.weight"]
    assert a.alpha == pytest.approx(2 * LN4, rel=1e-6)
    assert b.alpha == pytest.approx(SQRT8 * LN2, rel=1e-6)
    assert (a.norm, a.entropy) == (pytest.approx(2.0, rel=1e-6), pytest.approx(LN4, rel=1e-6))
    assert (b.norm, b.entropy) == (pytest.approx(SQRT8, rel=1e-6), pytest.approx(LN2, rel=1e-6))
    assert sel.k == {"a.weight": 2, "b.weight": 2}
    # A: four equal scores -> the two lowest indices; B: the two entries with rho = 2.
    assert a.indices.tolist() == [0, 1]
    assert b.indices.tolist() == [1, 5]
    # captured rho: (1 + 1 + 2 + 2) / (4 + 4)
    assert sel.captured_rho_share == pytest.approx(0.75, rel=1e-6)
    assert sel.num_selected == 4


def test_select_gem_cap_and_ties_at_zero():
    weights, grads = hand_example()
    sel = masking.select(weights, grads, total_params=10_000, ratio=1e-3, strategy="gem")
    assert sel.k == {"a.weight": 4, "b.weight": 4}  # A capped at its 4 entries
    # B: rho = 2 at 1 and 5, then the zero ties go to the lowest indices 0 and 2.
    assert sel.matrices["b.weight"].indices.tolist() == [0, 1, 2, 5]
    assert sel.captured_rho_share == pytest.approx(1.0, rel=1e-6)


def test_select_entropy_ablation_tie_goes_to_lower_index():
    weights, grads = hand_example()
    sel = masking.select(weights, grads, 5000, 1e-3, strategy="gem", allocation="entropy")
    assert sel.k == {"a.weight": 3, "b.weight": 1}
    assert sel.matrices["a.weight"].indices.tolist() == [0, 1, 2]
    assert sel.matrices["b.weight"].indices.tolist() == [1]  # rho(1) == rho(5): the lower wins


def test_topk_mask_indices():
    scores = torch.tensor([[0.5, 2.0, 0.5], [2.0, 0.1, 0.5]])
    assert masking.topk_mask_indices(scores, 0).tolist() == []
    assert masking.topk_mask_indices(scores, 1).tolist() == [1]
    assert masking.topk_mask_indices(scores, 3).tolist() == [0, 1, 3]
    assert masking.topk_mask_indices(scores, 4).tolist() == [0, 1, 2, 3]
    assert masking.topk_mask_indices(scores, 6).tolist() == list(range(6))
    with pytest.raises(ValueError, match="k must be in"):
        masking.topk_mask_indices(scores, 7)


def test_topgrad_ranks_by_gradient_not_ratio():
    weights = {"m.weight": torch.tensor([[0.1, 10.0], [1.0, 1.0]])}
    grads = {"m.weight": torch.tensor([[0.1, 5.0], [0.0, 0.0]])}  # rho = [1, 0.5, 0, 0]
    assert masking.select(weights, grads, 1000, 1e-3, strategy="gem").indices["m.weight"].tolist() == [0]
    assert masking.select(weights, grads, 1000, 1e-3, strategy="topgrad").indices["m.weight"].tolist() == [1]


def test_random_and_topgrad_use_the_same_k_everywhere():
    torch.manual_seed(0)
    shapes = {"a.weight": (8, 8), "b.weight": (4, 8), "c.weight": (16, 8)}
    weights = {n: torch.randn(s) for n, s in shapes.items()}
    grads = {n: torch.randn(s) for n, s in shapes.items()}
    for strategy in ("random", "topgrad"):
        sel = masking.select(
            weights, grads, 10_000, 3e-3, strategy=strategy, generator=torch.Generator().manual_seed(1)
        )
        assert sel.budget == 30 and set(sel.k.values()) == {10}
        assert sel.allocation == "uniform"
        for name, idx in sel.indices.items():
            assert idx.numel() == 10 and idx.unique().numel() == 10
            assert idx.tolist() == sorted(idx.tolist()) and 0 <= int(idx.min()) and int(idx.max()) < weights[name].numel()
    draw = lambda seed: masking.select(
        weights, grads, 10_000, 3e-3, strategy="random", generator=torch.Generator().manual_seed(seed)
    ).indices["c.weight"]
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("allocation", masking.ALLOCATIONS)
def test_masks_have_exactly_k_entries_and_sum_near_budget(allocation):
    torch.manual_seed(0)
    shapes = [(32, 32), (32, 16), (64, 32), (8, 32), (32, 32)]
    weights = {f"m{i}.weight": torch.randn(s) for i, s in enumerate(shapes)}
    grads = {n: torch.randn(w.shape) * torch.rand(1) for n, w in weights.items()}
    total = 123_457
    sel = masking.select(weights, grads, total, 0.005, strategy="gem", allocation=allocation)
    assert sel.budget == math.floor(0.005 * total)  # 617; no matrix hits its cap
    for m in sel.matrices.values():
        assert m.indices.numel() == m.k
    assert sel.budget - len(shapes) <= sel.num_selected <= sel.budget


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True])
def test_bad_ratio_is_named(ratio):
    weights, grads = hand_example()
    with pytest.raises(ValueError, match="ratio must be in"):
        masking.select(weights, grads, 1000, ratio)


def test_budget_takes_the_ratio_as_written():
    assert masking.budget_for(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in binary
    assert masking.budget_for(1e-3, 134_515_008) == 134_515
    assert masking.budget_for(1.0, 7) == 7


def test_select_rejects_unknown_strategy_and_mismatched_names():
    weights, grads = hand_example()
    with pytest.raises(ValueError, match="'magnitude'.*gem, random, topgrad"):
        masking.select(weights, grads, 1000, 1e-3, strategy="magnitude")
    with pytest.raises(ValueError, match="different matrices"):
        masking.select(weights, {"a.weight": grads["a.weight"]}, 1000, 1e-3)


def test_summary_is_json_ready():
    import json

    weights, grads = hand_example()
    summary = masking.select(weights, grads, 5000, 1e-3).summary()
    assert json.loads(json.dumps(summary))["trainable"] == 4
    assert (summary["total"], summary["budget"], summary["target_ratio"]) == (5000, 5, 1e-3)
    assert summary["ratio"] == 4 / 5000
    assert [m["name"] for m in summary["allocation"]] == ["a.weight", "b.weight"]
