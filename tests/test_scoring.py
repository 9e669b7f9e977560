"""Scoring, losses and generation on tiny random Llama / OPT / Phi models and a tiny BPE tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn

from gem_bench import scoring
from gem_bench.errors import ConfigError
from gem_bench.tasks.base import Example, continuation

CORPUS = [
    "The movie was great. It was great!",
    "A terrible film. It was terrible.",
    "Does this mean that it is true? Yes or No?\nYes",
    "No\nNo way. Yes indeed.",
    "Title: Paris\nContext: Paris is the capital of France.\nQuestion: What is the capital?\nAnswer: Paris\n",
]


def make_tokenizer(bos: bool) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE like SmolLM2/OPT/Phi; ``bos`` adds ``<s>`` in front like Llama tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


VOCAB = 400
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.3,  # peaked distributions, so that a wrong position shows
)


def make_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **COMMON)
        model = transformers.LlamaForCausalLM(config)
    elif family == "opt":
        config = transformers.OPTConfig(ffn_dim=64, word_embed_proj_dim=16, dropout=0.0, **COMMON)
        model = transformers.OPTForCausalLM(config)  # word_embed_proj_dim != hidden: project_in/out
    elif family == "phi":
        config = transformers.PhiConfig(intermediate_size=64, partial_rotary_factor=0.5, **COMMON)
        model = transformers.PhiForCausalLM(config)  # lm_head with a bias
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "opt", "phi"]
TOKENIZERS = {"llama": True, "opt": False, "phi": False}  # with / without BOS


@pytest.fixture(scope="module")
def tokenizers():
    return {True: make_tokenizer(True), False: make_tokenizer(False)}


def single_token_examples() -> list[Example]:
    return [
        Example(prompt="The movie was great. It was", candidates=["terrible", "great"], label=1),
        Example(prompt="A film. It was", candidates=["terrible", "great"], label=0),
        Example(prompt="Does this mean that it is true? Yes or No?\n", candidates=["Yes", "No"], label=0),
        Example(prompt="No way. Yes indeed. The movie was terrible. It was", candidates=["terrible", "great"], label=0),
    ]


def multi_token_examples() -> list[Example]:
    return [
        Example(prompt="The capital of France", candidates=["is Paris", "was a movie", "No"], label=0),
        Example(prompt="It was great", candidates=["so it is true", "because No"], label=1),
        Example(prompt="Title: Paris\nQuestion: What?\nAnswer:", candidates=["Paris", "Yes indeed no way"], label=0),
        Example(prompt="A", candidates=["terrible film", "great movie. It was great"], label=1),
        Example(prompt="Does this mean", candidates=["Yes", "No"], label=1),
    ]


def naive_mean_logprob(model, tokenizer, prompt: str, text: str) -> torch.Tensor:
    """One unpadded sequence, the full LM head: the definition of a candidate's score."""
    p = tokenizer(prompt).input_ids
    c = tokenizer(continuation(prompt, text), add_special_tokens=False).input_ids
    logits = model(input_ids=torch.tensor([p + c])).logits[0]
    logprobs = F.log_softmax(logits.float(), -1)
    return logprobs[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].mean()


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_matches_reference_and_naive(family, tokenizers):
    model, tok = make_model(family), tokenizers[TOKENIZERS[family]]
    for examples in (single_token_examples(), multi_token_examples()):
        fast = scoring.score_candidates(model, tok, examples, batch_size=3, max_length=64)
        ref = scoring.score_candidates(model, tok, examples, batch_size=2, max_length=64, one_pass=False)
        assert [len(s) for s in fast] == [len(ex.candidates) for ex in examples]
        torch.testing.assert_close(torch.tensor(sum(fast, [])), torch.tensor(sum(ref, [])), atol=1e-4, rtol=0)
        with torch.no_grad():
            naive = [naive_mean_logprob(model, tok, ex.prompt, c).item() for ex in examples for c in ex.candidates]
        torch.testing.assert_close(torch.tensor(sum(fast, [])), torch.tensor(naive), atol=1e-4, rtol=0)


def test_candidate_lengths_of_fixtures(tokenizers):
    """The fixtures exercise what they claim: one path single-token only, the other mixed."""
    tok = tokenizers[False]
    lengths = lambda exs: [  # noqa: E731
        len(tok(continuation(ex.prompt, c), add_special_tokens=False).input_ids) for ex in exs for c in ex.candidates
    ]
    assert set(lengths(single_token_examples())) == {1}
    assert max(lengths(multi_token_examples())) > 3 and min(lengths(multi_token_examples())) == 1


def test_one_pass_with_eager_attention(tokenizers):
    model, tok = make_model("llama"), tokenizers[True]
    model.set_attn_implementation("eager")
    examples = multi_token_examples()
    fast = scoring.score_candidates(model, tok, examples, batch_size=5, max_length=64)
    ref = scoring.score_candidates(model, tok, examples, batch_size=5, max_length=64, one_pass=False)
    torch.testing.assert_close(torch.tensor(sum(fast, [])), torch.tensor(sum(ref, [])), atol=1e-4, rtol=0)


