"""AdaLoRA (Zhang et al. 2023) through PEFT: SVD-shaped updates P diag(E) Q whose ranks are pruned
from ``adalora_init_r`` towards an average of ``adalora_target_r`` per module during training.

The rank budget follows a schedule over the whole run, so the runner must say how long the run
is before ``prepare``: ``method.total_steps = <number of optimizer steps>``. It must also call
``on_step(model, global_step)`` after every ``optimizer.step()`` and before ``zero_grad()``: the
importance scores read the gradients.
"""

from __future__ import annotations

from typing import Any, Optional

from peft import AdaLoraConfig, PeftConfig, TaskType
from torch import nn

from gem_bench.errors import ConfigError
from gem_bench.methods.base import CalibrationFn, register_method
from gem_bench.methods.lora import LoRA


@register_method
class AdaLoRA(LoRA):
    name = "adalora"
    total_steps: Optional[int] = None  # set by the runner before prepare

    def peft_config(self) -> PeftConfig:
        c = self.cfg
        steps = self.total_steps
        if steps is None or steps <= c.adalora_tinit + c.adalora_tfinal:
            raise ConfigError(
                f"AdaLoRA needs total_steps > adalora_tinit + adalora_tfinal "
                f"(total_steps={steps}, tinit={c.adalora_tinit}, tfinal={c.adalora_tfinal}): "
                "set method.total_steps before prepare, or shorten tinit/tfinal"
            )
        return AdaLoraConfig(
            init_r=c.adalora_init_r,
            target_r=c.adalora_target_r,
            tinit=c.adalora_tinit,
            tfinal=c.adalora_tfinal,
            deltaT=c.adalora_delta_t,
            total_step=steps,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=list(c.target_modules),
            task_type=TaskType.CAUSAL_LM,
        )

    def prepare(self, model: nn.Module, calibrate: CalibrationFn | None = None) -> nn.Module:
        peft_model = super().prepare(model)
        # ranknum is a constant (the initial rank) that PEFT keeps in a Parameter; on a meta-device
        # model PEFT leaves it trainable, which would inflate the Params count.
        for n, p in peft_model.named_parameters():
            if ".ranknum." in n:
                p.requires_grad_(False)
        return peft_model

    def on_step(self, model: nn.Module, global_step: int) -> None:
        model.base_model.update_and_allocate(global_step)

    @staticmethod
    def rank_allocation(model: nn.Module) -> dict[str, int]:
        """Current rank of every adapted module (``init_r`` everywhere until the first pruning)."""
        config = model.peft_config[model.active_adapter]
        pattern = config.rank_pattern
        if pattern:
            return {k.removesuffix(".lora_E"): int(sum(v)) for k, v in pattern.items()}
        return {
            n.removesuffix(".lora_E." + model.active_adapter): config.init_r
            for n, _ in model.named_parameters()
            if n.endswith(".lora_E." + model.active_adapter)
        }

    def summary(self, model: nn.Module) -> dict[str, Any]:
        ranks = self.rank_allocation(model)
        return {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "target_modules": list(self.cfg.target_modules),
            "init_r": self.cfg.adalora_init_r,
            "target_r": self.cfg.adalora_target_r,
            "total_steps": self.total_steps,
            "total_rank": sum(ranks.values()),
            "ranks": ranks,
        }
