"""Records and run claims: stable paths, atomic writes, exclusive locks with stale recovery."""

import json
import os
import socket
import subprocess
import sys

import pytest

from gem_bench import records


def _cfg(**method):
    return {
        "model": {"name": "m", "path": "/somewhere"},
        "task": {"name": "sst2", "num_train": 16},
        "method": {"name": "gem", "ratio": 0.001, **method},
        "train": {"batch_size": 8, "progress": True},
        "profile": "cpu",
        "seed": 28,
    }


def test_variant_is_stable_and_ignores_display_and_paths():
    base = records.variant_name(_cfg())
    assert base.startswith("cpu-") and len(base) == len("cpu-") + 8
    assert records.variant_name(_cfg()) == base
    moved = _cfg()
    moved["model"]["path"] = "/elsewhere"
    moved["train"]["progress"] = False
    assert records.variant_name(moved) == base
    assert records.variant_name(_cfg(ratio=0.005)) != base


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "record.json"
    records.write_json_atomic(path, {"schema": 1, "status": "finished"})
    records.write_json_atomic(path, {"schema": 1, "status": "failed"})
    assert json.loads(path.read_text())["status"] == "failed"
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temp files left


def test_read_record_names_a_file_that_does_not_parse(tmp_path):
    bad = tmp_path / "record.json"
    bad.write_text('{"schema": 1, "status": "fin')
    with pytest.raises(records.RecordError, match=str(bad)):
        records.read_record(bad)
    assert not records.finished(tmp_path)


def test_claim_is_exclusive_and_released(tmp_path):
    with records.claim_run(tmp_path):
        owner = json.loads((tmp_path / records.LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        # another live process (here: a child that holds the lock) blocks the claim
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / records.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": child.pid}))
        with pytest.raises(records.RunBusy, match=str(child.pid)):
            records.claim_run(tmp_path)
    finally:
        child.kill()
        child.wait()
    # the owner is gone now: the lock is stale and is taken over
    with records.claim_run(tmp_path):
        assert json.loads((tmp_path / records.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / records.LOCK_NAME).exists()
