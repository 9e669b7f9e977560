"""A real 2-process CPU run (``accelerate launch``) against the same run in one process.

The calibration gradients are sharded over processes and all-reduced, so both runs must
select the same mask; only the main process writes the record."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gem_bench import records
from conftest import ROOT, tiny

TIMEOUT_S = 300  # a hang (a process waiting on a collective the other never joins) fails the test


def launch(results: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    """``gem-bench`` on ``processes`` CPU processes through ``accelerate launch``."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        launcher.append("--multi_gpu")  # accelerate's name for "distributed data parallel", CPU included
    args = tiny(results, "task=sst2", *overrides, f"hydra.run.dir={results}/hydra")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "-m", "gem_bench.cli", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def only_record(results: Path) -> tuple[Path, dict]:
    found = list((results / "runs").rglob(records.RECORD_NAME))
    assert len(found) == 1, found
    return found[0].parent, records.read_record(found[0])


def mask_of(run_dir: Path) -> dict:
    tensors = load_file(run_dir / "sparse_delta.safetensors")
    indices = {name: t for name, t in tensors.items() if name.endswith(".indices")}
    assert indices, f"no mask indices in {sorted(tensors)}"
    return indices


@pytest.mark.parametrize("method", ["gem", pytest.param("random_mask", marks=pytest.mark.slow)])
def test_two_processes_select_the_mask_of_one(tmp_path, mirror, method):
    overrides = (f"method={method}", "method.ratio=0.01")
    two = launch(tmp_path / "two", 2, *overrides)
    launch(tmp_path / "one", 1, *overrides)

    two_dir, two_record = only_record(tmp_path / "two")
    one_dir, one_record = only_record(tmp_path / "one")
    assert two_record["status"] == one_record["status"] == "finished"
    assert two.stdout.count("[gem-bench] record:") == 1  # the second process wrote nothing
    assert not list(two_dir.glob(f".{records.RECORD_NAME}.*"))  # no half-written record left behind
    assert not (two_dir / records.LOCK_NAME).exists()

    two_mask, one_mask = mask_of(two_dir), mask_of(one_dir)
    assert two_mask.keys() == one_mask.keys()
    for name, index in one_mask.items():
        assert index.numel() > 0, name
        assert two_mask[name].equal(index), f"{name}: the 2-process run selected another mask"
    # Two processes take half the steps per epoch (each step is one batch per process).
    steps = lambda record: record["metrics"]["history"][-1]["step"]  # noqa: E731
    assert steps(two_record) * 2 == steps(one_record)
