"""BitFit (Zaken et al. 2022): only bias terms train; which ones is a list of name patterns.

"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from gem_bench.errors import ConfigError
from gem_bench.methods.base import CalibrationFn, TrainableTensorsMethod, register_method

STATE_FILE = "bitfit.safetensors"


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


@register_method
class BitFit(TrainableTensorsMethod):
    """Trains the biases whose parameter name matches one of ``cfg.bias_patterns`` (regular
    expressions, ``re.search``). The frozen rest stays as it is, so the trained model is itself
    the merged model."""

    name = "bitfit"
    state_file = STATE_FILE

    def bias_names(self, model: nn.Module) -> list[str]:
        patterns = [re.compile(p) for p in self.cfg.bias_patterns]
        if not patterns:
            raise ConfigError("method.bias_patterns is empty: list the bias names to train (regexes)")
        biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
        chosen = [n for n in biases if any(p.search(n) for p in patterns)]
        if not chosen:
            raise ConfigError(
                f"method.bias_patterns={list(self.cfg.bias_patterns)} match no bias of the model; "
                f"its biases look like {biases[:4]}"
            )
        return chosen

    def add_missing_biases(self, model: nn.Module) -> int:
        """Bias-free models (Llama/SmolLM2) have nothing for BitFit to train: give the Linear
        layers named in ``add_biases`` a zero bias, so the model starts unchanged. Returns the count."""
        added = 0
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.bias is None and name.split(".")[-1] in self.cfg.add_biases:
                weight = module.weight
                module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
                added += 1
        return added

    def prepare(self, model: nn.Module, calibrate: CalibrationFn | None = None) -> nn.Module:
        self.add_missing_biases(model)
        chosen = set(self.bias_names(model))
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
        return model

    def save_metadata(self, model: nn.Module) -> dict[str, str]:
        return {"bias_patterns": json.dumps(list(self.cfg.bias_patterns))}

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Put a saved update onto a fresh base model; returns the model (biases replaced)."""
        model = self.prepare(model)
        self.load_state_dict(model, load_file(str(Path(directory) / STATE_FILE)))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """BitFit edits the model's own biases: the trained model is already merged."""
        freeze_all(model)
        return model

    def summary(self, model: nn.Module) -> dict[str, Any]:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "bias_patterns": list(self.cfg.bias_patterns),
            "added_biases": list(self.cfg.add_biases),
            "num_bias_tensors": len(names),
        }
