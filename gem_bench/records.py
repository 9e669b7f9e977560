"""Run records: one JSON file per run at a stable path, written atomically, and run claims.

A run lives in ``<results>/runs/<model>/<task>/<method>/<variant>/seed<k>/``:
``record.json`` (finished or failed), the trained update (``delta.safetensors`` or the
method's own files), ``checkpoint/`` while it runs, and ``run.lock`` while a process owns it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from gem_bench.errors import GemBenchError

RECORD_SCHEMA = 1
RECORD_NAME = "record.json"
LOCK_NAME = "run.lock"

# Keys that change where results go or how fast they come, not what is computed.
_NOT_IN_VARIANT = {"progress", "threads", "checkpoint_every", "keep_checkpoints"}


def variant_name(cfg: dict[str, Any]) -> str:
    """``<profile>-<hash>``: a stable name for everything that shapes the result except the seed.

    The hash covers the model, task, method and training settings (not paths or display
    options), so two configs that would compute different results never share a folder."""
    content = {
        "model": {k: v for k, v in cfg["model"].items() if k not in {"path"}},
        "task": cfg["task"],
        "method": cfg["method"],
        "train": {k: v for k, v in cfg["train"].items() if k not in _NOT_IN_VARIANT},
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return f"{cfg.get('profile', 'paper')}-{digest[:8]}"


def run_dir(results_dir: str | Path, model: str, task: str, method: str, variant: str, seed: int) -> Path:
    return Path(results_dir) / "runs" / model / task / method / variant / f"seed{seed}"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False, default=_json_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RecordError(GemBenchError):
    pass


def read_record(path: Path) -> dict[str, Any]:
    """Parse a record; a file that does not parse is an error that names it (never skipped)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"record {path} does not parse: {exc}") from exc
    if not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA or "status" not in record:
        raise RecordError(f"record {path} is not a gem-bench record (schema {RECORD_SCHEMA} with a status)")
    return record


def finished(directory: Path) -> bool:
    """True when the run folder holds a parsing record with status 'finished' (failed runs are retried)."""
    path = directory / RECORD_NAME
    if not path.exists():
        return False
    try:
        return read_record(path)["status"] == "finished"
    except RecordError:
        return False


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "gem-bench"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "git_commit": git_commit(), "host": socket.gethostname()}


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------
# Claims: an exclusive lock file so that two sweeps over one grid run each cell once.


class RunBusy(GemBenchError):
    """Another live process owns this run."""


@dataclass
class RunClaim:
    path: Path

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunClaim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _owner_alive(owner: dict[str, Any]) -> bool:
    """Same host: alive iff the PID exists. Another host: its processes cannot be seen from
    here, so the lock stands (a requeued Slurm job reclaims its own lock by job id)."""
    if owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", -1))
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except OSError as exc:
            return exc.errno == errno.EPERM
        return True
    return True


def claim_run(directory: Path) -> RunClaim:
    """Create ``run.lock`` exclusively (O_EXCL works on local disks and NFSv3+), naming host and PID.

    A lock whose owner is gone (same host, dead PID; or the same Slurm job id being requeued)
    is stale and taken over. Raises RunBusy when a live process owns the run."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}  # being written this instant, or garbage from a crash: look again
                if _lock_age(path) < 5:
                    continue
            same_job = owner.get("slurm_job") and owner.get("slurm_job") == me["slurm_job"]
            if owner and _owner_alive(owner) and not same_job:
                raise RunBusy(f"run {directory} is being run by pid {owner.get('pid')} on {owner.get('host')}")
            path.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        return RunClaim(path)
    raise RunBusy(f"could not claim run {directory}: its lock keeps changing")


def _lock_age(path: Path) -> float:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
