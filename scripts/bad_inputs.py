"""Print the README's bad-input table: each bad input, run for real, and the first line of its error.

    .venv/bin/python scripts/bad_inputs.py > /tmp/bad_inputs.md      (tests/test_bad_input.py checks each row)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("GEM_BENCH_DATA", ROOT.parent / "shared" / "data" / "hub"))
TINY = ["model=tiny-llama", "profile=tiny", "train.max_steps=1"]


def gem_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GEM_BENCH_DATA": str(MIRROR)}
    return subprocess.run([sys.executable, "-m", "gem_bench.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def summarise(stderr: str) -> str:
    """The error in one line: ours is one line already; Hydra's composition errors say what in the
    first line and the key (``Key 'x' not in ...``) or the valid choices on the lines after."""
    raw = [l for l in stderr.splitlines() if l.strip()]
    if not raw:
        return "(no error)"
    first = raw[0].strip()
    if first.startswith("gem-bench: error:"):
        return first
    keys = [l.strip() for l in raw if l.strip().startswith("Key '") or "could not be converted" in l]
    listed = any("Available options" in l for l in raw)
    choices = []
    for l in raw[2:] if listed else []:
        if not l.startswith("\t"):
            break  # Hydra's config search path follows the choices
        if not l.strip().endswith("_schema"):
            choices.append(l.strip())
    if choices:
        return f"{first}; available: {', '.join(choices)}"
    return " ".join([first, *keys[:1]])


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gem-bench-bad-"))
    results = tmp / "results"
    assert gem_bench(*TINY, f"results_dir={results}").returncode == 0  # one finished run to leave untouched
    no_weights = tmp / "opt-no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "opt"}))
    broken = tmp / "mirror" / "nyu-mll" / "glue" / "sst2"
    broken.mkdir(parents=True)
    shutil.copy(MIRROR / "nyu-mll/glue/sst2/validation.jsonl", broken)
    rows = (MIRROR / "nyu-mll/glue/sst2/train.jsonl").read_text().splitlines()[:50]
    rows[6] = '{"sentence": "a broken row", "label": '
    (broken / "train.jsonl").write_text("\n".join(rows) + "\n")
    run_folder = next(results.glob("runs/*/*/*/*/seed28"))
    stale = run_folder / "checkpoint-000000001000"
    stale.mkdir()
    (stale / "meta.json").write_text(json.dumps({"variant": "tiny-00000000", "seed": 28, "loop": {}}))
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")

    cases = [
        ("unknown model", ["model=gpt-5"]),
        ("unknown task", ["task=imagenet"]),
        ("unknown method", ["method=prefix"]),
        ("unknown launcher", ["-m", "hydra/launcher=kubernetes"]),
        ("typo'd config key", ["method.rato=0.01"]),
        ("wrong type", ["train.batch_size=eight"]),
        ("ratio of 0", [*TINY, "method.ratio=0"]),
        ("ratio of 1.5", [*TINY, "method.ratio=1.5"]),
        ("negative learning rate", [*TINY, "method.lr=-1e-5"]),
        ("missing data root", [*TINY, "data_root=/nonexistent/mirror", "rerun=true"]),
        ("malformed JSONL row", [*TINY, f"data_root={tmp / 'mirror'}", "rerun=true"]),
        ("model folder that does not exist", ["model=opt-125m", "model.path=/nonexistent/opt", "profile=tiny"]),
        ("model folder without weights", ["model=opt-125m", f"model.path={no_weights}", "profile=tiny"]),
        ("checkpoint from another config", [*TINY, "rerun=true"]),
        ("unwritable results folder", [*TINY, f"results_dir={blocker}"]),
    ]
    print("| bad input | command | first line of the error (exit code) |")
    print("|---|---|---|")
    for name, args in cases:
        extra = [] if any(a.startswith("results_dir=") for a in args) else [f"results_dir={results}"]
        result = gem_bench(*args, *extra)
        line = summarise(result.stderr)
        shown = " ".join(a for a in args if a not in TINY and not a.startswith(str(tmp)))
        line = line.replace(str(tmp), "<tmp>").replace("|", "\\|")
        print(f"| {name} | `gem-bench {shown.replace(str(tmp), '<tmp>')}` | {line} ({result.returncode}) |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
