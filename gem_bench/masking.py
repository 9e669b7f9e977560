"""GEM's mask selection on plain tensors: scores, per-matrix statistics, budget allocation, masks.

GEM scores every weight by its gradient-to-weight ratio rho = |g| / (|w| + eps). Each eligible
matrix l gets alpha_l = ||rho_l||_2 * H(rho_l / sum rho_l) and a share
k_l = floor(budget * alpha_l / sum alpha) of the budget = floor(r * N) (N = all model
parameters); its top-k_l entries by rho are trained. The baselines of the paper use the same
k = floor(budget / L) in each of the L matrices: random entries, or the top-k by |g|.

No model code here: dictionaries of tensors in, flat indices out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

ALLOCATIONS = ("norm_entropy", "norm", "entropy", "uniform")
STRATEGIES = ("gem", "random", "topgrad")


@dataclass(frozen=True)
class MatrixStats:
    """Statistics of one matrix's scores: L2 norm, entropy of the normalised scores, size."""

    norm: float
    entropy: float
    numel: int


def gwr_scores(weight: Tensor, grad: Tensor, eps: float = 1e-8) -> Tensor:
    """Gradient-to-weight ratio |g| / (|w| + eps), in float32, same shape as ``weight``."""
    if weight.shape != grad.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} != gradient shape {tuple(grad.shape)}")
    grad = grad.detach().to(weight.device, torch.float32)
    return grad.abs() / (weight.detach().float().abs() + eps)


def matrix_stats(scores: Tensor) -> MatrixStats:
    """L2 norm of the scores and the (natural-log) entropy of p = scores / sum(scores).

    0 log 0 counts as 0; an all-zero matrix has entropy 0. Sums run in float64 so that the
    statistics of large matrices do not depend on float32 summation order.
    """
    flat = scores.detach().reshape(-1).double()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("scores contain NaN or infinite values (overflowed calibration gradients?)")
    if bool((flat < 0).any()):
        raise ValueError("scores must be non-negative to define a distribution")
    norm = float(torch.linalg.vector_norm(flat))
    total = flat.sum()
    if total <= 0:
        return MatrixStats(norm=norm, entropy=0.0, numel=flat.numel())
    p = flat / total
    entropy = float(-torch.special.xlogy(p, p).sum())  # xlogy(0, 0) = 0
    return MatrixStats(norm=norm, entropy=max(entropy, 0.0), numel=flat.numel())


def allocation_weights(stats: dict[str, MatrixStats], allocation: str) -> dict[str, float]:
    """alpha_l of every matrix under an allocation rule (uniform: 1 for every matrix)."""
    if allocation == "norm_entropy":
        return {name: s.norm * s.entropy for name, s in stats.items()}
    if allocation == "norm":
        return {name: s.norm for name, s in stats.items()}
    if allocation == "entropy":
        return {name: s.entropy for name, s in stats.items()}
    if allocation == "uniform":
        return {name: 1.0 for name in stats}
    raise ValueError(f"unknown allocation {allocation!r}; valid choices: {', '.join(ALLOCATIONS)}")


def allocate(stats: dict[str, MatrixStats], budget: int, allocation: str) -> dict[str, int]:
    """Entries per matrix: floor(budget * alpha_l / sum alpha) (uniform: floor(budget / L)).

    Each k_l is capped at the matrix's size; what a cap leaves over is not redistributed (the
    paper does not), so sum(k) <= budget, and sum(k) >= budget - L when nothing is capped.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not stats:
        raise ValueError("no matrices to allocate a budget to")
    alphas = allocation_weights(stats, allocation)
    if allocation == "uniform":
        share = {name: budget // len(stats) for name in stats}
    else:
        total = sum(alphas.values())
        if not total > 0:
            raise ValueError(
                f"every matrix has alpha = 0 under allocation {allocation!r} "
                "(all-zero calibration gradients?)"
            )
        share = {name: math.floor(budget * a / total) for name, a in alphas.items()}
    return {name: min(k, stats[name].numel) for name, k in share.items()}


def topk_mask_indices(scores: Tensor, k: int) -> Tensor:
    """Flat indices (int64, ascending) of the ``k`` highest scores; ties go to the lower index.

    Deterministic and fast: ``topk`` finds the k-th highest value, then every entry above it
    and the lowest-indexed entries equal to it are taken.
    """
    flat = scores.detach().reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must be in [0, {flat.numel()}], got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("scores contain NaN or infinite values")
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    above = torch.nonzero(flat > threshold).reshape(-1)
    tied = torch.nonzero(flat == threshold).reshape(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, tied])).values


def random_indices(numel: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` distinct flat indices drawn uniformly from ``range(numel)``, ascending (int64, CPU)."""
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, {numel}], got {k}")
    return torch.sort(torch.randperm(numel, generator=generator)[:k]).values


