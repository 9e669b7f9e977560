"""Local-mirror loading, its errors, and PROTOCOL.md's train/dev/test sampling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gem_bench import data
from gem_bench.config import TaskConfig
from gem_bench.data import load_rows, mirror_path, permutation, sample_splits
from gem_bench.errors import ConfigError, DataError
from gem_bench.tasks import TASKS

HUB_ID, CONFIG = "nyu-mll/glue", "sst2"


def write_split(root: Path, split: str, rows: list, hub_id: str = HUB_ID, config: str = CONFIG) -> Path:
    path = mirror_path(root, hub_id, config, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sst2_rows(start: int, n: int) -> list[dict]:
    # idx ranges tell the splits apart: train rows 0.., validation rows 10000..
    return [{"sentence": f"sentence {i} ", "label": i % 2, "idx": i} for i in range(start, start + n)]


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    write_split(tmp_path, "train", sst2_rows(0, 50))
    write_split(tmp_path, "validation", sst2_rows(10000, 30))
    return tmp_path


def sst2_cfg(**overrides) -> TaskConfig:
    values = dict(name="sst2", hub_id=HUB_ID, hub_config=CONFIG, num_train=12, num_dev=5)
    values.update(overrides)
    return TaskConfig(**values)


def ids(examples) -> list[int]:
    return [e.meta["idx"] for e in examples]


# ---- load_rows --------------------------------------------------------------------------------


def test_load_rows_keeps_fields_and_types(tmp_path: Path):
    rows = [
        {"question": "q", "answer": True, "passage": "p"},
        {"question": "r", "answer": False, "passage": "s"},
    ]
    write_split(tmp_path, "validation", rows, "google/boolq", "default")
    assert load_rows("google/boolq", "default", "validation", str(tmp_path)) == rows
    nested = [{"answer": "a", "idx": {"paragraph": 0, "question": 1, "answer": 2}, "label": 1}]
    write_split(tmp_path, "train", nested, "aps/super_glue", "multirc")
    assert load_rows("aps/super_glue", "multirc", "train", tmp_path) == nested


def test_load_rows_reads_root_from_environment(mirror: Path, monkeypatch):
    monkeypatch.setenv("GEM_BENCH_DATA", str(mirror))
    assert [r["idx"] for r in load_rows(HUB_ID, CONFIG, "validation", None)] == list(range(10000, 10030))


def test_config_none_reads_the_default_folder(tmp_path: Path):
    write_split(tmp_path, "train", [{"a": 1}], "some/set", "default")
    assert load_rows("some/set", None, "train", tmp_path) == [{"a": 1}]


def test_hub_path_without_a_root(monkeypatch):
    monkeypatch.delenv("GEM_BENCH_DATA", raising=False)
    calls = []

    class FakeDataset:
        def to_list(self):
            return [{"sentence": "x", "label": 0, "idx": 0}]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset()

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    assert load_rows(HUB_ID, CONFIG, "train", None) == [{"sentence": "x", "label": 0, "idx": 0}]
    assert calls == [((HUB_ID, CONFIG), {"split": "train"})]


def test_hub_failure_is_one_line_data_error(monkeypatch):
    monkeypatch.delenv("GEM_BENCH_DATA", raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host\nmore detail")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_rows(HUB_ID, CONFIG, "train", None, task_name="sst2")
    message = str(info.value)
    assert "\n" not in message
    assert "task sst2" in message and "ConnectionError: no route to host" in message
    assert "GEM_BENCH_DATA=" in message and "data_root=" in message


def test_missing_split_names_path_task_and_present_splits(mirror: Path):
    with pytest.raises(DataError) as info:
        load_rows(HUB_ID, CONFIG, "test", mirror, task_name="sst2")
    message = str(info.value)
    assert str(mirror_path(mirror, HUB_ID, CONFIG, "test")) in message
    assert "task sst2" in message
    assert "splits there: train, validation" in message
    assert "GEM_BENCH_DATA=" in message and "data_root=" in message


def test_missing_config_lists_configs(mirror: Path):
    with pytest.raises(DataError, match="configs there: sst2"):
        load_rows(HUB_ID, "cola", "train", mirror, task_name="cola")


def test_malformed_row_names_file_and_line(tmp_path: Path):
    path = mirror_path(tmp_path, HUB_ID, CONFIG, "train")
    path.parent.mkdir(parents=True)
    # line 2 is blank (skipped, but still counted), line 4 is broken
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,\n{"a": 4}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(HUB_ID, CONFIG, "train", tmp_path, task_name="sst2")
    assert f"{path} line 4 is not valid JSON" in str(info.value)


def test_non_object_row_and_empty_file(tmp_path: Path):
    path = write_split(tmp_path, "train", [{"a": 1}, [1, 2]])
    with pytest.raises(DataError, match=f"{path} line 2 is a JSON list, not an object"):
        load_rows(HUB_ID, CONFIG, "train", tmp_path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="has no rows"):
        load_rows(HUB_ID, CONFIG, "train", tmp_path)


# ---- sampling ---------------------------------------------------------------------------------


def test_permutation_is_mezo_global_seed_permutation():
    state = np.random.get_state()
    np.random.seed(28)
    expected = np.random.permutation(100)
    np.random.set_state(state)
    ours = permutation(100, 28)
    assert (ours == expected).all()
    assert (np.random.get_state()[1] == state[1]).all()  # global state untouched


def reference_mezo_sampling(n_train_pool: int, num_train: int, num_dev: int, seed: int):
    """The released code: sample_subset('train', seed, num_train+num_dev), dev = the last num_dev."""
    state = np.random.get_state()
    np.random.seed(seed)
    index = np.random.permutation(n_train_pool).tolist()[: num_train + num_dev]
    np.random.set_state(state)
    return index[:-num_dev], index[-num_dev:]


def test_sampling_matches_released_code_and_test_is_whole_validation(mirror: Path):
    task = TASKS["sst2"](sst2_cfg())
    splits = sample_splits(task, sst2_cfg(), mirror, 210)
    train_ref, dev_ref = reference_mezo_sampling(50, 12, 5, 210)
    assert ids(splits.train) == train_ref
    assert ids(splits.dev) == dev_ref
    assert ids(splits.test) == list(range(10000, 10030))  # whole split, in order
    assert splits.train[0].prompt == f"sentence {train_ref[0]} It was"  # rendered through the task
    assert splits.notes["carved_from_test"] is False
    assert splits.notes["test_sampling"] == "whole split"
    assert (splits.notes["num_train"], splits.notes["num_dev"], splits.notes["num_test"]) == (12, 5, 30)


def test_sampling_is_deterministic_disjoint_and_dev_from_train(mirror: Path):
    task = TASKS["sst2"](sst2_cfg())
    first = sample_splits(task, sst2_cfg(), mirror, 28)
    again = sample_splits(task, sst2_cfg(), mirror, 28)
    other = sample_splits(task, sst2_cfg(), mirror, 10283)
    assert ids(first.train) == ids(again.train) and ids(first.dev) == ids(again.dev)
    assert ids(first.train) != ids(other.train)
    assert len(first.train) == 12 and len(first.dev) == 5
    assert not set(ids(first.train)) & set(ids(first.dev))
    assert all(i < 50 for i in ids(first.train) + ids(first.dev))  # both from the train split


def test_num_test_takes_a_seeded_permutation_of_validation(mirror: Path):
    cfg = sst2_cfg(num_test=7)
    splits = sample_splits(TASKS["sst2"](cfg), cfg, mirror, 28)
    assert ids(splits.test) == [10000 + i for i in permutation(30, 28)[:7]]
    assert "permutation under seed 28" in splits.notes["test_sampling"]


def test_no_dev_set(mirror: Path):
    cfg = sst2_cfg(num_dev=0)
    splits = sample_splits(TASKS["sst2"](cfg), cfg, mirror, 28)
    assert splits.dev == [] and len(splits.train) == 12


def test_sample_larger_than_train_split_is_config_error(mirror: Path):
    cfg = sst2_cfg(num_train=40, num_dev=20)
    with pytest.raises(ConfigError, match="num_train\\+num_dev=60 exceeds the 50 rows"):
        sample_splits(TASKS["sst2"](cfg), cfg, mirror, 28)


def test_missing_train_without_carving_suggests_it(tmp_path: Path):
    write_split(tmp_path, "validation", sst2_rows(10000, 30))
    with pytest.raises(DataError) as info:
        sample_splits(TASKS["sst2"](sst2_cfg()), sst2_cfg(), tmp_path, 28)
    assert "splits there: validation" in str(info.value)
    assert "task.carve_train_from_test=true" in str(info.value)


@pytest.mark.parametrize("num_test", [None, 6])
def test_carving_from_validation_is_disjoint_and_noted(tmp_path: Path, num_test):
    write_split(tmp_path, "validation", sst2_rows(10000, 30))
    cfg = sst2_cfg(carve_train_from_test=True, num_test=num_test)
    splits = sample_splits(TASKS["sst2"](cfg), cfg, tmp_path, 28)
    train, dev, test = set(ids(splits.train)), set(ids(splits.dev)), set(ids(splits.test))
    assert len(train) == 12 and len(dev) == 5 and len(test) == (13 if num_test is None else 6)
    assert not (train & dev or train & test or dev & test)
    assert train | dev | test <= set(range(10000, 10030))
    order = [10000 + i for i in permutation(30, 28)]
    assert ids(splits.train) == order[:12] and ids(splits.dev) == order[12:17]
    assert test == set(order[17:] if num_test is None else order[17:23])
    assert splits.notes["carved_from_test"] is True
    assert splits.notes["train_from"] == "validation"
    assert "train split missing locally" in splits.notes["carve"]


def test_carving_is_skipped_where_train_exists(mirror: Path):
    cfg = sst2_cfg(carve_train_from_test=True)
    splits = sample_splits(TASKS["sst2"](cfg), cfg, mirror, 28)
    assert splits.notes["carved_from_test"] is False
    assert all(i < 50 for i in ids(splits.train))


def test_carving_must_leave_a_test_set(tmp_path: Path):
    write_split(tmp_path, "validation", sst2_rows(10000, 17))
    cfg = sst2_cfg(carve_train_from_test=True)
    with pytest.raises(ConfigError, match="keep a test set"):
        sample_splits(TASKS["sst2"](cfg), cfg, tmp_path, 28)


@pytest.mark.parametrize(
    "name, config, sizes", [("rte", "rte", (1000, 500, 277)), ("copa", "copa", (360, 40, 100))]
)
def test_paper_sizes_on_the_real_mirror(name, config, sizes):
    root = Path(os.environ.get("GEM_BENCH_DATA", "/work/shared/data/hub"))
    if not mirror_path(root, "aps/super_glue", config, "train").is_file():
        pytest.skip(f"benchmark mirror not found under {root} (set GEM_BENCH_DATA)")
    cfg = TaskConfig(name=name, hub_id="aps/super_glue", hub_config=config,
                     num_train=sizes[0], num_dev=sizes[1])
    splits = sample_splits(TASKS[name](cfg), cfg, root, 28)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == sizes
    assert not {e.meta["idx"] for e in splits.train} & {e.meta["idx"] for e in splits.dev}
