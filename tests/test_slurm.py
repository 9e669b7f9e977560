"""Sweeps on a real Slurm cluster through the submitit launcher (configs/hydra/launcher/slurm.yaml).

CI starts a one-node cluster (partition ``debug``) with /work/shared/tools/slurm-local/start_slurm.sh;
without ``sinfo`` or an idle node these tests skip. Each test submits into its own fresh
folders: Slurm job ids restart when the cluster's state is wiped, and a reused submitit
folder would hand back an old job's result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT
from gem_bench import records

EXPERIMENT = "table3_slurm_smoke"  # the report's layout comes from the name's prefix (table3)
GRID = """\
# @package _global_
defaults:
  - override /profile: tiny
experiment_name: {name}
hydra:
  sweeper:
    params:
      model: tiny-llama
      task: sst2
      method: gem,random_mask
      seed: 28,210
"""
SWEEP_TIMEOUT_S = 240


def _slurm_ready() -> str | None:
    """None when a node of partition debug can take jobs now, else why not."""
    if shutil.which("sinfo") is None:
        return "no Slurm here (sinfo is not on PATH; CI starts one with start_slurm.sh)"
    try:
        states = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True, text=True,
                                timeout=15).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if not {"idle", "mix"} & set(states):
        return f"no idle node in partition debug (sinfo states: {states or 'none'})"
    return None


_NOT_READY = _slurm_ready()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_NOT_READY is not None, reason=_NOT_READY or "")]


def experiment_dir(root: Path) -> Path:
    """A configs folder with the smoke grid, added to Hydra's search path (the repo's configs stay as they are)."""
    configs = root / "configs"
    (configs / "experiment").mkdir(parents=True, exist_ok=True)
    (configs / "experiment" / f"{EXPERIMENT}.yaml").write_text(GRID.format(name=EXPERIMENT))
    return configs


def sweep_command(configs: Path, results: Path, sweep: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "gem_bench.cli", "-m",
        f"hydra.searchpath=[file://{configs}]", f"+experiment={EXPERIMENT}",
        "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=20",
        f"results_dir={results}", f"hydra.sweep.dir={sweep}", *overrides,
    ]  # fmt: skip


def submit(command: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = SWEEP_TIMEOUT_S) -> str:
    """The launcher blocks until every job is done; return its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the sweep did not finish in {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def job_logs(sweep: Path) -> list[str]:
    """The output of each Slurm job of a sweep (submitit's ``<job>_<task>_log.out`` and ``.err``)."""
    folders = sorted({log.parent for log in (sweep / ".submitit").rglob("*_log.*")})
    return ["".join(f.read_text() for f in sorted(folder.glob("*_log.*"))) for folder in folders]


def finished_records(results: Path) -> dict[Path, dict]:
    found = {p: records.read_record(p) for p in sorted((results / "runs").rglob(records.RECORD_NAME))}
    return {p: r for p, r in found.items() if r["status"] == "finished"}


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory):
    """The 4-run grid, submitted once for this module; timed."""
    root = tmp_path_factory.mktemp("slurm_sweep")
    configs, results = experiment_dir(root), root / "results"
    started = time.time()
    out = finish(submit(sweep_command(configs, results, root / "sweep")))
    print(f"slurm sweep of 4 runs: {time.time() - started:.1f} s")
    return root, configs, results, out


