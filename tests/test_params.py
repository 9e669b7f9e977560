"""The Params column of Table 3, computed on meta-device models with the composed configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from gem_bench.config import MethodConfig, register_configs
from gem_bench.errors import ConfigError
from gem_bench.params import trainable_share

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def compose_run():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda model, method: compose("config", overrides=[f"model={model}", f"method={method}"])
    GlobalHydra.instance().clear()


def percent(cfg) -> float:
    return 100 * trainable_share(cfg.model, cfg.method)["ratio"]


# (model, method, Table 3's printed share, its decimals)
TABLE3 = [
    ("opt-125m", "lora", 0.235, 3),
    ("opt-125m", "bitfit", 0.082, 3),
    ("opt-125m", "adapter", 0.25, 2),
    ("opt-1.3b", "lora", 0.120, 3),
    ("opt-1.3b", "bitfit", 0.041, 3),
    ("opt-1.3b", "adapter", 0.127, 3),
    ("phi-2", "lora", 0.094, 3),
    ("phi-2", "bitfit", 0.009, 3),
    ("opt-125m", "gem", 0.1, 3),
    ("opt-1.3b", "random_mask", 0.1, 3),
    ("phi-2", "topgrad_mask", 0.1, 3),
]

# Cells no reasonable setting reproduces: the share our documented setting reaches instead.
# Adapter on Phi-2: size 16 (paper 0.200%). AdaLoRA: PROTOCOL.md's init_r 12 on q/v, counted at
# the start (paper 0.246% / 0.125% / 0.138%); no integer rank gives those shares.
REACHED = [
    ("phi-2", "adapter", 0.195),
    ("opt-125m", "adalora", 0.353),
    ("opt-1.3b", "adalora", 0.179),
    ("phi-2", "adalora", 0.141),
]


@pytest.mark.parametrize("model,method,printed,decimals", TABLE3)
def test_table3_params_column(compose_run, model, method, printed, decimals):
    assert round(percent(compose_run(model, method)), decimals) == printed


@pytest.mark.parametrize("model,method,reached", REACHED)
def test_documented_closest_settings(compose_run, model, method, reached):
    assert round(percent(compose_run(model, method)), 3) == reached


def test_model_specific_defaults_are_selected(compose_run):
    assert compose_run("phi-2", "adapter").method.adapter_size == 16
    assert compose_run("opt-125m", "adapter").method.adapter_size == 8
    assert compose_run("phi-2", "bitfit").method.bias_patterns == [r"\.(q_proj|k_proj|v_proj)\.bias$"]
    assert len(compose_run("opt-1.3b", "bitfit").method.bias_patterns) == 2


def test_exact_counts(compose_run):
    cfg = compose_run("opt-125m", "lora")
    assert trainable_share(cfg.model, cfg.method) == {
        "trainable": 12 * 2 * 8 * (768 + 768),
        "total": 125_239_296,
        "ratio": 294_912 / 125_239_296,
    }
    cfg = compose_run("phi-2", "bitfit")
    assert trainable_share(cfg.model, cfg.method)["trainable"] == 32 * 3 * 2560
    cfg = compose_run("opt-125m", "adalora")  # A, B and the diagonal E; not the constant ranknum
    assert trainable_share(cfg.model, cfg.method)["trainable"] == 24 * 12 * (768 + 768 + 1)


def test_full_and_masks(compose_run):
    cfg = compose_run("opt-125m", "full")
    assert trainable_share(cfg.model, cfg.method)["ratio"] == 1.0
    cfg = compose_run("opt-125m", "gem")
    assert trainable_share(cfg.model, cfg.method)["trainable"] == 125_239  # floor(0.001 * N)


def test_unknown_method_is_named(compose_run):
    cfg = compose_run("opt-125m", "lora")
    bad = OmegaConf.merge(OmegaConf.structured(MethodConfig), {"name": "prefix"})
    with pytest.raises(ConfigError, match="prefix.*choices"):
        trainable_share(cfg.model, bad)


def test_every_model_method_file_names_a_real_model_and_method():
    # `optional` in the defaults list skips a misspelt file silently: check the names here.
    files = sorted((CONFIGS / "model_method").glob("*.yaml"))
    assert files
    for path in files:
        model, _, method = path.stem.partition("_")  # model names have no "_"
        assert (CONFIGS / "model" / f"{model}.yaml").is_file(), path.name
        assert (CONFIGS / "method" / f"{method}.yaml").is_file(), path.name
