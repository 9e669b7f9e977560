"""Benchmark rows from the Hugging Face Hub or a local mirror, and PROTOCOL.md's sampling.

A local mirror holds ``<root>/<hub id>/<config>/<split>.jsonl`` with the Hub's rows and field
names; it is read through the same ``datasets`` code path as the Hub (the ``json`` builder), so
the rows a task sees are typed the same way. The mirror root is the ``data_root`` argument, else
the ``GEM_BENCH_DATA`` environment variable; with neither, rows come from the Hub.

Sampling (MeZO's and the released GEM code's ``sample_subset``): a permutation of the train split
under the train-set seed; the first ``num_train + num_dev`` rows are kept and dev is the last
``num_dev`` of them. Test is the whole test split, or, when ``num_test`` is set, the first
``num_test`` rows of a permutation of the test split under the same seed (the released code's
``num_eval``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from gem_bench.config import TaskConfig
from gem_bench.errors import ConfigError, DataError
from gem_bench.tasks.base import Example, Task

DATA_ENV = "GEM_BENCH_DATA"
DEFAULT_CONFIG = "default"  # the Hub's name for a dataset's only config
_POINT_ELSEWHERE = f"point elsewhere with {DATA_ENV}=<root> or data_root=<root>"


def resolve_data_root(data_root: str | os.PathLike | None) -> Path | None:
    """The mirror root: the argument, else ``$GEM_BENCH_DATA``, else None (the Hub)."""
    root = data_root or os.environ.get(DATA_ENV) or None
    return Path(root).expanduser() if root else None


def mirror_path(root: str | os.PathLike, hub_id: str, config: str | None, split: str) -> Path:
    return Path(root) / hub_id / (config or DEFAULT_CONFIG) / f"{split}.jsonl"


def load_rows(
    hub_id: str,
    config: str | None,
    split: str,
    data_root: str | os.PathLike | None = None,
    task_name: str | None = None,
) -> list[dict[str, Any]]:
    """All rows of one split, as plain dicts, from the local mirror if one is set, else the Hub."""
    root = resolve_data_root(data_root)
    label = task_name or hub_id
    if root is None:
        return _load_hub(hub_id, config, split, label)
    return _load_local(mirror_path(root, hub_id, config, split), label)


def _load_hub(hub_id: str, config: str | None, split: str, task: str) -> list[dict[str, Any]]:
    try:
        dataset = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # offline, unknown id/config/split: one line for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"task {task}: cannot load {hub_id} (config {config}, split {split}) from the "
            f"Hugging Face Hub ({type(err).__name__}: {reason}); to read a local mirror "
            f"<root>/<hub id>/<config>/<split>.jsonl, {_POINT_ELSEWHERE}"
        ) from err
    return dataset.to_list()


def _load_local(path: Path, task: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(_missing_message(path, task))
    # A throw-away cache: the json builder takes well under a second even for SST-2's 67k
    # rows, and nothing is left in the repository or in ~/.cache.
    with tempfile.TemporaryDirectory(prefix="gem-bench-") as cache_dir, _no_progress_bars():
        try:
            dataset = datasets.load_dataset(
                "json", data_files=str(path), split="train", cache_dir=cache_dir
            )
        except Exception as err:  # datasets' message gives a chunk-relative row; find the line
            raise DataError(_malformed_message(path, task, err)) from err
        return dataset.to_list()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets' "Generating train split" bar is noise for a local file (and misnames it)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _missing_message(path: Path, task: str) -> str:
    message = f"task {task}: data file {path} not found"
    split_dir, hub_dir = path.parent, path.parent.parent
    if split_dir.is_dir():
        splits = sorted(p.stem for p in split_dir.glob("*.jsonl"))
        message += f"; splits there: {', '.join(splits) or 'none'}"
    elif hub_dir.is_dir():
        configs = sorted(p.name for p in hub_dir.iterdir() if p.is_dir())
        message += f"; configs there: {', '.join(configs) or 'none'}"
    return f"{message}; {_POINT_ELSEWHERE}"


def _malformed_message(path: Path, task: str, err: Exception) -> str:
    rows = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # datasets skips blank lines too
            try:
                row = json.loads(line)
            except json.JSONDecodeError as bad:
                where = f"{path} line {number}"
                return f"task {task}: {where} is not valid JSON ({bad.msg}, column {bad.colno})"
            if not isinstance(row, dict):
                kind = type(row).__name__
                return f"task {task}: {path} line {number} is a JSON {kind}, not an object"
            rows += 1
    if rows == 0:
        return f"task {task}: {path} has no rows"
    cause = str(err.__cause__ or err).strip().splitlines()
    reason = f"{type(err).__name__}: {cause[0] if cause else ''}"
    return f"task {task}: datasets cannot read {path}: {reason}"


@dataclass
class Splits:
    """Rendered examples of one run's three sets, and the facts of how they were drawn."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: dict[str, Any] = field(default_factory=dict)


