"""Houlsby adapters (Houlsby et al. 2019): a small ReLU bottleneck after the attention output
projection and after the MLP output projection of every block, before the residual add.

PEFT has no Houlsby adapter and AdapterHub pins transformers 4.x, so the wrapper lives here: each
target ``nn.Linear`` becomes ``out = linear(x); out + up(relu(down(out)))``. ``up`` starts at zero,
so the wrapped model computes exactly what the base model did. The ReLU makes the update
non-linear: adapters cannot be merged into the base weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from gem_bench.errors import ConfigError
from gem_bench.methods.base import CalibrationFn, TrainableTensorsMethod, register_method

STATE_FILE = "adapter.safetensors"

# The two output projections of a block, by transformers model_type (used when
# method.target_modules is empty). Phi's block is parallel: attention `dense` and MLP `fc2`.
OUTPUT_MODULES = {
    "opt": ["out_proj", "fc2"],
    "phi": ["dense", "fc2"],
    "llama": ["o_proj", "down_proj"],
}


class HoulsbyAdapter(nn.Module):
    """A frozen Linear followed by a trainable residual bottleneck on its output."""

    def __init__(self, linear: nn.Linear, size: int):
        super().__init__()
        self.linear = linear
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.adapter_down = nn.Linear(linear.out_features, size, **factory)
        self.adapter_up = nn.Linear(size, linear.out_features, **factory)
        nn.init.zeros_(self.adapter_up.weight)  # the model starts unchanged
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out + self.adapter_up(torch.relu(self.adapter_down(out)))


@register_method
class Adapter(TrainableTensorsMethod):
    name = "adapter"
    state_file = STATE_FILE

    def target_modules(self, model: nn.Module) -> list[str]:
        if self.cfg.target_modules:
            return list(self.cfg.target_modules)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in OUTPUT_MODULES:
            raise ConfigError(
                f"adapter: no default output modules for model_type={model_type!r} "
                f"(known: {sorted(OUTPUT_MODULES)}); set method.target_modules"
            )
        return OUTPUT_MODULES[model_type]

    def prepare(self, model: nn.Module, calibrate: CalibrationFn | None = None) -> nn.Module:
        if self.cfg.adapter_size < 1:
            raise ConfigError(f"method.adapter_size={self.cfg.adapter_size}: must be a positive integer")
        targets = set(self.target_modules(model))
        for p in model.parameters():
            p.requires_grad_(False)
        found = set()
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in targets and isinstance(module, nn.Linear):
                parent = model.get_submodule(name.rpartition(".")[0])
                setattr(parent, leaf, HoulsbyAdapter(module, self.cfg.adapter_size))
                found.add(leaf)
        if found != targets:
            raise ConfigError(
                f"adapter: target modules {sorted(targets - found)} are not Linear modules of the model"
            )
        return model

    def save_metadata(self, model: nn.Module) -> dict[str, str]:
        return {"adapter_size": str(self.cfg.adapter_size), "target_modules": json.dumps(self.target_modules(model))}

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Wrap a fresh base model and put the saved adapters in; returns the wrapped model."""
        path = Path(directory) / STATE_FILE
        with safe_open(str(path), framework="pt") as f:
            saved = int(f.metadata()["adapter_size"])
        if saved != self.cfg.adapter_size:
            raise ConfigError(f"{path} holds adapters of size {saved}, method.adapter_size={self.cfg.adapter_size}")
        model = self.prepare(model)
        self.load_state_dict(model, load_file(str(path)))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise ConfigError("adapter cannot be merged: its ReLU bottleneck is not a linear map; use the wrapped model")

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "adapter_size": self.cfg.adapter_size,
            "target_modules": self.target_modules(model),
            "num_adapters": sum(isinstance(m, HoulsbyAdapter) for m in model.modules()),
        }
