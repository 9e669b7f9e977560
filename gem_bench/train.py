"""One run: data, model, method, the Accelerate training loop, evaluation and the record.

Reads top to bottom: set-up, calibration (masked methods), epochs of AdamW steps with
dev evaluation at each epoch end, test at the best dev epoch, the record. A checkpoint
(trainable state, optimizer, RNG, loader position, best-dev bookkeeping) is written
atomically at epoch ends and every ``train.checkpoint_every`` steps; running the same
command again resumes from it.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from omegaconf import DictConfig, OmegaConf

from gem_bench import checkpoint as ckpt
from gem_bench import records, scoring
from gem_bench.data import sample_splits
from gem_bench.errors import ConfigError, GemBenchError
from gem_bench.evaluation import evaluate
from gem_bench.methods import METHODS
from gem_bench.models import count_parameters, load_model_and_tokenizer
from gem_bench.tasks import TASKS


class Preempted(Exception):
    """SIGTERM/SIGUSR2 arrived: the run checkpointed and stops, to be resumed later."""


@dataclass
class LoopState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # steps done inside the current epoch
    global_step: int = 0
    last_loss: float = math.nan
    best_dev: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    figure2: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def validate(cfg: DictConfig) -> None:
    """Values the schema's types cannot check."""
    if cfg.method.name not in METHODS:
        raise ConfigError(f"unknown method {cfg.method.name!r}; valid: {', '.join(sorted(METHODS))}")
    if cfg.task.name not in TASKS:
        raise ConfigError(f"unknown task {cfg.task.name!r}; valid: {', '.join(sorted(TASKS))}")
    if not 0.0 < cfg.method.ratio <= 1.0:
        raise ConfigError(f"method.ratio={cfg.method.ratio} is outside (0, 1]; the paper uses 0.001 (0.1%)")
    if not cfg.method.lr > 0:
        raise ConfigError(f"method.lr={cfg.method.lr} must be positive")
    if cfg.train.batch_size < 1 or cfg.train.eval_batch_size < 1:
        raise ConfigError("train.batch_size and train.eval_batch_size must be at least 1")
    if cfg.task.num_train < 1:
        raise ConfigError(f"task.num_train={cfg.task.num_train} must be at least 1")


def run_location(cfg: DictConfig, method_choice: str, num_processes: int = 1) -> Path:
    plain = OmegaConf.to_container(cfg, resolve=True)
    variant = records.variant_name(plain)
    if num_processes > 1:  # data-parallel: each step sees num_processes batches, so results differ
        variant += f"-np{num_processes}"
    return records.run_dir(cfg.results_dir, cfg.model.name, cfg.task.name, method_choice, variant, cfg.seed)


def run(cfg: DictConfig, method_choice: str | None = None) -> dict[str, Any] | None:
    """Run one experiment unless its record says it finished; return the record (main process)."""
    validate(cfg)
    method_choice = method_choice or cfg.method.name
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
    directory = run_location(cfg, method_choice, accelerator.num_processes)
    main = accelerator.is_main_process
    if records.finished(directory) and not cfg.rerun:
        if main:
            print(f"[gem-bench] finished already, skipping (rerun=true runs it again): {directory}")
        return records.read_record(directory / records.RECORD_NAME)
    _check_writable(Path(cfg.results_dir))
    claim = records.claim_run(directory) if main else None
    try:
        if records.finished(directory) and not cfg.rerun:  # finished by another sweep while we looked
            return records.read_record(directory / records.RECORD_NAME)
        return _run_claimed(cfg, method_choice, directory, accelerator)
    finally:
        if claim:
            claim.release()
        # A multirun calls run() many times in one process: drop the models and optimizers that
        # Accelerate keeps references to, or every run's model stays in memory.
        accelerator.free_memory()