def test_scoring_restores_train_mode_and_sorts_back(tokenizers):
    model, tok = make_model("llama"), tokenizers[True]
    model.train()
    examples = multi_token_examples()
    together = scoring.score_candidates(model, tok, examples, batch_size=5, max_length=64)
    assert model.training
    alone = [scoring.score_candidates(model, tok, [ex], batch_size=1, max_length=64)[0] for ex in examples]
    torch.testing.assert_close(torch.tensor(sum(together, [])), torch.tensor(sum(alone, [])), atol=1e-4, rtol=0)


def test_scoring_under_peft_lora(tokenizers):
    peft = pytest.importorskip("peft")
    model, tok = make_model("llama"), tokenizers[True]
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    examples = multi_token_examples()
    fast = scoring.score_candidates(lora, tok, examples, batch_size=3, max_length=64)
    ref = scoring.score_candidates(lora, tok, examples, batch_size=3, max_length=64, one_pass=False)
    torch.testing.assert_close(torch.tensor(sum(fast, [])), torch.tensor(sum(ref, [])), atol=1e-4, rtol=0)
    with lora.disable_adapter():  # the adapter changes the scores, so it did run
        base = scoring.score_candidates(lora, tok, examples, batch_size=3, max_length=64)
    assert max(abs(a - b) for a, b in zip(sum(fast, []), sum(base, []))) > 1e-3


def test_predict_classes():
    assert scoring.predict_classes([[-1.0, -0.5], [-0.1, -3.0, -0.2], [-2.0, -2.0]]) == [1, 0, 0]


# --------------------------------------------------------------------------- answer-only head


class NoLogitsToKeep(nn.Module):
    """A causal LM whose forward lacks ``logits_to_keep``: the fallback path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_logprobs_equal_full_head(family):
    model = make_model(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # right padding in one row
    positions = torch.tensor([[0, 4, 8], [8, 8, 1], [5, 2, 3]])
    with torch.no_grad():
        full = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        expected = torch.take_along_dim(full, positions[..., None], dim=1)
        fast = scoring.answer_logprobs(model, ids, mask, positions)
        fallback = scoring.answer_logprobs(NoLogitsToKeep(model), ids, mask, positions)
    assert fast.shape == (3, 3, VOCAB)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fallback, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_candidate_loss_value_and_gradients_match_naive(family, tokenizers):
    tok = tokenizers[TOKENIZERS[family]]
    examples = multi_token_examples()[:4]  # 3, 2, 2 and 2 candidates
    model = make_model(family)
    loss = scoring.candidate_loss(model, tok, examples, max_length=64)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    per_example = []
    for ex in examples:
        logits = torch.stack([naive_mean_logprob(model, tok, ex.prompt, c) for c in ex.candidates])
        per_example.append(F.cross_entropy(logits[None], torch.tensor([ex.label])))
    naive = torch.stack(per_example).mean()
    naive.backward()

    torch.testing.assert_close(loss, naive, atol=1e-5, rtol=0)
    q_proj = next(n for n in grads if "q_proj.weight" in n)
    assert grads[q_proj].abs().sum() > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_candidate_loss_through_ddp(tokenizers, tmp_path):
    """Under DDP the loss goes through the wrapper's forward (gradient sync), same value."""
    import torch.distributed as dist

    tok, model = tokenizers[True], make_model("llama")
    examples = multi_token_examples()[:3]
    plain = scoring.candidate_loss(model, tok, examples, max_length=64)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = scoring.training_loss(ddp, tok, examples, 64, "classification")
        loss.backward()
        scores = scoring.score_candidates(ddp, tok, examples, batch_size=3, max_length=64)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, plain)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert len(scores) == 3


def generation_examples() -> list[Example]:
    return [
        Example(prompt="Title: Paris\nContext: Paris is the capital.\nQuestion: What?\nAnswer:", target="Paris"),
        Example(prompt="Question: Is it true?\nAnswer:", target="Yes indeed, it was great"),
        Example(prompt="It was", target="terrible"),
    ]


def naive_target_loss(model, tok, examples, suffix: list[int]) -> torch.Tensor:
    total, count = 0.0, 0
    for ex in examples:
        p = tok(ex.prompt).input_ids
        c = tok(continuation(ex.prompt, ex.target), add_special_tokens=False).input_ids + suffix
        labels = torch.tensor([[-100] * len(p) + c])  # the prompt masked out
        out = model(input_ids=torch.tensor([p + c]), labels=labels)
        total, count = total + out.loss * len(c), count + len(c)
    return total / count


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_target_loss_masks_prompt_and_appends_eos(family, tokenizers):
    tok = tokenizers[TOKENIZERS[family]]
    model = make_model(family)
    examples = generation_examples()
    with torch.no_grad():
        loss = scoring.target_loss(model, tok, examples, max_length=64)
        expected = naive_target_loss(model, tok, examples, [tok.eos_token_id])
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
        mezo = scoring.target_loss(model, tok, examples, max_length=64, end_text="\n", append_eos=False)
        newline = tok("\n", add_special_tokens=False).input_ids
        torch.testing.assert_close(mezo, naive_target_loss(model, tok, examples, newline), atol=1e-5, rtol=0)
        # Changing the prompt changes the loss only through conditioning; the prompt's own
        # tokens are never predicted: a prompt made of one repeated token costs nothing extra.
        via_dispatch = scoring.training_loss(model, tok, examples, 64, "generation")
    torch.testing.assert_close(via_dispatch, loss)
    loss_grad = scoring.training_loss(model, tok, examples, 64, "generation")
    loss_grad.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_training_loss_rejects_unknown_kind(tokenizers):
    with pytest.raises(ConfigError, match="regression.*classification, generation"):
        scoring.training_loss(make_model("llama"), tokenizers[True], generation_examples(), 64, "regression")


