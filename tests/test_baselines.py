"""LoRA, AdaLoRA, Adapter and BitFit on tiny random models: only their own parameters train,
their saved update reproduces the model on a fresh base, and merging (where allowed) changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gem_bench.config import MethodConfig
from gem_bench.errors import ConfigError
from gem_bench.methods import METHODS
from gem_bench.methods.adapter import HoulsbyAdapter
from gem_bench.testing import tiny_model, tiny_model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = 4


def method_cfg(name: str, **overrides):
    """configs/method/<name>.yaml over the schema, as Hydra would compose it."""
    yaml = OmegaConf.load(CONFIGS / "method" / f"{name}.yaml")
    yaml.pop("defaults")
    return OmegaConf.merge(OmegaConf.structured(MethodConfig), yaml, overrides)


def make(name: str, family: str, total_steps: int = STEPS, **overrides):
    method = METHODS[name](method_cfg(name, **overrides), tiny_model_config(family), seed=0)
    method.total_steps = total_steps  # read by AdaLoRA only
    return method


def batch() -> torch.Tensor:
    return torch.randint(2, 320, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(model, method, ids, steps=STEPS, on_step=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, steps + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        method.on_step(model, step)  # before zero_grad: AdaLoRA reads the gradients
        opt.zero_grad()
        if on_step:
            on_step(step)
    model.eval()


OWN = {  # what every trainable parameter name of the method looks like
    "lora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "adalora": lambda n: any(f".lora_{x}." in n for x in "ABE"),
    "adapter": lambda n: ".adapter_down." in n or ".adapter_up." in n,
    "bitfit": lambda n: n.endswith(".bias"),
}
# The paper's families (OPT, Phi); the adapter's placement also on Llama. Tiny Llama has no biases.
CASES = [(m, f) for m in ("lora", "adalora", "bitfit") for f in ("opt", "phi")]
CASES += [("adapter", f) for f in ("opt", "phi", "llama")]


@pytest.mark.parametrize("name,family", CASES)
def test_train_save_load_merge(name, family, tmp_path):
    torch.manual_seed(0)
    base, _ = tiny_model(family)
    n_base = sum(p.numel() for p in base.parameters())
    ids = batch()
    method = make(name, family)
    model = method.prepare(base)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(OWN[name](n) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if name != "bitfit":  # the whole base model stays frozen
        assert sum(t.numel() for n, t in frozen.items() if ".ranknum." not in n) == n_base
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    train(model, method, ids)
    assert method.summary(model)["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items()), "a frozen parameter changed"
    assert any(not torch.equal(params[n], t) for n, t in before.items()), "nothing trained"
    trained = logits(model, ids)
    assert not torch.allclose(trained, logits(tiny_model(family)[0], ids))

    # save -> load onto a fresh base: the same model
    path = method.save(model, tmp_path)
    assert path.is_file() and path.suffix == ".safetensors"
    loaded = make(name, family).load(tiny_model(family)[0], tmp_path)
    torch.testing.assert_close(logits(loaded, ids), trained)

    # checkpoint state -> freshly prepared model: the same model
    again = make(name, family)
    fresh = again.prepare(tiny_model(family)[0])
    again.load_state_dict(fresh, method.state_dict(model))
    torch.testing.assert_close(logits(fresh, ids), trained)
    own_keys = {k for k in method.state_dict(model) if not k.startswith("rank_pattern:")}  # AdaLoRA's masks
    assert own_keys == trainable
    if name == "adalora":
        assert again.rank_allocation(fresh) == method.rank_allocation(model) != {}

    if name == "adapter":
        with pytest.raises(ConfigError, match="cannot be merged"):
            method.merge(model)
    else:
        merged = method.merge(model)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(logits(merged, ids), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "phi", "llama"])
def test_adapter_starts_as_the_base_model(family):
    base, _ = tiny_model(family)
    ids = batch()
    expected = logits(base, ids)
    model = make("adapter", family).prepare(base)
    assert sum(isinstance(m, HoulsbyAdapter) for m in model.modules()) == 2 * 2  # two per block
    torch.testing.assert_close(logits(model, ids), expected)


def test_adapter_size_and_placement():
    base, _ = tiny_model("phi")
    method = make("adapter", "phi", adapter_size=3)
    model = method.prepare(base)
    summary = method.summary(model)
    assert summary["target_modules"] == ["dense", "fc2"] and summary["num_adapters"] == 4
    h = 32  # down (h*3 + 3) + up (3*h + h), two per block, two blocks
    assert summary["trainable"] == 4 * (h * 3 + 3 + 3 * h + h)


def test_bitfit_trains_the_chosen_biases_only():
    base, _ = tiny_model("phi")
    method = make("bitfit", "phi", bias_patterns=[r"\.(q_proj|k_proj|v_proj)\.bias$"])
    model = method.prepare(base)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(names) == 2 * 3 and all(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in names)


def test_adalora_ranks_change_during_a_short_run():
    torch.manual_seed(0)
    steps = 10
    method = make("adalora", "opt", total_steps=steps, adalora_init_r=4, adalora_target_r=2,
                  adalora_tinit=2, adalora_tfinal=3, adalora_delta_t=1)
    model = method.prepare(tiny_model("opt")[0])
    start = method.summary(model)["ranks"]
    assert sorted(start) == [f"model.decoder.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert len(start) == 2 * 2 and set(start.values()) == {4}  # q and v of two blocks, init_r
    history = []
    train(model, method, batch(), steps=steps, on_step=lambda s: history.append(method.summary(model)["total_rank"]))
    final = method.summary(model)
    assert history[0] == 16 and final["total_rank"] < 16  # pruned from 4 x 4 towards 2 x 4
    assert final["total_rank"] == 2 * 4
    assert final["ranks"].keys() == start.keys() and final["ranks"] != start
    masked = {n: p for n, p in model.named_parameters() if ".lora_E." in n}
    assert sum(int((p != 0).sum()) for p in masked.values()) <= final["total_rank"]


def test_adalora_orthogonal_regularization_is_pefts_term():
    torch.manual_seed(0)
    method = make("adalora", "opt")
    model = method.prepare(tiny_model("opt")[0])
    model.eval()
    ids = batch()
    with_penalty = model(input_ids=ids, labels=ids).loss  # PEFT adds the penalty to its own loss
    plain = model.base_model.model(input_ids=ids, labels=ids).loss
    penalty = method.orthogonal_regularization(model)
    assert penalty > 0
    torch.testing.assert_close(with_penalty, plain + penalty)


def test_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="total_steps"):
        make("adalora", "opt", total_steps=None).prepare(tiny_model("opt")[0])
    with pytest.raises(ConfigError, match="query_key_value.*not among"):
        make("lora", "opt", target_modules=["query_key_value"]).prepare(tiny_model("opt")[0])
    with pytest.raises(ConfigError, match="match no bias"):
        make("bitfit", "llama").prepare(tiny_model("llama")[0])
    with pytest.raises(ConfigError, match="empty"):
        make("bitfit", "opt", bias_patterns=[]).prepare(tiny_model("opt")[0])
