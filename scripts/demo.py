"""The README's demo: SmolLM2-135M (embedded, offline) on SST-2 with the CPU profile,
GEM vs random masking vs full fine-tuning, then a small table from the three records.

    make demo            (or: .venv/bin/python scripts/demo.py [extra hydra overrides])
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["gem", "random_mask", "full"]
# Its own results folder (git-ignored), so that the demo trains even where results/runs already
# holds the same runs from the table3_cpu sweep; a second `make demo` only prints the table.
RESULTS = ROOT / "outputs" / "demo"


def main() -> int:
    extra = sys.argv[1:]
    started = time.time()
    command = [
        sys.executable, "-m", "gem_bench.cli", "-m",
        "model=smollm2-135m", "task=sst2", f"method={','.join(METHODS)}", "profile=cpu",
        f"results_dir={RESULTS}", "experiment_name=demo", "hydra.sweep.dir=outputs/demo/sweep", *extra,
    ]
    print("$ gem-bench", " ".join(command[3:]), flush=True)
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        return result.returncode
    rows = []
    for method in METHODS:
        found = sorted((RESULTS / "runs" / "smollm2-135m" / "sst2" / method).glob("cpu-*/seed28/record.json"))
        if not found:
            rows.append((method, "missing", "", "", ""))
            continue
        record = json.loads(found[-1].read_text())
        if record["status"] != "finished":
            rows.append((method, "failed: " + record["failure"]["message"][:60], "", "", ""))
            continue
        t = record["timings"]
        rows.append((
            method,
            f"{100 * record['metrics']['test']['accuracy']:.2f}",
            f"{100 * record['params']['ratio']:.3f}%",
            f"{t.get('calibration_s', 0):.0f}",
            f"{t.get('train_s', 0):.0f} / {t.get('eval_s', 0):.0f}",
        ))
    header = ("method", "SST-2 test acc (%)", "trainable", "calibration s", "train / eval s")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    print(f"demo wall time: {time.time() - started:.0f} s (records under {RESULTS.relative_to(ROOT)}/runs/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