def test_calibration_batch_is_plain_lm_loss(tokenizers):
    tok = tokenizers[True]
    model = make_model("llama")
    examples = single_token_examples()[:2] + generation_examples()[:2]
    batch = scoring.calibration_batch(tok, examples, max_length=64)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 1] == batch["input_ids"][batch["attention_mask"] == 1]).all()
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padded
    gold = ["great", "terrible", "Paris", "Yes indeed, it was great"]
    with torch.no_grad():
        loss = model(**batch).loss
        rows = [tok(ex.prompt).input_ids + tok(continuation(ex.prompt, g), add_special_tokens=False).input_ids
                for ex, g in zip(examples, gold)]
        total = sum(model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss * (len(r) - 1) for r in rows)
        expected = total / sum(len(r) - 1 for r in rows)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- truncation


def test_left_truncation_keeps_bos_and_continuation(tokenizers):
    tok = tokenizers[True]
    prompt = "The movie was great. It was great! A terrible film. It was terrible. It was"
    full = tok(prompt).input_ids
    prompt_ids, (cont,) = scoring.encode(tok, prompt, ["great"], max_length=8)
    assert len(prompt_ids) + len(cont) == 8
    assert prompt_ids[0] == tok.bos_token_id and prompt_ids[1:] == full[-(8 - len(cont) - 1):]
    assert cont == tok(" great", add_special_tokens=False).input_ids
    # All candidates share the prompt, fitted to the longest one.
    prompt_ids, conts = scoring.encode(tok, prompt, ["great", "terrible film"], max_length=8)
    assert len(prompt_ids) + max(map(len, conts)) == 8
    with pytest.raises(ConfigError, match="max_length=2"):
        scoring.encode(tok, prompt, ["terrible film"], max_length=2)


def test_truncated_scoring_paths_agree(tokenizers):
    model, tok = make_model("phi"), tokenizers[False]
    examples = multi_token_examples()
    assert len(scoring.encode(tok, examples[2].prompt, examples[2].candidates, 10)[0]) == 4  # 11 -> 4 tokens
    fast = scoring.score_candidates(model, tok, examples, batch_size=4, max_length=10)
    ref = scoring.score_candidates(model, tok, examples, batch_size=4, max_length=10, one_pass=False)
    torch.testing.assert_close(torch.tensor(sum(fast, [])), torch.tensor(sum(ref, [])), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- generation

PROMPTS = [
    "Title: Paris\nContext: Paris is the capital of France.\nQuestion: What is the capital?\nAnswer:",
    "It was",
    "Does this mean that it is true? Yes or No?\n",
    "The movie",
    "A terrible film. It was terrible. No way. Yes indeed. It",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_one_at_a_time(family, tokenizers):
    model, tok = make_model(family), tokenizers[TOKENIZERS[family]]
    batched = scoring.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=5, stop_strings=())
    single = [scoring.generate(model, tok, [p], max_new_tokens=8, batch_size=1, stop_strings=())[0] for p in PROMPTS]
    assert batched == single
    assert all(len(out) == 1 and out[0] for out in batched)


def test_stop_strings_cut_generation(tokenizers):
    """A Phi model whose head bias favours the newline token: the stop string must cut there."""
    model, tok = make_model("phi"), tokenizers[False]
    newline = tok("\n", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        model.lm_head.bias[newline] += 6.0
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    raw = scoring.generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=5, stop_strings=())
    steps_raw = len(forwards)
    cut = scoring.generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=5)
    assert any("\n" in r[0].lstrip("\n") for r in raw), raw  # the fixture does produce newlines mid-answer
    assert cut == [[r[0].split("\n")[0]] for r in raw]
    assert len(forwards) - steps_raw < steps_raw  # generation stopped early, not only the text cut


def test_sampling_is_seeded_and_leaves_rng_alone(tokenizers):
    model, tok = make_model("llama"), tokenizers[True]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = scoring.generate(model, tok, PROMPTS[:2], 6, 2, stop_strings=(), num_samples=3, temperature=1.5, seed=7)
    b = scoring.generate(model, tok, PROMPTS[:2], 6, 2, stop_strings=(), num_samples=3, temperature=1.5, seed=7)
    assert a == b and [len(x) for x in a] == [3, 3]
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ConfigError, match="num_samples=3"):
        scoring.generate(model, tok, PROMPTS[:1], 6, 1, num_samples=3)
