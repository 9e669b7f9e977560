"""Every config composes; registries and YAMLs agree; the schema names a bad key or type."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import ROOT, compose
from gem_bench.methods import METHODS
from gem_bench.tasks import TASKS

CONFIGS = ROOT / "configs"


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "task", "method", "profile"])
def test_every_option_composes(group):
    for choice in _choices(group):
        cfg = compose(f"{group}={choice}")
        assert cfg[group] is not None


@pytest.mark.parametrize("experiment", _choices("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose(f"+experiment={experiment}")
    assert cfg.experiment_name == experiment


def test_registries_and_yamls_agree():
    method_names = {compose(f"method={c}").method.name for c in _choices("method")}
    assert method_names == set(METHODS)
    task_names = {compose(f"task={c}").task.name for c in _choices("task")}
    assert task_names == set(TASKS)


def test_model_method_specialisation_applies():
    # Table 3's Params column: Phi-2's Adapter and BitFit differ from the generic defaults.
    assert compose("model=phi-2", "method=adapter").method.adapter_size != compose("method=adapter").method.adapter_size


def test_unknown_key_is_named():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        compose("method.rato=0.01")
    assert "rato" in str(info.value) + str(info.value.__cause__)


def test_wrong_type_is_named():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose("train.batch_size=eight")
    assert "batch_size" in str(info.value) + str(info.value.__cause__)
