"""The method interface: how a fine-tuning method turns a pretrained model into a trainable one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from safetensors.torch import save_file

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


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, detached and on the CPU (checkpoint-ready)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; the two name sets must agree exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(
            f"state does not fit the model: missing {missing[:3]} ({len(missing)} in all), "
            f"unexpected {unexpected[:3]} ({len(unexpected)} in all)"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


class TrainableTensorsMethod(Method):
    """A method whose state is exactly its trainable parameters (BitFit, Adapter), saved as one
    small safetensors file ``state_file`` with ``save_metadata`` in its header."""

    state_file: ClassVar[str]

    def save_metadata(self, model: nn.Module) -> dict[str, str]:
        return {}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(model, state)

    def save(self, model: nn.Module, directory: Path) -> Path:
        path = Path(directory) / self.state_file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(model), str(path), metadata={"method": self.name, **self.save_metadata(model)})
        return path


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