def test_sweep_runs_every_grid_point_and_reports(first_sweep):
    root, configs, results, out = first_sweep
    done = finished_records(results)
    assert len(done) == 4, out[-3000:]
    cells = {(r["run"]["method"], r["run"]["seed"]) for r in done.values()}
    assert cells == {("gem", 28), ("gem", 210), ("random_mask", 28), ("random_mask", 210)}
    assert {r["run"]["experiment"] for r in done.values()} == {EXPERIMENT}
    assert not list((results / "runs").rglob(records.LOCK_NAME))  # every job released its claim
    logs = job_logs(root / "sweep")
    assert len(logs) == 4 and all("[gem-bench] record:" in log for log in logs), logs

    report = subprocess.run(
        [sys.executable, "-m", "gem_bench.report", "--results", str(results), "--configs", str(configs),
         "--experiment", EXPERIMENT],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert (results / "tables" / f"{EXPERIMENT}.md").is_file()
    cells = pd.read_csv(results / "tables" / f"{EXPERIMENT}.csv")
    assert sorted(cells["method"]) == ["gem", "random_mask"]
    assert (cells["finished"] == 2).all() and (cells["failed"] == 0).all() and cells["complete"].all(), cells


def test_resubmitted_sweep_runs_only_missing_and_failed(first_sweep):
    root, configs, results, _ = first_sweep
    done = sorted(finished_records(results))
    assert len(done) == 4
    deleted, failed, *kept = done
    deleted.unlink()
    record = json.loads(failed.read_text())
    record["status"] = "failed"  # as a run that crashed writes it: it is retried
    failed.write_text(json.dumps(record))
    kept_mtimes = {p: p.stat().st_mtime_ns for p in kept}

    out = finish(submit(sweep_command(configs, results, root / "sweep2")))

    assert set(finished_records(results)) == set(done), out[-3000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept_mtimes  # finished runs were not run again
    logs = job_logs(root / "sweep2")
    assert sum("finished already, skipping" in log for log in logs) == 2, logs
    assert sum("[gem-bench] record:" in log for log in logs) == 2, logs


# USR2 (Slurm's warning before the time limit): the run checkpoints at the next step and hands the
# signal to submitit, which requeues the job. scontrol requeue (as preemption does) sends SIGTERM: the
# run checkpoints and exits; Slurm requeues the job itself.
PREEMPTIONS = {
    "usr2": (["scancel", "--signal=USR2"], "Caught signal SIGUSR2"),
    "requeue": (["scontrol", "requeue"], "[gem-bench] preempted: stopped by signal"),
}


@pytest.mark.parametrize("how", sorted(PREEMPTIONS))
def test_preempted_job_is_requeued_and_resumes(tmp_path, how):
    """A signalled run checkpoints and stops; the requeued job resumes from the checkpoint and finishes."""
    signal_command, expected = PREEMPTIONS[how]
    configs, results, sweep = experiment_dir(tmp_path), tmp_path / "results", tmp_path / "sweep"
    command = sweep_command(configs, results, sweep, "method=gem", "seed=28", "task.num_train=400",
                            "train.checkpoint_every=1")
    started = time.time()
    proc, job = submit(command), None
    try:
        lock = _wait_for_checkpoint(results, proc)
        job = json.loads(lock.read_text())["slurm_job"]
        assert job, "run.lock names no Slurm job"
        subprocess.run([*signal_command, job], check=True, timeout=30)
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        if job and proc.returncode != 0:  # the test failed: leave no job behind on the cluster
            subprocess.run(["scancel", job], timeout=30)
    print(f"run preempted by {how}, requeued and finished: {time.time() - started:.1f} s")

    done = finished_records(results)
    assert len(done) == 1, out[-3000:]
    record = next(iter(done.values()))
    assert [h["epoch"] for h in record["metrics"]["history"]] == [1, 2]
    log = "\n".join(job_logs(sweep))
    assert expected in log, log[-3000:]
    assert "[gem-bench] resumed at epoch" in log, log[-3000:]
    assert not list(lock.parent.glob("checkpoint-*"))  # removed once the run finished


def _wait_for_checkpoint(results: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The run's lock file, once the run has written its first checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for found in (results / "runs").rglob("checkpoint-*"):
            lock = found.parent / records.LOCK_NAME
            if found.is_dir() and lock.exists():
                return lock
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before a checkpoint appeared:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)  # an idle machine runs the tiny job in seconds
    pytest.fail(f"no checkpoint under {results} after {timeout} s")
