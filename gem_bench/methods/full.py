"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gem_bench.methods.base import CalibrationFn, Method, register_method


@register_method
class FullFineTune(Method):
    name = "full"

    def prepare(self, model: nn.Module, calibrate: CalibrationFn | None = None) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)

    def save(self, model: nn.Module, directory: Path) -> Path | None:
        """Nothing: a full copy of the model is too big for a record folder (checkpoints use
        ``state_dict``)."""
        return None

    def summary(self, model: nn.Module) -> dict[str, Any]:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total, "ratio": trainable / total}
