"""The README's bad-input table: each row gets a clear error and a non-zero exit, never a
traceback, and nothing already written is touched."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT, compose, run_cli, tiny
from gem_bench import train


def _assert_clean_error(result, *needles: str) -> str:
    assert result.returncode != 0, result.stdout
    err = result.stderr
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err.strip().splitlines()[0]


# Errors found while composing the config (Hydra names the key or lists the valid choices).
COMPOSITION = [
    ("unknown model", ["model=gpt-5"], ["model/gpt-5", "smollm2-135m"]),
    ("unknown task", ["task=imagenet"], ["task/imagenet", "sst2"]),
    ("unknown method", ["method=prefix"], ["method/prefix", "gem"]),
    ("unknown launcher", ["-m", "hydra/launcher=kubernetes"], ["hydra/launcher/kubernetes", "slurm"]),
    ("typo'd config key", ["method.rato=0.01"], ["rato"]),
    ("wrong type", ["train.batch_size=eight"], ["batch_size"]),
]


@pytest.mark.parametrize("name,args,needles", COMPOSITION, ids=[c[0] for c in COMPOSITION])
def test_composition_errors(tmp_path, name, args, needles):
    _assert_clean_error(run_cli(*args, f"results_dir={tmp_path}"), *needles)


@pytest.fixture
def finished_run(tmp_path, mirror):
    """A results folder that already holds one finished record; bad commands must not touch it."""
    cfg = compose(*tiny(tmp_path, "train.max_steps=1"))
    record = train.run(cfg, cfg.method.name)
    path = train.run_location(cfg, cfg.method.name) / "record.json"
    return tmp_path, path, path.read_bytes(), record


# Errors found when the run starts: one line "gem-bench: error: ...".
RUNTIME = [
    ("ratio of 0", ["method.ratio=0"], ["method.ratio=0.0", "(0, 1]"]),
    ("ratio of 1.5", ["method.ratio=1.5"], ["method.ratio=1.5", "(0, 1]"]),
    ("negative learning rate", ["method.lr=-1e-5"], ["method.lr=-1e-05"]),
    ("missing data root", ["data_root=/nonexistent/mirror"], ["/nonexistent/mirror", "GEM_BENCH_DATA"]),
    ("model folder that does not exist", ["model=opt-125m", "model.path=/nonexistent/opt"], ["/nonexistent/opt"]),
]


@pytest.mark.parametrize("name,args,needles", RUNTIME, ids=[r[0] for r in RUNTIME])
def test_runtime_errors_leave_results_untouched(finished_run, name, args, needles):
    results, record_path, before, _ = finished_run
    overrides = [a for a in tiny(results) if not any(a.split("=")[0] == b.split("=")[0] for b in args)]
    first_line = _assert_clean_error(run_cli(*overrides, *args, "rerun=true"), "gem-bench: error:", *needles)
    assert len(first_line) < 400
    assert record_path.read_bytes() == before


def test_model_folder_without_weights(tmp_path, mirror):
    folder = tmp_path / "opt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "opt"}))
    result = run_cli("model=opt-125m", f"model.path={folder}", "profile=tiny", f"results_dir={tmp_path}/r")
    _assert_clean_error(result, "gem-bench: error:", str(folder), "safetensors")


def test_malformed_jsonl_row(tmp_path, mirror):
    root = tmp_path / "mirror"
    source = mirror / "nyu-mll" / "glue" / "sst2"
    target = root / "nyu-mll" / "glue" / "sst2"
    target.mkdir(parents=True)
    shutil.copy(source / "validation.jsonl", target / "validation.jsonl")
    lines = (source / "train.jsonl").read_text().splitlines()[:50]
    lines[6] = '{"sentence": "a broken row", "label": '
    (target / "train.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(*tiny(tmp_path / "r"), f"data_root={root}")
    _assert_clean_error(result, "gem-bench: error:", "train.jsonl", "line 7")


def test_checkpoint_from_another_config(finished_run):
    results, record_path, _, record = finished_run
    run_folder = record_path.parent
    stale = run_folder / "checkpoint-000000001000"
    stale.mkdir()
    (stale / "meta.json").write_text(json.dumps({"variant": "tiny-00000000", "seed": 28, "loop": {}}))
    (stale / "state.pt").write_bytes(b"")
    result = run_cli(*tiny(results, "train.max_steps=1"), "rerun=true")
    _assert_clean_error(result, "gem-bench: error:", "checkpoint", "another config")


def test_unwritable_results_folder(tmp_path, mirror):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    result = run_cli(*tiny(blocker))
    _assert_clean_error(result, "gem-bench: error:", str(blocker), "results_dir")
    assert blocker.read_text().startswith("a file")