def permutation(n: int, seed: int) -> np.ndarray:
    """``np.random.seed(seed); np.random.permutation(n)`` as MeZO/GEM draw it, without touching
    numpy's global state (RandomState(seed) is the same legacy generator)."""
    return np.random.RandomState(seed).permutation(n)


def sample_splits(
    task: Task, task_cfg: TaskConfig, data_root: str | os.PathLike | None, train_seed: int
) -> Splits:
    """Train/dev from the train split and test from the test split, as PROTOCOL.md samples them.

    Where the mirror lacks the train split and ``task_cfg.carve_train_from_test`` is set,
    train/dev and test are carved disjointly out of the test split: a permutation under the seed,
    train+dev its first ``num_train + num_dev`` rows (dev the last ``num_dev``), test the rest
    (its first ``num_test`` when set); ``notes["carved_from_test"]`` says so.
    """
    cfg = task_cfg
    n_keep = cfg.num_train + cfg.num_dev
    if cfg.num_train < 1 or cfg.num_dev < 0 or (cfg.num_test is not None and cfg.num_test < 1):
        raise ConfigError(
            f"task {cfg.name}: num_train={cfg.num_train}, num_dev={cfg.num_dev}, "
            f"num_test={cfg.num_test}; need num_train >= 1, num_dev >= 0, num_test >= 1 or null"
        )
    root = resolve_data_root(data_root)
    carve = (
        cfg.carve_train_from_test
        and root is not None
        and not mirror_path(root, cfg.hub_id, cfg.hub_config, cfg.train_split).is_file()
    )
    source = str(root) if root is not None else "hub"
    notes: dict[str, Any] = {
        "train_seed": train_seed,
        "data_source": source,
        "carved_from_test": carve,
    }

    test_rows = load_rows(cfg.hub_id, cfg.hub_config, cfg.test_split, root, cfg.name)
    if carve:
        train_rows = test_rows
        kept, test_idx, notes["carve"] = _carve(len(test_rows), cfg, train_seed)
        test_sampling = "carved (see carve)"
    else:
        train_rows = _load_train(cfg, root)
        if n_keep > len(train_rows):
            raise ConfigError(
                f"task {cfg.name}: num_train+num_dev={n_keep} exceeds the {len(train_rows)} rows "
                f"of the {cfg.train_split} split; lower task.num_train/task.num_dev"
            )
        kept = permutation(len(train_rows), train_seed)[:n_keep]
        if cfg.num_test is None:
            test_idx = list(range(len(test_rows)))
            test_sampling = "whole split"
        else:
            test_idx = list(permutation(len(test_rows), train_seed)[: cfg.num_test])
            test_sampling = (
                f"the first {len(test_idx)} rows of a permutation under seed {train_seed}"
            )

    train_idx, dev_idx = kept[: cfg.num_train], kept[cfg.num_train :]
    notes.update(
        train_from=cfg.test_split if carve else cfg.train_split,
        test_from=cfg.test_split,
        train_pool=len(train_rows),
        test_pool=len(test_rows),
        num_train=len(train_idx),
        num_dev=len(dev_idx),
        num_test=len(test_idx),
        test_sampling=test_sampling,
    )
    return Splits(
        train=task.examples([train_rows[i] for i in train_idx]),
        dev=task.examples([train_rows[i] for i in dev_idx]),
        test=task.examples([test_rows[i] for i in test_idx]),
        notes=notes,
    )


def _carve(n_rows: int, cfg: TaskConfig, seed: int) -> tuple[np.ndarray, list[int], str]:
    """Row indices of train+dev and of test, carved disjointly out of one split, and a note."""
    n_keep = cfg.num_train + cfg.num_dev
    if n_keep >= n_rows:
        raise ConfigError(
            f"task {cfg.name}: cannot carve num_train+num_dev={n_keep} out of the "
            f"{n_rows}-row {cfg.test_split} split and keep a test set; lower the sizes"
        )
    order = permutation(n_rows, seed)
    kept, rest = order[:n_keep], order[n_keep:]
    test_idx = sorted(rest[: cfg.num_test] if cfg.num_test is not None else rest)
    taken = "the next" if cfg.num_test is not None else "the other"
    note = (
        f"{cfg.train_split} split missing locally: train+dev = the first {n_keep} rows of a "
        f"permutation of {cfg.test_split} under seed {seed}, test = {taken} {len(test_idx)} "
        f"rows; this test set is not the paper's"
    )
    return kept, test_idx, note


def _load_train(cfg: TaskConfig, root: Path | None) -> list[dict[str, Any]]:
    path = mirror_path(root, cfg.hub_id, cfg.hub_config, cfg.train_split) if root else None
    missing = path is not None and not path.is_file()
    try:
        return load_rows(cfg.hub_id, cfg.hub_config, cfg.train_split, root, cfg.name)
    except DataError as err:
        if not missing:
            raise
        raise DataError(
            f"{err}; or set task.carve_train_from_test=true to carve train/dev out of "
            f"{cfg.test_split} (not the paper's protocol)"
        ) from err