def end_processes() -> None:
    """At the end of a multi-process command (after every run of it): wait for all processes,
    then close the process group, so that no process exits while another still needs it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        state = PartialState()
        state.wait_for_everyone()
        state.destroy_process_group()


def _check_writable(results: Path) -> None:
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"results_dir={results} is not writable ({exc.strerror}); set results_dir=<a writable folder>")


def _run_claimed(cfg: DictConfig, method_choice: str, directory: Path, accelerator: Accelerator) -> dict | None:
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    run_info = {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "method": method_choice,
        "variant": directory.parent.name,
        "seed": cfg.seed,
        "profile": cfg.profile,
        "experiment": cfg.experiment_name,
    }
    state = LoopState()
    started = time.time()
    try:
        record = _train_and_evaluate(cfg, directory, accelerator, state, plain_cfg)
    except (Preempted, GemBenchError):  # bad input is the user's to fix: a clear error, no record
        raise
    except Exception as exc:  # a failure (exception, NaN loss, out of memory) is a record too; the sweep goes on
        record = {
            "status": "failed",
            "failure": {"type": type(exc).__name__, "message": str(exc)[:2000], "step": state.global_step},
            "metrics": {"history": state.history},
        }
        if accelerator.is_main_process:
            print(f"[gem-bench] run failed at step {state.global_step}: {type(exc).__name__}: {exc}")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    state.timings["total_s"] = round(time.time() - started, 3)  # this process's wall time
    full_record = {
        "schema": records.RECORD_SCHEMA,
        "status": record["status"],
        "run": run_info,
        "config": plain_cfg,
        **{k: v for k, v in record.items() if k != "status"},
        "timings": state.timings,
        **records.environment(),
    }
    full_record.setdefault("failure", None)
    records.write_json_atomic(directory / records.RECORD_NAME, full_record)
    if record["status"] == "finished" and not cfg.train.keep_checkpoints:
        ckpt.remove(directory)
    print(f"[gem-bench] record: {directory / records.RECORD_NAME}")
    return full_record


def _train_and_evaluate(
    cfg: DictConfig, directory: Path, accelerator: Accelerator, state: LoopState, plain_cfg: dict
) -> dict[str, Any]:
    main = accelerator.is_main_process
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model_seed = cfg.seed if cfg.train.vary_model_seed else cfg.train.model_seed

    task = TASKS[cfg.task.name](cfg.task)
    task.data_root = cfg.data_root  # tasks that read a further split (MBPP's shots) read it from here too
    splits = sample_splits(task, cfg.task, cfg.data_root, cfg.seed)
    torch.manual_seed(model_seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cache_dir=cfg.model_cache)
    model.to(accelerator.device)

    epochs = cfg.train.epochs or cfg.task.epochs
    steps_per_epoch = _steps_per_epoch(len(splits.train), cfg.train.batch_size, accelerator.num_processes)
    total_steps = epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    total_params = count_parameters(model)
    method = METHODS[cfg.method.name](cfg.method, cfg.model, seed=cfg.seed)
    method.total_steps = total_steps  # AdaLoRA's schedule needs it
    calibration_s = 0.0

    def calibrate(net: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        nonlocal calibration_s
        t0 = time.time()
        grads = calibration_gradients(accelerator, net, tokenizer, splits.train, names, cfg)
        calibration_s = time.time() - t0
        return grads

    torch.manual_seed(model_seed)
    model = method.prepare(model, calibrate if method.needs_calibration else None)
    trainable = method.trainable_parameters(model)
    trainable_count = sum(p.numel() for p in {id(p): p for p in trainable}.values())
    if not trainable:
        raise ConfigError(f"method {cfg.method.name!r} left no trainable parameters on {cfg.model.name}")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.method.lr, weight_decay=cfg.method.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    state.timings["calibration_s"] = round(calibration_s, 3)

    best_state = None
    resumed = ckpt.load(directory, plain_cfg)
    if resumed is not None:
        method.load_state_dict(accelerator.unwrap_model(model), resumed["method_state"])
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["rng"]["torch"])
        for key, value in resumed["loop"].items():
            setattr(state, key, value)
        best_state = resumed.get("best_state")
        if main:
            print(f"[gem-bench] resumed at epoch {state.epoch}, step {state.global_step}")

    stop = _PreemptionFlag()
    train_t0 = time.time() - state.timings.get("train_s", 0.0)
    eval_s = state.timings.get("eval_s", 0.0)
    unwrapped = accelerator.unwrap_model
    # A run stopped right after its last step still owes that epoch's dev evaluation (batch > 0).
    while state.epoch < epochs and (state.global_step < total_steps or state.batch > 0):
        order = np.random.RandomState(model_seed + state.epoch).permutation(len(splits.train))
        model.train()
        progress = _progress(cfg, main, steps_per_epoch, state)
        while state.batch < steps_per_epoch and state.global_step < total_steps:
            batch = _batch(splits.train, order, state.batch, cfg.train.batch_size, accelerator)
            loss = scoring.training_loss(model, tokenizer, batch, cfg.task.max_length, task.kind)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {state.global_step}")
            extra = method.extra_loss(unwrapped(model))
            accelerator.backward(loss if extra is None else loss + extra)
            if cfg.train.grad_clip:
                accelerator.clip_grad_norm_(trainable, cfg.train.grad_clip)
            optimizer.step()
            method.on_step(unwrapped(model), state.global_step + 1)
            optimizer.zero_grad(set_to_none=True)
            state.batch += 1
            state.global_step += 1
            state.last_loss = float(loss.item())
            if progress:
                progress.set_postfix(loss=f"{state.last_loss:.4f}")
                progress.update(1)
            if stop.raised or (cfg.train.checkpoint_every and state.global_step % cfg.train.checkpoint_every == 0):
                _save(accelerator, directory, method, model, optimizer, state, best_state, plain_cfg, train_t0, eval_s)
            if stop.raised:
                stop.chain()
                raise Preempted(f"stopped by signal at step {state.global_step}; checkpoint saved")
        if progress:
            progress.close()
        if state.batch < steps_per_epoch:  # max_steps reached inside the epoch: it still counts as the last
            state.batch = steps_per_epoch
        t0 = time.time()
        dev_metrics, _ = evaluate(accelerator, model, tokenizer, task, splits.dev, cfg)
        eval_s += time.time() - t0
        entry = {"epoch": state.epoch + 1, "step": state.global_step, "train_loss": state.last_loss, "dev": dev_metrics}
        if hasattr(method, "figure2_stats"):
            for key, value in method.figure2_stats(unwrapped(model)).items():
                state.figure2.setdefault(key, []).append(value)
        state.history.append(entry)
        score = dev_metrics.get(cfg.task.metric, next(iter(dev_metrics.values()), 0.0))
        if score > state.best_dev:
            state.best_dev, state.best_epoch = score, state.epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in method.state_dict(unwrapped(model)).items()}
        if main and cfg.train.progress:
            print(f"[gem-bench] epoch {state.epoch + 1}: dev {cfg.task.metric}={score:.4f}")
        state.epoch += 1
        state.batch = 0
        _save(accelerator, directory, method, model, optimizer, state, best_state, plain_cfg, train_t0, eval_s)
    stop.restore()
    state.timings["train_s"] = round(time.time() - train_t0 - eval_s, 3)

    if best_state is not None:
        method.load_state_dict(unwrapped(model), best_state)
    t0 = time.time()
    test_metrics, shown = evaluate(accelerator, model, tokenizer, task, splits.test, cfg)
    eval_s += time.time() - t0
    state.timings["eval_s"] = round(eval_s, 3)
    saved = None
    if accelerator.is_main_process:
        saved = method.save(unwrapped(model), directory)
    summary = method.summary(unwrapped(model))
    return {
        "status": "finished",
        "metrics": {
            "main_metric": cfg.task.metric,
            "test": test_metrics,
            "dev": state.history[state.best_epoch - 1]["dev"] if state.best_epoch else {},
            "best_epoch": state.best_epoch,
            "history": state.history,
        },
        "params": {"trainable": trainable_count, "total": total_params, "ratio": trainable_count / total_params},
        "method_summary": summary,
        "figure2": state.figure2 or None,
        "data": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test), **splits.notes},
        "examples": shown,
        "saved": str(Path(saved).relative_to(directory)) if saved else None,
    }


def calibration_gradients(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer: Any, examples: list, names: list[str], cfg: DictConfig
) -> dict[str, torch.Tensor]:
    """Summed gradients of ``names`` over one pass of the training sample (PROTOCOL.md: batch size
    = training batch size, plain causal-LM loss on prompt + gold, dropout on, fp32).

    Batch i goes to process i mod world, and the sums are all-reduced, so every process
    selects the same mask, and the same one as a single process on the same data."""
    limit = cfg.train.calibration_examples or len(examples)
    examples = examples[:limit]
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"calibration: no parameters named {missing[:3]}")
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    sums = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    model.train()
    size = cfg.train.batch_size
    batches = [examples[i : i + size] for i in range(0, len(examples), size)]
    try:
        for index in range(accelerator.process_index, len(batches), accelerator.num_processes):
            batch = scoring.calibration_batch(tokenizer, batches[index], cfg.task.max_length)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads):
                sums[n] += g.float()
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
    if accelerator.num_processes > 1:
        sums = {n: accelerator.reduce(g, reduction="sum") for n, g in sums.items()}
    return sums


def _steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    batches = math.ceil(n / batch_size)
    # With several processes every step needs a batch on each; the incomplete tail is dropped.
    return batches if world == 1 else max(1, batches // world)


def _batch(examples: list, order: np.ndarray, step: int, size: int, accelerator: Accelerator) -> list:
    index = step * accelerator.num_processes + accelerator.process_index
    return [examples[i] for i in order[index * size : (index + 1) * size]]


def _progress(cfg: DictConfig, main: bool, total: int, state: LoopState):
    if not (main and cfg.train.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=state.batch, desc=f"epoch {state.epoch + 1}", leave=False)


def _save(accelerator, directory, method, model, optimizer, state, best_state, plain_cfg, train_t0, eval_s) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    state.timings["train_s"] = round(time.time() - train_t0, 3)
    state.timings["eval_s"] = round(eval_s, 3)
    loop = copy.deepcopy(state.__dict__)
    ckpt.save(
        directory,
        plain_cfg,
        method_state=method.state_dict(accelerator.unwrap_model(model)),
        optimizer=optimizer.state_dict(),
        rng={"torch": torch.get_rng_state()},
        loop=loop,
        best_state=best_state,
    )


class _PreemptionFlag:
    """SIGTERM / SIGUSR2 set a flag; the loop checkpoints at the next step boundary, then hands the
    signal to whoever held it before (submitit requeues the job on USR2)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.raised: int | None = None
        self.previous: dict[int, Any] = {}
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def chain(self) -> None:
        self.restore()
        previous = self.previous.get(self.raised)
        if callable(previous):
            previous(self.raised, None)
