"""Predictions and metrics for one split: candidate scoring for classification, generation otherwise."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from torch import nn

from gem_bench import scoring
from gem_bench.tasks.base import Example, Task

EXAMPLES_IN_RECORD = 5


def predict(model: nn.Module, tokenizer: Any, task: Task, examples: list[Example], cfg: Any) -> list[Any]:
    """Class indices (classification) or post-processed generations (one string, or a list of
    ``num_samples`` strings per example for sampled tasks such as MBPP)."""
    if not examples:
        return []
    if task.kind == "classification":
        scores = scoring.score_candidates(
            model, tokenizer, examples, batch_size=cfg.train.eval_batch_size, max_length=cfg.task.max_length
        )
        return scoring.predict_classes(scores)
    samples = scoring.generate(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        max_new_tokens=cfg.task.max_new_tokens,
        batch_size=cfg.train.eval_batch_size,
        num_samples=cfg.task.num_samples,
        temperature=cfg.task.temperature,
        seed=cfg.seed,
        stop_strings=task.stop_sequences,
        max_length=cfg.task.max_length,
    )
    outputs = [[task.postprocess(text) for text in per_example] for per_example in samples]
    return [out if cfg.task.num_samples > 1 else out[0] for out in outputs]


def evaluate(
    accelerator: Accelerator, model: nn.Module, tokenizer: Any, task: Task, examples: list[Example], cfg: Any
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Every process predicts its share; the main process's gathered list is in the original order."""
    model = accelerator.unwrap_model(model)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(examples), world))
    predictions = predict(model, tokenizer, task, [examples[i] for i in mine], cfg)
    if world > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(list(zip(mine, predictions)))
        by_index = dict(pairs)
        predictions = [by_index[i] for i in range(len(examples))]
    metrics = task.metrics(examples, predictions)
    shown = [
        {
            "prompt": ex.prompt[-300:],
            "prediction": pred if task.kind != "classification" else ex.candidates[pred],
            "gold": ex.references if task.kind != "classification" else ex.candidates[ex.label],
        }
        for ex, pred in list(zip(examples, predictions))[:EXAMPLES_IN_RECORD]
    ]
    return metrics, shown