@dataclass
class MatrixSelection:
    """The chosen entries of one matrix and the statistics that sized them."""

    indices: Tensor  # flat indices into the matrix, int64, ascending
    k: int
    numel: int
    alpha: float  # the allocation weight (1.0 for uniform, random and top-gradient)
    norm: float  # ||rho||_2
    entropy: float  # H(rho / sum rho)
    rho_captured: float  # sum of rho over the chosen entries


@dataclass
class Selection:
    strategy: str
    allocation: str
    ratio: float
    total_params: int
    budget: int
    rho_total: float  # sum of rho over every eligible matrix
    matrices: dict[str, MatrixSelection] = field(default_factory=dict)

    @property
    def indices(self) -> dict[str, Tensor]:
        return {name: m.indices for name, m in self.matrices.items()}

    @property
    def k(self) -> dict[str, int]:
        return {name: m.k for name, m in self.matrices.items()}

    @property
    def num_selected(self) -> int:
        return sum(m.k for m in self.matrices.values())

    @property
    def captured_rho_share(self) -> float:
        """Share of the total rho that the chosen entries hold (Table 2 of the paper)."""
        if self.rho_total <= 0:
            return 0.0
        return sum(m.rho_captured for m in self.matrices.values()) / self.rho_total

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for a run record: ``trainable`` entries of ``total`` parameters
        (``ratio`` = trainable / total) under ``budget`` = floor(``target_ratio`` * total), the
        share of rho they capture, and the per-matrix ``allocation``."""
        return {
            "trainable": self.num_selected,
            "total": self.total_params,
            "ratio": self.num_selected / self.total_params,
            "target_ratio": self.ratio,
            "budget": self.budget,
            "strategy": self.strategy,
            "allocation_rule": self.allocation,
            "captured_rho": self.captured_rho_share,
            "allocation": [
                {
                    "name": name,
                    "k": m.k,
                    "numel": m.numel,
                    "alpha": m.alpha,
                    "norm": m.norm,
                    "entropy": m.entropy,
                    "rho_captured": m.rho_captured,
                }
                for name, m in self.matrices.items()
            ],
        }


def budget_for(ratio: float, total_params: int) -> int:
    """floor(ratio * total_params), with the ratio taken as the decimal it is written as
    (so 0.001 * 135000 is 135, not 134 from binary rounding)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if total_params <= 0:
        raise ValueError(f"total_params must be positive, got {total_params}")
    return math.floor(Fraction(repr(float(ratio))) * total_params)


def select(
    weights: dict[str, Tensor],
    grads: dict[str, Tensor],
    total_params: int,
    ratio: float,
    strategy: str = "gem",
    allocation: str = "norm_entropy",
    generator: torch.Generator | None = None,
) -> Selection:
    """Choose the trainable entries of every eligible matrix.

    ``strategy``: ``gem`` (top-k by rho, k sized by ``allocation``), ``random`` (uniform draw
    with ``generator``) or ``topgrad`` (top-k by |g|); the last two use k = floor(budget / L)
    in each matrix and ignore ``allocation``. rho statistics are reported for every strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}; valid choices: {', '.join(STRATEGIES)}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; valid choices: {', '.join(ALLOCATIONS)}")
    if set(weights) != set(grads):
        missing = sorted(set(weights) ^ set(grads))
        raise ValueError(f"weights and gradients name different matrices: {missing[:5]}")
    if not weights:
        raise ValueError("no eligible matrices to select from")
    budget = budget_for(ratio, total_params)

    # Two passes over rho (recomputed, cheap) so only one matrix's scores exist at a time.
    stats, rho_total = {}, 0.0
    for name in weights:
        r = gwr_scores(weights[name], grads[name])
        stats[name] = matrix_stats(r)
        rho_total += float(r.double().sum())
    if strategy != "gem":
        allocation = "uniform"
    alphas = allocation_weights(stats, allocation)
    ks = allocate(stats, budget, allocation)

    matrices = {}
    for name in weights:
        r, k = gwr_scores(weights[name], grads[name]), ks[name]
        if strategy == "gem":
            idx = topk_mask_indices(r, k)
        elif strategy == "topgrad":
            idx = topk_mask_indices(grads[name].detach().to(r.device, torch.float32).abs(), k)
        else:
            idx = random_indices(r.numel(), k, generator).to(r.device)
        matrices[name] = MatrixSelection(
            indices=idx,
            k=k,
            numel=r.numel(),
            alpha=alphas[name],
            norm=stats[name].norm,
            entropy=stats[name].entropy,
            rho_captured=float(r.reshape(-1)[idx].double().sum()),
        )
    return Selection(
        strategy=strategy,
        allocation=allocation,
        ratio=float(ratio),
        total_params=total_params,
        budget=budget,
        rho_total=rho_total,
        matrices=matrices,
    )
