"""``make bench``: step time and peak memory of GEM against its baselines, in one run.

    python -m gem_bench.bench --name cpu-smollm2            the embedded default: 2 rounds x 2 steps
    python -m gem_bench.bench --name ci --short             the CI variant: 1 round x 1 step
    python -m gem_bench.bench --name gpu --model opt-1.3b --random-weights --dtype bfloat16 --device cuda

Every measurement runs in its own worker process (``--worker <variant>``), so that each
variant's peak RSS is its own; the workers print one JSON line on stdout. The parent runs
``rounds`` rounds, each one process per variant in a rotated order (interleaved, so that load
from other jobs on the machine hits every variant alike), and takes medians over all timed steps.

Workload of one training step: 16 sequences x 48 tokens of real SST-2 training examples
(8 examples x 2 candidates, prompts cut from the left to 48 tokens with the candidate) through
``scoring.training_loss`` (answer-only LM head), backward, clipping and the AdamW step.
GEM's extras: ``masking.select`` on real calibration gradients (the selection after the
gradients exist) and the bytes per entry of its saved delta file. Scoring: the same SST-2
test examples through ``scoring.score_candidates`` one pass per example vs per candidate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULT_PREFIX = "GEM_BENCH_RESULT "
# variant -> (method config, method overrides)
TRAIN_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("full", []),
    "lora": ("lora", []),
    "gem": ("gem", ["method.sparse_grad=sparse"]),
    "gem_dense": ("gem", ["method.sparse_grad=dense"]),
    "random_mask": ("random_mask", []),
    "topgrad_mask": ("topgrad_mask", []),
}
SCORING = "scoring"
WORKERS = (*TRAIN_VARIANTS, SCORING)
LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA r=8 (q,v), PEFT",
    "gem": "GEM, sparse gradient",
    "gem_dense": "GEM, dense reference gradient",
    "random_mask": "random masking (sparse)",
    "topgrad_mask": "top-gradient masking (sparse)",
}
# name -> (description, comparison, threshold)
TARGETS: dict[str, tuple[str, str, float]] = {
    "gem_over_lora_step": ("GEM / LoRA step time", "<=", 1.0),
    "gem_over_full_step": ("GEM / full fine-tuning step time", "<=", 0.65),
    "gem_over_lora_peak_memory": ("GEM / LoRA peak memory", "<=", 1.0),
    "selection_over_step": ("GEM selection / one GEM step", "<=", 1.0),
    "one_pass_speedup": ("scoring speed-up, one pass vs per candidate", ">=", 1.8),
    "delta_bytes_per_entry": ("delta file bytes per selected entry (without header)", "<=", 12.0),
}
FULL = dict(rounds=2, warmup=1, steps=2, scoring_examples=64, scoring_reps=2, selection_reps=3)
SHORT = dict(rounds=1, warmup=1, steps=1, scoring_examples=16, scoring_reps=1, selection_reps=2)
NUM_EXAMPLES, SEQ_TOKENS = 8, 48  # 8 SST-2 examples x 2 candidates = 16 sequences of 48 tokens
POOL = 2000  # training examples searched for prompts that fill 48 tokens


# ------------------------------------------------------------------------------------ worker


def _compose(args: argparse.Namespace, method: str, method_overrides: list[str]):
    from gem_bench.cli import compose

    overrides = [
        f"model={args.model}",
        "task=sst2",
        f"method={method}",
        *method_overrides,
        f"task.num_train={POOL}",
        "task.num_dev=0",
        f"task.num_test={args.scoring_examples}",
    ]
    if args.dtype:
        overrides.append(f"model.dtype={args.dtype}")
    return compose(overrides)


def _load_model(cfg, args: argparse.Namespace):
    """The configured model, or (``--random-weights``) random weights from its arch facts with
    the offline tiny tokenizer (its ids all lie within any real vocabulary)."""
    from gem_bench import models

    if args.random_weights:
        from gem_bench.testing import tiny_tokenizer

        tokenizer = tiny_tokenizer(cfg.model.arch.model_type)
        if cfg.model.arch.vocab_size < len(tokenizer):
            raise ValueError(f"--random-weights needs vocab_size >= {len(tokenizer)}, got {cfg.model.arch.vocab_size}")
        model = models.build_random_model(cfg.model)
    else:
        model, tokenizer = models.load_model_and_tokenizer(cfg.model, cache_dir=cfg.model_cache)
    return model.to(args.device), tokenizer


def _workload(tokenizer, train: list) -> list:
    """The first training examples whose prompt fills the 48-token sequence (else the longest)."""
    lengths = [len(tokenizer(ex.prompt).input_ids) for ex in train]
    long_enough = [ex for ex, n in zip(train, lengths) if n >= SEQ_TOKENS]
    if len(long_enough) >= NUM_EXAMPLES:
        return long_enough[:NUM_EXAMPLES]
    order = sorted(range(len(train)), key=lambda i: -lengths[i])
    return [train[i] for i in order[:NUM_EXAMPLES]]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed(fn, reps: int, device: str) -> list[float]:
    """Seconds of each of ``reps`` calls (the device synchronised around each)."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _delta_file_bytes(model) -> dict[str, int]:
    """Size of GEM's saved delta: total, safetensors header (8-byte length + JSON), entries."""
    from gem_bench import sparse

    with tempfile.TemporaryDirectory(prefix="gem-bench-delta-") as tmp:
        path = sparse.save_sparse_delta(model, Path(tmp) / "delta.safetensors")
        size = path.stat().st_size
        with path.open("rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
    entries = sum(m.indices.numel() for m in sparse.sparse_modules(model).values())
    return {"file_bytes": size, "header_bytes": header, "entries": entries}


def _train_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from gem_bench import masking, scoring, sparse
    from gem_bench.data import sample_splits
    from gem_bench.methods import METHODS
    from gem_bench.models import count_parameters
    from gem_bench.tasks import TASKS

    method_name, method_overrides = TRAIN_VARIANTS[variant]
    cfg = _compose(args, method_name, method_overrides)
    task = TASKS["sst2"](cfg.task)
    splits = sample_splits(task, cfg.task, cfg.data_root, cfg.seed)
    torch.manual_seed(0)
    model, tokenizer = _load_model(cfg, args)
    rss_loaded = _peak_rss_mib()
    examples = _workload(tokenizer, splits.train)
    total_params = count_parameters(model)

    grads: dict[str, torch.Tensor] = {}
    result: dict[str, Any] = {}

    def calibrate(net, names):
        batch = scoring.calibration_batch(tokenizer, examples, SEQ_TOKENS)
        t0 = time.perf_counter()
        grads.update(sparse.calibration_gradients(net, [batch], list(cfg.method.target_modules)))
        result["calibration_s"] = time.perf_counter() - t0
        return {name: grads[name] for name in names}

    method = METHODS[method_name](cfg.method, cfg.model, seed=cfg.seed)
    model = method.prepare(model, calibrate if method.needs_calibration else None)
    if variant == "gem":
        weights = {name: model.get_submodule(name.rpartition(".")[0]).weight.detach() for name in grads}

        def select() -> None:
            masking.select(weights, grads, total_params, cfg.method.ratio, "gem", cfg.method.allocation)

        result["selection_s"] = _timed(select, args.selection_reps, args.device)
    grads.clear()  # a real run drops the calibration gradients once the mask is chosen

    trainable = method.trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.method.lr, weight_decay=0.0)
    model.train()

    def step() -> None:
        loss = scoring.training_loss(model, tokenizer, examples, SEQ_TOKENS, "classification")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _timed(step, args.warmup, args.device)
    result["step_s"] = _timed(step, args.steps, args.device)
    result.update(
        peak_rss_mib=_peak_rss_mib(),
        rss_after_load_mib=rss_loaded,
        trainable=sum(p.numel() for p in trainable),
        total_params=total_params,
        sequences=sum(len(ex.candidates) for ex in examples),
        tokens_per_sequence=SEQ_TOKENS,
    )
    if args.device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if variant == "gem":
        result["delta"] = _delta_file_bytes(model)
    return result


