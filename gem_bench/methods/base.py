"""The method interface: how a fine-tuning method turns a pretrained model into a trainable one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from gem_bench.config import MethodConfig, ModelConfig

# Calibration: given the model and the names of the eligible parameters, returns their
# gradients summed over the calibration pass (already reduced across processes).
CalibrationFn = Callable[[nn.Module, list[str]], dict[str, torch.Tensor]]


class Method:
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, seed: int = 0):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.seed = seed

    def prepare(self, model: nn.Module, calibrate: CalibrationFn | None = None) -> nn.Module:
        """Make the model trainable for this method (freeze, wrap, attach); return the model to train."""
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def on_step(self, model: nn.Module, global_step: int) -> None:
        """Called after every optimizer step, before the gradients are cleared (AdaLoRA's rank
        update reads them); ``global_step`` counts the steps done, this one included."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the training loss (AdaLoRA's orthogonality penalty), or None."""
        return None

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Only this method's own trainable state (what a checkpoint must hold)."""
        raise NotImplementedError

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> Path:
        """Write the trained update (small, safetensors) under ``directory``; return its path."""
        raise NotImplementedError

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Facts for the record: trainable count, allocation, ranks..."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
