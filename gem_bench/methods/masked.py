"""Sparse masked fine-tuning: GEM and the random / top-gradient masking baselines.

All three freeze the model, score the eligible weight matrices with a calibration gradient,
choose k entries per matrix (``gem_bench.masking``) and train a sparse delta on exactly those
entries (``gem_bench.sparse``). N, the size that the ratio r applies to, counts every
parameter of the model once (tied embeddings once), before any delta is attached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from gem_bench import masking, sparse
from gem_bench.config import MethodConfig, ModelConfig
from gem_bench.errors import ConfigError
from gem_bench.methods.base import CalibrationFn, Method, register_method

DELTA_FILE = "sparse_delta.safetensors"


class MaskedMethod(Method):
    """Shared flow; subclasses set the mask ``strategy``."""

    strategy: ClassVar[str]
    needs_calibration = True

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, seed: int = 0):
        super().__init__(cfg, model_cfg, seed)
        if cfg.sparse_grad not in sparse.GRAD_MODES:
            raise ConfigError(
                f"method.sparse_grad={cfg.sparse_grad!r} is not valid; choices: {', '.join(sparse.GRAD_MODES)}"
            )
        if cfg.delta_init not in sparse.DELTA_INITS:
            raise ConfigError(
                f"method.delta_init={cfg.delta_init!r} is not valid; choices: {', '.join(sparse.DELTA_INITS)}"
            )
        if cfg.allocation not in masking.ALLOCATIONS:
            raise ConfigError(
                f"method.allocation={cfg.allocation!r} is not valid; choices: {', '.join(masking.ALLOCATIONS)}"
            )
        if not 0 < cfg.ratio <= 1:
            raise ConfigError(f"method.ratio={cfg.ratio!r} must be in (0, 1]")
        self.selection: masking.Selection | None = None
        self._initial_grads: dict[str, torch.Tensor] = {}

    def _generator(self) -> torch.Generator | None:
        return None

    def prepare(self, model: nn.Module, calibrate: CalibrationFn | None = None) -> nn.Module:
        if calibrate is None:
            raise ValueError(f"method {self.name!r} needs a calibration function")
        total_params = sum(p.numel() for p in model.parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        weights = sparse.eligible_weights(model, list(self.cfg.target_modules))
        # Eligible weights require grad during calibration, whoever runs the pass.
        for w in weights.values():
            w.requires_grad_(True)
        try:
            grads = calibrate(model, list(weights))
        finally:
            for w in weights.values():
                w.requires_grad_(False)
                w.grad = None
        self.selection = masking.select(
            {name: w.detach() for name, w in weights.items()},
            grads,
            total_params=total_params,
            ratio=self.cfg.ratio,
            strategy=self.strategy,
            allocation=self.cfg.allocation,
            generator=self._generator(),
        )
        attached = sparse.attach_sparse_deltas(
            model, self.selection.indices, grad_mode=self.cfg.sparse_grad, delta_init=self.cfg.delta_init
        )
        # The initial gradient at the trained entries, for figure2_stats' loss reduction.
        self._initial_grads = {
            name: grads[f"{name}.weight"].reshape(-1)[m.indices.to(grads[f"{name}.weight"].device)]
            .to(m.weight.device, torch.float64)
            for name, m in attached.items()
        }
        return model

    @torch.no_grad()
    def figure2_stats(self, model: nn.Module) -> dict[str, float]:
        """Figure 2 of the paper over the trained entries, with w_0 the pretrained weights and
        w_t - w_0 the delta: the relative weight change ||(w_t - w_0) / w_0||_2 (|w_0| + 1e-8, as
        in rho) and the first-order loss reduction |g_0 . (w_t - w_0)|, g_0 the calibration gradient."""
        change_sq, drop = 0.0, 0.0
        for name, m in sparse.sparse_modules(model).items():
            step = m.delta.double()
            w0 = m.weight.reshape(-1)[m.indices].double()
            change_sq += float((step / (w0.abs() + 1e-8)).square().sum())
            drop += float((self._initial_grads[name] * step).sum())
        return {"relative_weight_change": change_sq**0.5, "loss_reduction": abs(drop)}

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return sparse.delta_parameters(model)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return sparse.sparse_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        sparse.load_sparse_state_dict(model, state, grad_mode=self.cfg.sparse_grad)

    def save(self, model: nn.Module, directory: Path) -> Path:
        return sparse.save_sparse_delta(model, Path(directory) / DELTA_FILE, metadata={"method": self.name})

    def summary(self, model: nn.Module) -> dict[str, Any]:
        if self.selection is None:
            raise RuntimeError(f"method {self.name!r}: summary() before prepare()")
        return {
            **self.selection.summary(),
            "delta_init": self.cfg.delta_init,
            "sparse_grad": self.cfg.sparse_grad,
            "target_modules": list(self.cfg.target_modules),
        }


@register_method
class GEM(MaskedMethod):
    """Top-k by gradient-to-weight ratio, k per matrix by norm x entropy (or an ablation)."""

    name = "gem"
    strategy = "gem"


@register_method
class TopGradientMask(MaskedMethod):
    """Top-k by |gradient|, the same k in every matrix."""

    name = "topgrad_mask"
    strategy = "topgrad"


@register_method
class RandomMask(MaskedMethod):
    """k uniformly random entries per matrix, the same k in every matrix (Xu & Zhang 2024)."""

    name = "random_mask"
    strategy = "random"

    def _generator(self) -> torch.Generator:
        seed = self.seed if self.cfg.mask_seed is None else self.cfg.mask_seed
        return torch.Generator().manual_seed(seed)

    def summary(self, model: nn.Module) -> dict[str, Any]:
        seed = self.seed if self.cfg.mask_seed is None else self.cfg.mask_seed
        return {**super().summary(model), "mask_seed": seed}
