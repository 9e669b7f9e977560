"""Atomic checkpoints inside a run folder, so that a killed or preempted run resumes exactly.

Each checkpoint is a folder ``checkpoint-<step>`` written as ``.checkpoint-<step>.tmp`` and
renamed when complete (a rename is atomic), so any ``checkpoint-<step>`` folder is whole; the
previous one is deleted only after the new one exists. Tensors go through ``torch.save`` and
come back with ``torch.load(weights_only=True)``; everything else is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gem_bench.errors import ConfigError
from gem_bench.records import variant_name

PREFIX = "checkpoint-"


def _complete(directory: Path) -> list[Path]:
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save(directory: Path, cfg: dict[str, Any], *, method_state, optimizer, rng, loop, best_state) -> Path:
    step = int(loop["global_step"]) * 1000 + int(loop["epoch"])  # epoch-end saves sort after mid-epoch ones
    final = directory / f"{PREFIX}{step:012d}"
    if final.exists():
        return final
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {"method_state": method_state, "optimizer": optimizer, "rng": rng, "best_state": best_state}
    torch.save(tensors, tmp / "state.pt")
    meta = {"variant": variant_name(cfg), "seed": cfg["seed"], "loop": loop}
    (tmp / "meta.json").write_text(json.dumps(meta, default=float))
    for path in (tmp / "state.pt", tmp / "meta.json"):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, final)
    for older in _complete(directory)[:-1]:
        shutil.rmtree(older, ignore_errors=True)
    return final


def load(directory: Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The newest complete checkpoint, or None. A checkpoint written by another config is refused."""
    if not directory.exists():
        return None
    for leftover in directory.glob(f".{PREFIX}*.tmp-*"):  # a save that was killed half-way
        shutil.rmtree(leftover, ignore_errors=True)
    found = _complete(directory)
    if not found:
        return None
    newest = found[-1]
    meta = json.loads((newest / "meta.json").read_text())
    expected = variant_name(cfg)
    if meta.get("variant") != expected or meta.get("seed") != cfg["seed"]:
        raise ConfigError(
            f"checkpoint {newest} was written by another config (variant {meta.get('variant')}, seed "
            f"{meta.get('seed')}; this run is {expected}, seed {cfg['seed']}); delete it or use that config"
        )
    state = torch.load(newest / "state.pt", weights_only=True)
    return {**state, "loop": meta["loop"]}


def remove(directory: Path) -> None:
    for path in _complete(directory):
        shutil.rmtree(path, ignore_errors=True)