def _scoring_worker(args: argparse.Namespace) -> dict[str, Any]:
    from gem_bench import scoring
    from gem_bench.data import sample_splits
    from gem_bench.tasks import TASKS

    cfg = _compose(args, "gem", [])
    task = TASKS["sst2"](cfg.task)
    examples = sample_splits(task, cfg.task, cfg.data_root, cfg.seed).test
    model, tokenizer = _load_model(cfg, args)
    batch = cfg.train.eval_batch_size
    out: dict[str, Any] = {"one_pass_s": [], "per_candidate_s": [], "examples": len(examples), "batch_size": batch}
    scores = {}
    for one_pass in (True, False):  # warm-up on a few examples: first-call costs are not scoring's
        scoring.score_candidates(model, tokenizer, examples[:4], batch, cfg.task.max_length, one_pass)
    for _ in range(args.scoring_reps):  # alternate, so both paths see the same machine load
        for key, one_pass in (("one_pass_s", True), ("per_candidate_s", False)):

            def run(one_pass=one_pass, key=key) -> None:
                scores[key] = scoring.score_candidates(model, tokenizer, examples, batch, cfg.task.max_length, one_pass)

            out[key] += _timed(run, 1, args.device)
    diffs = [abs(a - b) for x, y in zip(scores["one_pass_s"], scores["per_candidate_s"]) for a, b in zip(x, y)]
    out["max_abs_score_diff"] = max(diffs)
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def worker_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    result = _scoring_worker(args) if args.worker == SCORING else _train_worker(args.worker, args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------ parent


def _worker_command(variant: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "gem_bench.bench", "--worker", variant, "--model", args.model]
    for flag in ("threads", "warmup", "steps", "scoring_examples", "scoring_reps", "selection_reps", "device"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.random_weights:
        cmd.append("--random-weights")
    return cmd


def run_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One worker process; its JSON result (raises with the worker's stderr if it failed)."""
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(_worker_command(variant, args), capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"bench worker {variant!r} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": args.device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(raw: dict[str, list[dict]], cuda: bool) -> dict[str, Any]:
    """Medians per variant, the target ratios and whether each is met."""
    memory_key = "peak_cuda_mib" if cuda else "peak_rss_mib"
    variants = {}
    for variant, runs in raw.items():
        if variant == SCORING:
            continue
        steps = [t for run in runs for t in run["step_s"]]
        variants[variant] = {
            "step_s": statistics.median(steps),
            "min_step_s": min(steps),  # the spread shows how much other load on the machine moved the timings
            "max_step_s": max(steps),
            "peak_rss_mib": statistics.median(run["peak_rss_mib"] for run in runs),
            "peak_memory_mib": statistics.median(run[memory_key] for run in runs),
            "trainable": runs[0]["trainable"],
        }
    step = {v: s["step_s"] for v, s in variants.items()}
    memory = {v: s["peak_memory_mib"] for v, s in variants.items()}
    gem_runs = raw.get("gem", [])
    selection = statistics.median(t for run in gem_runs for t in run["selection_s"]) if gem_runs else None
    delta = gem_runs[0]["delta"] if gem_runs else None
    scoring_runs = raw.get(SCORING, [])
    scoring = None
    if scoring_runs:
        scoring = {
            key: statistics.median(t for run in scoring_runs for t in run[key]) for key in ("one_pass_s", "per_candidate_s")
        }
        scoring["examples"] = scoring_runs[0]["examples"]
    values = {
        "gem_over_lora_step": _ratio(step.get("gem"), step.get("lora")),
        "gem_over_full_step": _ratio(step.get("gem"), step.get("full")),
        "gem_over_lora_peak_memory": _ratio(memory.get("gem"), memory.get("lora")),
        "selection_over_step": _ratio(selection, step.get("gem")),
        "one_pass_speedup": _ratio(scoring["per_candidate_s"], scoring["one_pass_s"]) if scoring else None,
        "delta_bytes_per_entry": (
            _ratio(delta["file_bytes"] - delta["header_bytes"], delta["entries"]) if delta else None
        ),
    }
    targets = {}
    for key, (description, op, threshold) in TARGETS.items():
        value = values[key]
        met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        targets[key] = {"description": description, "value": value, "target": f"{op} {threshold:g}", "met": met}
    return {"variants": variants, "selection_s": selection, "delta": delta, "scoring": scoring, "ratios": targets}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    s, m = report["summary"], report["machine"]
    memory = "peak GPU memory (MiB)" if report["settings"]["device"].startswith("cuda") else "peak RSS (MiB)"
    w = report["workload"]
    lines = [
        f"# Speed benchmark `{report['name']}`",
        "",
        f"{report['settings']['model']} ({report['settings']['dtype']}, {report['settings']['device']}), "
        f"{w['sequences']} sequences x {w['tokens_per_sequence']} tokens of SST-2, AdamW step included; "
        f"{m['threads']} threads on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {m['date']}. "
        f"Medians over {report['settings']['rounds']} interleaved round(s) x {report['settings']['steps']} timed step(s), "
        "one process per variant and round.",
        "",
        f"| variant | trainable | s/step | min-max s/step | {memory} |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, v in s["variants"].items():
        spread = f"{_fmt(v['min_step_s'], 2)}-{_fmt(v['max_step_s'], 2)}"
        lines.append(
            f"| {LABELS[variant]} | {v['trainable']:,} | {_fmt(v['step_s'])} | {spread} | {v['peak_memory_mib']:.0f} |"
        )
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for r in s["ratios"].values():
        met = "n/a" if r["met"] is None else ("met" if r["met"] else "not met")
        lines.append(f"| {r['description']} | {_fmt(r['value'])} | {r['target']} | {met} |")
    if s["scoring"]:
        sc = s["scoring"]
        lines += [
            "",
            f"Scoring {sc['examples']} SST-2 test examples: one pass {_fmt(sc['one_pass_s'])} s, "
            f"per candidate {_fmt(sc['per_candidate_s'])} s. GEM selection (masking.select on real "
            f"calibration gradients): {_fmt(s['selection_s'])} s.",
        ]
    if s["delta"]:
        d = s["delta"]
        lines.append(f"GEM delta file: {d['entries']:,} entries, {d['file_bytes']:,} bytes, header {d['header_bytes']:,} bytes.")
    lines += ["", "Command:", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> dict[str, Any]:
    order = list(args.variants) + ([SCORING] if SCORING not in args.variants and not args.no_scoring else [])
    raw: dict[str, list[dict]] = {v: [] for v in order}
    t0 = time.time()
    for r in range(args.rounds):
        shift = r % len(order)
        for variant in order[shift:] + order[:shift]:  # rotate: no variant always runs first
            raw[variant].append(run_worker(variant, args))
            print(f"[bench] round {r + 1}/{args.rounds} {variant}: done ({time.time() - t0:.0f} s)", flush=True)
    trained = [runs[0] for v, runs in raw.items() if v != SCORING and runs]
    report = {
        "name": args.name,
        "command": "python -m gem_bench.bench " + shlex.join(args.argv),
        "settings": {
            "model": args.model,
            "dtype": args.dtype or "float32",
            "device": args.device,
            "random_weights": args.random_weights,
            "short": args.short,
            **{k: getattr(args, k) for k in ("rounds", "warmup", "steps", "scoring_examples", "scoring_reps", "selection_reps", "threads")},
        },
        "workload": {
            "task": "sst2",
            "examples": NUM_EXAMPLES,
            "sequences": trained[0]["sequences"] if trained else 2 * NUM_EXAMPLES,
            "tokens_per_sequence": SEQ_TOKENS,
            "loss": "scoring.training_loss (classification: CE over mean candidate log-probs, answer-only head)",
            "optimizer": "AdamW, grad clipping 1.0",
        },
        "machine": _machine(args),
        "wall_s": round(time.time() - t0, 1),
        "summary": summarise(raw, args.device.startswith("cuda")),
        "raw": raw,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gem_bench.bench", description=__doc__.split("\n")[0])
    p.add_argument("--name", default="bench", help="output name: results/bench/<name>.{json,md}")
    p.add_argument("--short", action="store_true", help="the CI variant: fewer rounds, steps and examples")
    p.add_argument("--model", default="smollm2-135m", help="a configs/model name (default: the embedded SmolLM2)")
    p.add_argument("--random-weights", action="store_true", help="random weights from the model's arch facts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process")
    p.add_argument("--scoring-examples", type=int, default=None)
    p.add_argument("--scoring-reps", type=int, default=None)
    p.add_argument("--selection-reps", type=int, default=None)
    p.add_argument("--variants", default=",".join(TRAIN_VARIANTS), help=f"comma list of {', '.join(TRAIN_VARIANTS)}")
    p.add_argument("--no-scoring", action="store_true", help="skip the scoring comparison")
    p.add_argument("--out", default="results/bench", help="output folder")
    p.add_argument("--worker", choices=WORKERS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    for key, value in (SHORT if args.short else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in TRAIN_VARIANTS]
    if unknown or not args.variants:
        p.error(f"unknown --variants {unknown or '(empty)'}; valid choices: {', '.join(TRAIN_VARIANTS)}")
    if args.threads < 1 or args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--threads, --rounds and --steps must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
