"""Tiny random models and an offline tokenizer, for tests and the ``tiny-*`` model configs.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in code on a
few sentences (so every text can be encoded), and the models are built from config objects
with random weights. The arch facts below are the same as ``configs/model/tiny-*.yaml``
(a test checks that they agree).
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from gem_bench.config import ArchConfig, ModelConfig
from gem_bench.errors import ConfigError

TINY_VOCAB_SIZE = 320
EOS = "<|endoftext|>"
PAD = "<pad>"

# Shared by the three families; only what the family needs differs.
_TINY_COMMON = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=1024,
)
TINY_ARCH: dict[str, dict] = {
    "llama": dict(_TINY_COMMON, model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "opt": dict(_TINY_COMMON, model_type="opt", word_embed_proj_dim=32, tie_word_embeddings=True),
    "phi": dict(_TINY_COMMON, model_type="phi", partial_rotary_factor=0.5, tie_word_embeddings=False),
}
# Like the real models: OPT's tokenizer adds a BOS and has its own pad token; SmolLM2's
# and Phi-2's add no BOS and pad with EOS.
_TOKENIZER_PROFILE = {
    "llama": dict(add_bos=False, pad=EOS),
    "opt": dict(add_bos=True, pad=PAD),
    "phi": dict(add_bos=False, pad=EOS),
}
_ATTENTION_BIAS = {"llama": False, "opt": True, "phi": True}

# Words of the benchmark prompts, so that candidates such as " Yes" become single tokens.
_CORPUS = [
    "The movie was great. It was great. It was terrible. Yes or No? Yes, No?",
    'Does this mean that "the answer" is true? Yes or No?\nQuestion: what is it?\nAnswer:',
    'Does the word "bank" have the same meaning in these two sentences? Yes, No?',
    "I found this answer. Is that correct? Yes or No? so because the man and the woman",
    "Title: Context: Question: Answer: the of and to in is was for on that with as by",
    "def f(x):\n    return x + 1\n\nprint(f(2))  # 3 numbers 0 1 2 3 4 5 6 7 8 9 #### 42",
]


def _check_family(model_type: str) -> None:
    if model_type not in TINY_ARCH:
        raise ConfigError(f"tiny model type {model_type!r} is unknown; choose one of {sorted(TINY_ARCH)}")


@lru_cache(maxsize=None)
def _trained_bpe_json() -> str:
    """The trained BPE as JSON; trained once per process (milliseconds), deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if tok.get_vocab_size() != TINY_VOCAB_SIZE:  # the corpus must allow enough merges
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, expected {TINY_VOCAB_SIZE}")
    return tok.to_str()


def tiny_tokenizer(model_type: str = "llama") -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer of ``TINY_VOCAB_SIZE`` tokens (EOS id 0, ``<pad>`` id 1).

    ``model_type`` picks the real family's conventions (BOS added or not, pad = EOS or not).
    A new object each call, since callers set ``padding_side`` on it.
    """
    _check_family(model_type)
    profile = _TOKENIZER_PROFILE[model_type]
    tok = Tokenizer.from_str(_trained_bpe_json())
    if profile["add_bos"]:
        eos_id = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=profile["pad"],
        model_max_length=TINY_ARCH[model_type]["max_position_embeddings"],
    )


def tiny_model_config(model_type: str = "llama") -> ModelConfig:
    """The ``ModelConfig`` of ``configs/model/tiny-<model_type>.yaml`` (source ``random``)."""
    _check_family(model_type)
    return ModelConfig(
        name=f"tiny-{model_type}",
        hub_id="random",
        source="random",
        attention_bias=_ATTENTION_BIAS[model_type],
        arch=ArchConfig(**TINY_ARCH[model_type]),
    )


def tiny_model(model_type: str = "llama", seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random ``model_type`` model (eval mode, float32) and its matching tokenizer."""
    from gem_bench.models import build_random_model  # models imports this module for source=random

    return build_random_model(tiny_model_config(model_type), seed=seed), tiny_tokenizer(model_type)
