"""LoRA (Hu et al. 2022) through PEFT: a low-rank update (alpha / r) * B A on each target projection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from gem_bench.errors import ConfigError
from gem_bench.methods.base import CalibrationFn, Method, load_trainable_state, register_method, trainable_state_dict

PEFT_WEIGHTS = "adapter_model.safetensors"  # the file PEFT's save_pretrained writes


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Fail with the model's own Linear names when a target module name matches nothing."""
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(targets) - linear)
    if not targets or unknown:
        raise ConfigError(
            f"method.target_modules={list(targets)}: {unknown or 'empty'} not among the model's "
            f"Linear modules {sorted(linear)}"
        )


@register_method
class LoRA(Method):
    name = "lora"

    def peft_config(self) -> PeftConfig:
        c = self.cfg
        return LoraConfig(
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=list(c.target_modules),
            bias="none",
            task_type=TaskType.CAUSAL_LM,
        )

    def prepare(self, model: nn.Module, calibrate: CalibrationFn | None = None) -> nn.Module:
        """Returns the PEFT model (base frozen, adapters trainable); ``model`` is modified in place."""
        check_target_modules(model, list(self.cfg.target_modules))
        return get_peft_model(model, self.peft_config())

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(model, state)

    def save(self, model: nn.Module, directory: Path) -> Path:
        """PEFT's own format: ``adapter_config.json`` + ``adapter_model.safetensors``."""
        model.save_pretrained(str(directory))
        return Path(directory) / PEFT_WEIGHTS

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """Put a saved adapter onto a fresh base model; returns the (frozen) PEFT model."""
        return PeftModel.from_pretrained(model, str(directory))

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold B A into the base weights; returns the plain transformers model."""
        return model.merge_and_unload()

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "target_modules": list(self.cfg.target_modules),
            "lora_r": self.cfg.lora_r,
            "lora_alpha": self.cfg.lora_alpha,
        }
