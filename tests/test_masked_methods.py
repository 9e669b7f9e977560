"""The gem / random_mask / topgrad_mask / full methods and their config files."""

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

import gem_bench.methods.full  # noqa: F401  (registers "full")
import gem_bench.methods.masked  # noqa: F401  (registers the masked methods)
from gem_bench import sparse
from gem_bench.config import MethodConfig, ModelConfig
from gem_bench.errors import ConfigError
from gem_bench.methods.base import METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def batches():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, 64, (2, 10), generator=gen)), "labels": ids} for _ in range(2)]


def calibrate(model, names):
    grads = sparse.calibration_gradients(model, batches(), ["q_proj", "v_proj"])
    assert sorted(grads) == sorted(names)
    return grads


def make(name, seed=0, **overrides):
    cfg = MethodConfig(name=name, **{"ratio": 0.01, **overrides})
    return METHODS[name](cfg, ModelConfig(), seed=seed)


@pytest.mark.parametrize("name", ["gem", "random_mask", "topgrad_mask"])
def test_prepare_trains_exactly_the_selected_entries(name, tmp_path):
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    method = make(name)
    assert method.needs_calibration
    model = method.prepare(model, calibrate)
    summary = method.summary(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n in trainable)
    assert method.trainable_parameters(model) == sparse.delta_parameters(model)
    assert summary["total"] == total and summary["budget"] == int(0.01 * total)
    assert summary["trainable"] == sum(p.numel() for p in method.trainable_parameters(model))
    assert summary["budget"] - 4 <= summary["trainable"] <= summary["budget"]
    assert summary["ratio"] == summary["trainable"] / total and summary["target_ratio"] == 0.01
    assert len(summary["allocation"]) == 4 and 0 < summary["captured_rho"] <= 1
    assert all(p.grad is None for p in model.parameters())
    if name != "gem":  # the baselines use the same k in every matrix
        assert len({m["k"] for m in summary["allocation"]}) == 1
    path = method.save(model, tmp_path)
    assert path.exists() and path.stat().st_size < 4096


def test_gem_captures_more_rho_than_random():
    shares = {}
    for name in ("gem", "random_mask"):
        method = make(name)
        method.prepare(tiny_llama(), calibrate)
        shares[name] = method.summary(None)["captured_rho"]
    assert shares["gem"] > shares["random_mask"]


def test_ablation_allocation_reaches_the_selection():
    method = make("gem", allocation="entropy")
    method.prepare(tiny_llama(), calibrate)
    summary = method.summary(None)
    assert summary["allocation_rule"] == "entropy"
    assert [m["alpha"] for m in summary["allocation"]] == [m["entropy"] for m in summary["allocation"]]


def test_random_mask_seed():
    def masks(**kw):
        model = make("random_mask", **kw).prepare(tiny_llama(), calibrate)
        return [m.indices for m in sparse.sparse_modules(model).values()]

    same = masks(mask_seed=3)
    assert all(torch.equal(a, b) for a, b in zip(same, masks(mask_seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(same, masks(mask_seed=4)))
    # mask_seed=None falls back to the run's seed
    assert all(torch.equal(a, b) for a, b in zip(masks(seed=3), same))


def test_state_dict_round_trip_onto_a_fresh_model():
    method = make("gem", delta_init="weight")
    model = method.prepare(tiny_llama(), calibrate)
    inputs = batches()[0]
    with torch.no_grad():
        expected = model(**inputs).logits
    fresh = tiny_llama()
    make("gem").load_state_dict(fresh, method.state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected, rtol=0, atol=0)


def test_figure2_stats_follow_the_papers_formulas():
    method = make("gem")
    model = method.prepare(tiny_llama(), calibrate)
    grads = calibrate(tiny_llama(), list(method.selection.indices))
    assert method.figure2_stats(model) == {"relative_weight_change": 0.0, "loss_reduction": 0.0}
    change_sq, drop = 0.0, 0.0
    for name, m in sparse.sparse_modules(model).items():
        with torch.no_grad():
            m.delta.copy_(torch.randn(m.delta.shape) * 1e-3)
        w0 = m.weight.detach().reshape(-1)[m.indices].double()
        change_sq += ((m.delta.detach().double() / (w0.abs() + 1e-8)) ** 2).sum().item()
        drop += (grads[f"{name}.weight"].reshape(-1)[m.indices].double() * m.delta.detach().double()).sum().item()
    stats = method.figure2_stats(model)
    assert stats["relative_weight_change"] == pytest.approx(change_sq**0.5, rel=1e-9)
    assert stats["loss_reduction"] == pytest.approx(abs(drop), rel=1e-6)


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match="sparse_grad='fast'"):
        make("gem", sparse_grad="fast")
    with pytest.raises(ConfigError, match="allocation='l1'.*norm_entropy"):
        make("gem", allocation="l1")
    with pytest.raises(ConfigError, match="ratio=0"):
        make("gem", ratio=0.0)
    with pytest.raises(ValueError, match="calibration"):
        make("gem").prepare(tiny_llama(), None)


def test_full_fine_tuning():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    method = METHODS["full"](MethodConfig(name="full"), ModelConfig())
    model = method.prepare(model)
    assert all(p.requires_grad for p in model.parameters())
    assert method.summary(model)["ratio"] == 1.0
    assert method.state_dict(model).keys() == model.state_dict().keys()
    other = tiny_llama(seed=1)
    method.load_state_dict(other, method.state_dict(model))
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
    assert method.save(model, Path("unused")) is None


@pytest.mark.parametrize(
    "file, name, lr, allocation",
    [
        ("gem", "gem", 1e-5, "norm_entropy"),
        ("gem_norm", "gem", 1e-5, "norm"),
        ("gem_entropy", "gem", 1e-5, "entropy"),
        ("gem_uniform", "gem", 1e-5, "uniform"),
        ("random_mask", "random_mask", 1e-3, None),
        ("topgrad_mask", "topgrad_mask", 1e-5, None),
        ("full", "full", 1e-6, None),
    ],
)
def test_method_configs_fit_the_schema(file, name, lr, allocation):
    raw = OmegaConf.load(CONFIGS / f"{file}.yaml")
    assert list(raw.pop("defaults")) == ["method_schema", "_self_"]
    cfg = OmegaConf.merge(OmegaConf.structured(MethodConfig), raw)
    assert cfg.name == name and cfg.name in METHODS
    assert cfg.lr == pytest.approx(lr) and isinstance(cfg.lr, float)
    if allocation:
        assert cfg.allocation == allocation
