"""How many parameters a method trains on a model: the Params column of Table 3.

Computed on a meta-device model (no weights, no download): instant and offline. The share is
trainable / N with N the base model's parameter count, embeddings included.
"""

from __future__ import annotations

import math
from typing import Callable

from gem_bench.config import MethodConfig, ModelConfig
from gem_bench.errors import ConfigError
from gem_bench.masking import budget_for
from gem_bench.methods import METHODS
from gem_bench.models import build_meta_model, count_parameters

MASK_METHODS = ("gem", "random_mask", "topgrad_mask")  # train floor(ratio * N) entries at most
APPLIED_METHODS = ("lora", "adalora", "adapter", "bitfit")  # counted by applying them


def trainable_share(model_cfg: ModelConfig, method_cfg: MethodConfig) -> dict:
    """``{"trainable", "total", "ratio"}`` for ``method_cfg`` applied to ``model_cfg``'s architecture."""
    model = build_meta_model(model_cfg)
    total = count_parameters(model)
    name = method_cfg.name
    if name == "full":
        trainable = total
    elif name in MASK_METHODS:
        trainable = budget_for(method_cfg.ratio, total)
    elif name in APPLIED_METHODS:
        method = METHODS[name](method_cfg, model_cfg)
        if name == "adalora":  # the rank schedule needs a length; the count does not depend on it
            method.total_steps = method_cfg.adalora_tinit + method_cfg.adalora_tfinal + 1
        trained = method.prepare(model)
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    else:
        choices = ("full",) + MASK_METHODS + APPLIED_METHODS
        raise ConfigError(f"params: unknown method {name!r}; choices: {', '.join(choices)}")
    return {"trainable": trainable, "total": total, "ratio": trainable / total}


TABLE3_MODELS = ("opt-125m", "opt-1.3b", "phi-2", "smollm2-135m")
TABLE3_METHODS = ("full", "lora", "bitfit", "adapter", "adalora", "random_mask", "topgrad_mask", "gem")


def table(compose: Callable[[list[str]], object], models=TABLE3_MODELS, methods=TABLE3_METHODS) -> str:
    """Markdown: each model x method's trainable share, composed exactly as a run would be
    (model-specialised defaults included)."""
    lines = ["| model | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for model in models:
        cells = []
        for method in methods:
            cfg = compose([f"model={model}", f"method={method}"])
            share = trainable_share(cfg.model, cfg.method)
            cells.append("100%" if share["ratio"] == 1 else f"{100 * share['ratio']:.3f}%")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
