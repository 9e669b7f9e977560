"""AdaLoRA (Zhang et al. 2023) through PEFT: SVD-shaped updates P diag(E) Q whose ranks are pruned
from ``adalora_init_r`` towards an average of ``adalora_target_r`` per module during training.

AdaLoRA's loss has an orthogonality penalty on P and Q. PEFT adds it only to a loss the model
computes itself (when ``labels`` are passed); a runner with its own loss (candidate
cross-entropy) adds ``orthogonal_regularization(model)`` to it.

The rank budget follows a schedule over the whole run, so the runner must say how long the run
is before ``prepare``: ``method.total_steps = <number of optimizer steps>``. It must also call
``on_step(model, global_step)`` after every ``optimizer.step()`` and before ``zero_grad()``: the
importance scores read the gradients.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from peft import AdaLoraConfig, PeftConfig, TaskType
from torch import nn

from gem_bench.errors import ConfigError
from gem_bench.methods.base import CalibrationFn, register_method
from gem_bench.methods.lora import LoRA

RANK_PATTERN = "rank_pattern:"  # key prefix of the rank masks inside a state dict


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
        """``global_step``: optimizer steps done so far (1 after the first), so that the last step,
        ``total_steps``, fixes the final ranks when ``tfinal`` is 0."""
        model.base_model.update_and_allocate(global_step)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable tensors plus the rank pattern they were masked with, so that a restored
        (e.g. best-epoch) state is saved with its own pruned ranks."""
        state = super().state_dict(model)
        pattern = model.peft_config[model.active_adapter].rank_pattern or {}
        state.update({RANK_PATTERN + k: torch.tensor(v, dtype=torch.bool) for k, v in pattern.items()})
        return state

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        pattern = {k.removeprefix(RANK_PATTERN): v.tolist() for k, v in state.items() if k.startswith(RANK_PATTERN)}
        super().load_state_dict(model, {k: v for k, v in state.items() if not k.startswith(RANK_PATTERN)})
        model.peft_config[model.active_adapter].rank_pattern = pattern or None

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.orthogonal_regularization(model)

    @staticmethod
    def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
        """orth_reg_weight x mean over P, Q of ||P P^T - I||_F (resp. Q^T Q): PEFT's term."""
        adapter = model.active_adapter
        terms = []
        for n, p in model.base_model.model.named_parameters():
            if f"lora_A.{adapter}" in n or f"lora_B.{adapter}" in n:
                cov = p @ p.T if ".lora_A." in n else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device, dtype=cov.dtype)))
        return model.peft_config[adapter].orth_reg_weight * torch.stack(terms).mean()

    @staticmethod
    def rank_allocation(model: nn.Module) -> dict[str, int]:
        """Current rank of every adapted module, by its name in the transformers model
        (``init_r`` everywhere until the first pruning)."""
        config = model.peft_config[model.active_adapter]
        if config.rank_pattern:  # {"<module>.lora_E[.<adapter>]": [kept?] * init_r}
            return {k.split(".lora_E")[0]: int(sum(v)) for k, v in config.rank_pattern.items()}
        return {
            n.split(".lora_E")[0]: config.init_r
            for n, _ in model.base_model.model.named_parameters()
            if ".lora_E." in n
        }

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """As LoRA's; the modules come back at their pruned ranks (PEFT's generic rank_pattern
        check does not know AdaLoRA's keys and warns that they match nothing: they do)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            return super().load(model, directory)

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
