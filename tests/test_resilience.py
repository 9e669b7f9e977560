"""Runs that survive: SIGKILL at random points then rerun ends with the uninterrupted record;
two concurrent sweeps over one grid run every cell once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import ROOT, compose, run_cli
from gem_bench import records, train

# tiny-opt has dropout, so a resumed run is only identical if the RNG state is restored too.
KILL_RUN = [
    "model=tiny-opt", "task=sst2", "method=gem", "method.ratio=0.01", "profile=tiny",
    "task.num_train=64", "train.checkpoint_every=1",  # 2 epochs x 16 steps, a checkpoint after each
]
COMPARED = ("metrics", "params", "method_summary", "figure2", "data", "examples", "status", "failure")


def _start(results: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gem_bench.cli", *KILL_RUN, f"results_dir={results}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _checkpoints(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("checkpoint-*")} if folder.exists() else set()


def _run_with_kills(results: Path, kills: int, rng: random.Random) -> tuple[int, int]:
    """Kill the run ``kills`` times, each after a random number of new checkpoints plus a random
    delay (so some kills land mid-step or mid-save), rerunning each time; then let it finish."""
    folder = train.run_location(compose(*KILL_RUN, f"results_dir={results}"), "gem")
    done = resumes = 0
    while True:
        proc = _start(results)
        if done < kills:
            seen = _checkpoints(folder)
            wait_for = rng.randint(1, 3)
            while proc.poll() is None and len(_checkpoints(folder) - seen) < wait_for:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.02))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                resumes += "resumed at" in proc.communicate()[0]
                done += 1
                continue
        out, _ = proc.communicate(timeout=600)
        resumes += "resumed at" in out
        if proc.returncode == 0 and records.finished(folder):
            return done, resumes
        assert proc.returncode == 0, out


def _result(results: Path) -> tuple[dict, dict]:
    """The record's content and the delta file's tensors and metadata (safetensors writes its
    metadata map in no fixed order, so the bytes of two equal files may differ)."""
    folder = train.run_location(compose(*KILL_RUN, f"results_dir={results}"), "gem")
    record = records.read_record(folder / records.RECORD_NAME)
    with safe_open(str(folder / record["saved"]), "pt") as handle:
        delta = {k: handle.get_tensor(k).tolist() for k in handle.keys()}
        delta["__metadata__"] = handle.metadata()
    return {k: record.get(k) for k in COMPARED}, delta


def _fault_injection(tmp_path: Path, kills: int, seed: int) -> None:
    reference = _start(tmp_path / "clean")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    killed, resumes = _run_with_kills(tmp_path / "killed", kills, random.Random(seed))
    assert killed >= 1 and resumes >= 1
    expected, expected_delta = _result(tmp_path / "clean")
    got, got_delta = _result(tmp_path / "killed")
    assert got == expected
    assert got_delta == expected_delta
    folder = train.run_location(compose(*KILL_RUN, f"results_dir={tmp_path / 'killed'}"), "gem")
    assert not _checkpoints(folder), "a finished run removes its checkpoints"
    print(f"fault injection: {killed} kills, {resumes} resumes, identical record and delta")


def test_sigkill_at_random_points_then_rerun_gives_the_same_record(tmp_path, mirror):
    _fault_injection(tmp_path, kills=3, seed=1)


@pytest.mark.slow
def test_twenty_kills(tmp_path, mirror):
    _fault_injection(tmp_path, kills=20, seed=2)


def test_two_concurrent_sweeps_run_each_cell_once(tmp_path, mirror):
    grid = ["-m", "model=tiny-llama", "profile=tiny", "method=gem,random_mask", "seed=28,210", f"results_dir={tmp_path}"]
    sweeps = [
        subprocess.Popen(
            [sys.executable, "-m", "gem_bench.cli", *grid, f"hydra.sweep.dir={tmp_path}/sweep{i}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in sweeps]
    assert all(p.returncode == 0 for p in sweeps), outputs
    ran = sum(out.count("[gem-bench] record:") for out in outputs)
    found = sorted((tmp_path / "runs").rglob(records.RECORD_NAME))
    assert len(found) == 4
    assert all(records.read_record(path)["status"] == "finished" for path in found)
    assert ran == 4, outputs  # every cell ran exactly once across the two sweeps
    assert not list((tmp_path / "runs").rglob(records.LOCK_NAME))
