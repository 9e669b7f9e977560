"""The sparse delta: direct gradient == dense reference, training, merge, save/load, calibration."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from gem_bench import sparse
from gem_bench.errors import ConfigError

TARGETS = ["q_proj", "v_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def random_indices(model, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randperm(w.numel(), generator=gen)[:k]
        for name, w in sparse.eligible_weights(model, TARGETS).items()
    }


def batch(seed: int = 0, size: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (size, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def linear_pair(dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(7, 5, bias=bias).to(dtype)
    idx = torch.tensor([3, 0, 34, 17, 8, 21, 29, 11, 12])  # unsorted on purpose
    layers = []
    for mode in ("sparse", "dense"):
        layer = sparse.SparseDeltaLinear(copy.deepcopy(lin), idx, grad_mode=mode)
        with torch.no_grad():
            layer.delta.copy_(torch.linspace(-0.5, 0.5, idx.numel()))
        layers.append(layer)
    return lin, idx, layers


def run_linear(layer, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, generator=gen).to(dtype).requires_grad_(True)
    y = layer(x)
    (y.float() * torch.randn(y.shape, generator=gen)).sum().backward()
    return y, x.grad, layer.delta.grad


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_gradient_equals_dense_reference_on_linear(bias):
    lin, idx, (fast, ref) = linear_pair(bias=bias)
    y1, gx1, gd1 = run_linear(fast)
    y2, gx2, gd2 = run_linear(ref)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(gx1, gx2)
    torch.testing.assert_close(gd1, gd2)
    assert fast.weight.grad is None and ref.weight.grad is None
    assert bias is False or fast.bias.grad is None
    # And against the formula: d delta_(i,j) = sum_tokens grad_out[:, i] * x[:, j].
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, generator=gen)
    g = torch.randn(2, 3, 5, generator=gen).reshape(-1, 5)
    dense = g.T @ x.reshape(-1, 7)
    torch.testing.assert_close(gd1, dense.reshape(-1)[torch.sort(idx).values])


def test_delta_gradient_is_chunked(monkeypatch):
    monkeypatch.setattr(sparse, "_CHUNK_ELEMENTS", 6)  # 6 tokens -> one entry per chunk
    _, _, (fast, ref) = linear_pair()
    torch.testing.assert_close(run_linear(fast)[2], run_linear(ref)[2])


def test_sparse_gradient_in_bfloat16():
    _, _, (fast, ref) = linear_pair(dtype=torch.bfloat16)
    y1, gx1, gd1 = run_linear(fast, torch.bfloat16)
    y2, gx2, gd2 = run_linear(ref, torch.bfloat16)
    assert gd1.dtype == torch.bfloat16 and gx1.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(gx1, gx2, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gd1, gd2, rtol=2e-2, atol=2e-2)


def test_sparse_gradient_under_autocast():
    _, _, (fast, ref) = linear_pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, gx1, gd1 = run_linear(fast)
        y2, gx2, gd2 = run_linear(ref)
    assert y1.dtype == y2.dtype == torch.bfloat16
    assert gx1.dtype == torch.float32 and gd1.dtype == torch.float32
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(gx1, gx2, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gd1, gd2, rtol=2e-2, atol=2e-2)


def test_forward_equals_linear_with_merged_weight():
    lin, idx, (fast, _) = linear_pair()
    x = torch.randn(4, 7)
    merged = nn.Linear(7, 5)
    merged.load_state_dict(lin.state_dict())
    with torch.no_grad():
        merged.weight.view(-1)[torch.sort(idx).values] += fast.delta
    torch.testing.assert_close(fast(x), merged(x), rtol=0, atol=0)


def test_llama_gradients_and_adamw_steps_match_dense_reference():
    base = tiny_llama()
    indices = random_indices(base, k=40)
    models = {}
    for mode in ("sparse", "dense"):
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        sparse.attach_sparse_deltas(model, indices, grad_mode=mode)
        models[mode] = model
    fast, ref = models["sparse"], models["dense"]
    fast(**batch()).loss.backward()
    ref(**batch()).loss.backward()
    for a, b in zip(sparse.delta_parameters(fast), sparse.delta_parameters(ref)):
        assert a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    # A few AdamW steps give the same deltas on both paths.
    opts = {m: torch.optim.AdamW(sparse.delta_parameters(models[m]), lr=1e-2) for m in models}
    for step in range(4):
        for mode, model in models.items():
            opts[mode].zero_grad()
            model(**batch(seed=step)).loss.backward()
            opts[mode].step()
    for a, b in zip(sparse.delta_parameters(fast), sparse.delta_parameters(ref)):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, p in fast.named_parameters():
        assert (p.grad is None) == (not name.endswith(".delta")), name

    # Merged weights differ from the pretrained ones only at the masked entries.
    sparse.merge_sparse_deltas(fast)
    assert all(type(fast.get_submodule(n[: -len(".weight")])) is nn.Linear for n in indices)
    pretrained = base.state_dict()
    merged = fast.state_dict()
    assert merged.keys() == pretrained.keys()
    for key, before in pretrained.items():
        changed = torch.nonzero((merged[key] != before).reshape(-1)).reshape(-1)
        if key in indices:
            assert changed.numel() > 0 and set(changed.tolist()) <= set(indices[key].tolist())
        else:
            assert torch.equal(merged[key], before), key


def trained_model(base, grad_mode="sparse", steps=2):
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    sparse.attach_sparse_deltas(model, random_indices(base, k=30), grad_mode=grad_mode)
    opt = torch.optim.AdamW(sparse.delta_parameters(model), lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        model(**batch(seed=step)).loss.backward()
        opt.step()
    return model


def test_save_load_round_trip_and_merge(tmp_path):
    base = tiny_llama()
    model = trained_model(base)
    inputs = batch(seed=9)
    with torch.no_grad():
        expected = model(**inputs).logits
    path = sparse.save_sparse_delta(model, tmp_path / "delta.safetensors")

    attached = copy.deepcopy(base)
    names = sparse.load_sparse_delta(attached, path)
    assert len(names) == 4 and len(sparse.delta_parameters(attached)) == 4
    merged = copy.deepcopy(base)
    sparse.load_sparse_delta(merged, path, merge=True)
    assert not sparse.sparse_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(attached(**inputs).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=0)
        sparse.merge_sparse_deltas(model)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)

    # At most 12 bytes per entry plus a small header (int32 indices + fp32 values: 8).
    tensors, meta = sparse.read_sparse_delta(path)
    entries = sum(t.numel() for k, t in tensors.items() if k.endswith(".values"))
    assert entries == 4 * 30 and tensors["model.layers.0.self_attn.q_proj.indices"].dtype == torch.int32
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - 8 - header <= 12 * entries and header < 2048
    assert meta["format_version"] == sparse.FORMAT_VERSION


def test_load_rejects_a_mismatched_model(tmp_path):
    path = sparse.save_sparse_delta(trained_model(tiny_llama(), steps=0), tmp_path / "d.safetensors")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="shape"):
        sparse.load_sparse_delta(other, path)


def test_checkpoint_state_dict_round_trip():
    base = tiny_llama()
    model = trained_model(base)
    state = sparse.sparse_state_dict(model)
    resumed = copy.deepcopy(base)
    sparse.attach_sparse_deltas(resumed, random_indices(base, k=30))  # fresh run, same masks
    sparse.load_sparse_state_dict(resumed, state)
    for a, b in zip(sparse.delta_parameters(model), sparse.delta_parameters(resumed)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="differ"):
        sparse.load_sparse_state_dict(resumed, {
            "model.layers.0.self_attn.q_proj.indices": torch.arange(30),
            "model.layers.0.self_attn.q_proj.values": torch.zeros(30),
        })


def test_detach_without_merge_restores_the_original_modules():
    model = tiny_llama()
    originals = {n: model.get_submodule(n[: -len(".weight")]) for n in sparse.eligible_weights(model, TARGETS)}
    with torch.no_grad():
        before = model(**batch()).logits
    sparse.attach_sparse_deltas(model, random_indices(model, k=10))
    for delta in sparse.delta_parameters(model):
        torch.nn.init.normal_(delta)
    names = sparse.detach_sparse_deltas(model, merge=False)
    assert len(names) == 4
    for n, module in originals.items():
        assert model.get_submodule(n[: -len(".weight")]) is module and module.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, before, rtol=0, atol=0)


def test_delta_init_weight_reproduces_the_released_quirk():
    lin = nn.Linear(4, 3)
    layer = sparse.SparseDeltaLinear(copy.deepcopy(lin), torch.tensor([1, 5]), delta_init="weight")
    expected = lin.weight.detach().clone()
    expected.view(-1)[[1, 5]] *= 2
    torch.testing.assert_close(layer.merged_weight(), expected)
    zero = sparse.SparseDeltaLinear(copy.deepcopy(lin), torch.tensor([1, 5]))
    assert torch.equal(zero.merged_weight(), lin.weight.detach())


def test_matrices_without_entries_stay_plain_linear():
    model = tiny_llama()
    indices = random_indices(model, k=5)
    empty = "model.layers.1.self_attn.q_proj.weight"
    indices[empty] = torch.empty(0, dtype=torch.long)
    attached = sparse.attach_sparse_deltas(model, indices)
    assert len(attached) == 3 and type(model.get_submodule(empty[: -len(".weight")])) is nn.Linear


def test_bad_arguments_are_named():
    model = tiny_llama()
    indices = random_indices(model, k=5)
    sparse.attach_sparse_deltas(model, indices)
    with pytest.raises(ValueError, match="already has a sparse delta"):
        sparse.attach_sparse_deltas(model, indices)
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="duplicates"):
        sparse.SparseDeltaLinear(lin, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        sparse.SparseDeltaLinear(lin, torch.tensor([12]))
    with pytest.raises(ConfigError, match="'fast'.*sparse, dense"):
        sparse.SparseDeltaLinear(lin, torch.tensor([1]), grad_mode="fast")
    with pytest.raises(ConfigError, match=r"\['qkv'\].*q_proj"):
        sparse.eligible_weights(tiny_llama(), ["qkv"])


def test_calibration_gradients_sum_batches_and_restore_state():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    batches = [batch(seed=0), batch(seed=1)]
    grads = sparse.calibration_gradients(model, batches, TARGETS)
    assert sorted(grads) == sorted(sparse.eligible_weights(model, TARGETS))
    assert not model.training and not model.model.norm.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())

    reference = copy.deepcopy(model).train()
    for b in batches:
        reference(**b).loss.backward()
    for name, g in grads.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, reference.get_parameter(name).grad, rtol=1e-5, atol=1e-8)
    # Without labels the loss is the LM loss on the non-padded inputs.
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    torch.testing.assert_close(sparse.calibration_gradients(model, unlabeled, TARGETS), grads)
