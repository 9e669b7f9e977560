"""Tokenisation of examples, training losses, candidate scoring and batched generation.

Every forward goes through the model's own ``forward`` (never ``model.model``), so that a
DDP wrapper still synchronises gradients, Accelerate's autocast still applies, and PEFT
or sparse-delta wrappers still run. The LM head is applied only where log-probabilities
are needed through transformers' ``logits_to_keep`` argument (a ``(batch, k)`` tensor of
positions per row), which Llama, OPT and Phi accept.

Layout: scored sequences are LEFT-padded with explicit ``position_ids``, so the
continuation of every row ends at the last column and the positions that predict it are
the last few columns. Token ids follow ARCHITECTURE.md: ``tok(prompt)`` (with BOS when the
tokenizer adds one) followed by ``tok(continuation(prompt, text), add_special_tokens=False)``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gem_bench.errors import ConfigError
from gem_bench.tasks.base import Example, continuation

TASK_KINDS = ("classification", "generation")


# --------------------------------------------------------------------------- tokenisation


def _bos_count(tokenizer: Any, ids: list[int]) -> int:
    """1 when ``ids`` starts with the BOS the tokenizer added (kept when truncating)."""
    bos = tokenizer.bos_token_id
    return int(bos is not None and len(ids) > 0 and ids[0] == bos)


def truncate_prompt(tokenizer: Any, prompt_ids: list[int], budget: int) -> list[int]:
    """Keep at most ``budget`` prompt tokens, cutting from the LEFT (long passages lose their
    start, never the question) but keeping a leading BOS."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    keep = _bos_count(tokenizer, prompt_ids)
    if budget <= keep:
        raise ConfigError(f"max_length leaves {budget} prompt token(s); need more than {keep}")
    return prompt_ids[:keep] + prompt_ids[len(prompt_ids) - (budget - keep) :]


def encode(
    tokenizer: Any,
    prompt: str,
    texts: Sequence[str],
    max_length: int,
    suffix_ids: Sequence[int] = (),
    cut_long_continuations: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and one continuation id list per text (each followed by ``suffix_ids``).

    The prompt is truncated from the left so that it fits with the LONGEST continuation in
    ``max_length``; all continuations thus share the same prompt tokens. With
    ``cut_long_continuations`` (training targets: a long GSM8k solution or MBPP program), a
    continuation that would leave the prompt less than half of ``max_length`` is cut at its end."""
    prompt_ids = list(tokenizer(prompt).input_ids)
    conts = [
        list(tokenizer(continuation(prompt, text), add_special_tokens=False).input_ids) + list(suffix_ids)
        for text in texts
    ]
    if cut_long_continuations:
        cap = max(1, max_length - min(len(prompt_ids), max_length // 2))
        conts = [c[:cap] for c in conts]
    longest = max((len(c) for c in conts), default=0)
    if longest + 1 > max_length:
        raise ConfigError(
            f"a continuation of {longest} tokens does not fit max_length={max_length} with a prompt token"
        )
    if not prompt_ids:
        raise ConfigError(f"prompt {prompt!r} has no tokens: nothing predicts the continuation's first token")
    return truncate_prompt(tokenizer, prompt_ids, max_length - longest), conts


def gold_text(example: Example) -> str:
    """What the model is trained on: ``target``, else the gold candidate."""
    if example.target:
        return example.target
    if example.candidates and example.label is not None:
        return example.candidates[example.label]
    raise ConfigError(f"example has neither a target nor candidates with a label: {example.prompt[:80]!r}")


def _pad_id(tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return pad
    return 0


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids (counting real tokens only) for left padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


# --------------------------------------------------------------------------- model access


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (``accelerator.unwrap_model`` semantics)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """True when the causal LM under the wrappers (DDP, PEFT) takes ``logits_to_keep``."""
    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):  # PEFT passes unknown keywords through
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _forward_at(model: nn.Module, positions: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """Log-softmax ``(batch, k, vocab)`` at ``positions`` ``(batch, k)`` and the model output."""
    if _accepts_logits_to_keep(model):
        out = model(logits_to_keep=positions, **inputs)
        logits = out.logits
    else:  # a causal LM without the argument: full head, then select
        out = model(**inputs)
        logits = torch.take_along_dim(out.logits, positions[..., None], dim=1)
    return F.log_softmax(logits.float(), dim=-1), out


def answer_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """Log-softmax over the vocabulary at ``positions`` only: ``(batch, k)`` column indices per
    row in, ``(batch, k, vocab)`` float32 out. The LM head runs only at those positions.

    ``forward_kwargs`` go to the model's forward (``position_ids``, ``past_key_values``)."""
    logprobs, _ = _forward_at(model, positions, input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    return logprobs


def _continuation_logprobs(
    model: nn.Module, prompts: list[list[int]], conts: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs ``(rows, k)`` of each row's continuation given its prompt, and the
    ``(rows, k)`` mask of real tokens (k = the longest continuation). One forward, left padded."""
    device = _device(model)
    batch = _left_pad([p + c for p, c in zip(prompts, conts)], pad_id, device)
    width = batch["input_ids"].shape[1]
    lengths = torch.tensor([len(c) for c in conts], device=device)
    k = int(lengths.max())
    # Token j of a continuation of length n sits at column width-n+j, predicted from the column before.
    offsets = torch.arange(k, device=device)[None, :] - lengths[:, None]  # j - n
    valid = offsets < 0
    columns = torch.where(valid, width + offsets, width - 1)
    targets = torch.take_along_dim(batch["input_ids"], columns, dim=1)
    logprobs = answer_logprobs(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        columns - 1,
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    token_lp = torch.take_along_dim(logprobs, targets[..., None], dim=-1).squeeze(-1)
    return token_lp * valid, valid


# --------------------------------------------------------------------------- losses


def candidate_loss(model: nn.Module, tokenizer: Any, examples: list[Example], max_length: int) -> torch.Tensor:
    """Cross-entropy over each example's candidates; a candidate's logit is the MEAN
    log-probability of its tokens (MeZO/GEM). Averaged over the examples."""
    prompts, conts, owners = [], [], []
    for i, ex in enumerate(examples):
        if ex.label is None or not 0 <= ex.label < len(ex.candidates):
            raise ConfigError(f"label {ex.label!r} is not a candidate index (0..{len(ex.candidates) - 1})")
        prompt_ids, cand_ids = encode(tokenizer, ex.prompt, ex.candidates, max_length)
        prompts += [prompt_ids] * len(cand_ids)
        conts += cand_ids
        owners += [i] * len(cand_ids)
    token_lp, valid = _continuation_logprobs(model, prompts, conts, _pad_id(tokenizer))
    mean_lp = token_lp.sum(-1) / valid.sum(-1)
    # Examples may have different numbers of candidates: pad the logits with -inf.
    width = max(len(ex.candidates) for ex in examples)
    logits = torch.full((len(examples), width), float("-inf"), device=mean_lp.device)
    rows = torch.tensor(owners, device=mean_lp.device)
    cols = torch.tensor([j for ex in examples for j in range(len(ex.candidates))], device=mean_lp.device)
    logits = logits.index_put((rows, cols), mean_lp)
    labels = torch.tensor([ex.label for ex in examples], device=mean_lp.device)
    return F.cross_entropy(logits, labels)


def _target_suffix(tokenizer: Any, end_text: str, append_eos: bool) -> list[int]:
    suffix = list(tokenizer(end_text, add_special_tokens=False).input_ids) if end_text else []
    if append_eos and tokenizer.eos_token_id is not None:
        suffix.append(tokenizer.eos_token_id)
    return suffix


def target_loss(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    max_length: int,
    end_text: str = "",
    append_eos: bool = True,
) -> torch.Tensor:
    """LM loss (teacher forcing) on the target's tokens only, the prompt masked out; the mean
    over all target tokens of the batch (as HF's and MeZO's LM loss).

    The target is followed by EOS by default, so that the model learns to stop where the
    generation's stop strings do not cut it (GSM8k answers span lines). MeZO's SQuAD trains
    on ``" answer\\n"`` instead: ``end_text="\\n", append_eos=False``. The end tokens are
    tokenised on their own and appended to the target's ids."""
    suffix = _target_suffix(tokenizer, end_text, append_eos)
    prompts, conts = [], []
    for ex in examples:
        prompt_ids, (cont_ids,) = encode(tokenizer, ex.prompt, [gold_text(ex)], max_length, suffix, cut_long_continuations=True)
        prompts.append(prompt_ids)
        conts.append(cont_ids)
    token_lp, valid = _continuation_logprobs(model, prompts, conts, _pad_id(tokenizer))
    return -token_lp.sum() / valid.sum()


def training_loss(
    model: nn.Module, tokenizer: Any, examples: list[Example], max_length: int, kind: str, **target_options: Any
) -> torch.Tensor:
    """``candidate_loss`` for classification, ``target_loss`` (with ``target_options``) for generation."""
    if kind == "classification":
        return candidate_loss(model, tokenizer, examples, max_length)
    if kind == "generation":
        return target_loss(model, tokenizer, examples, max_length, **target_options)
    raise ConfigError(f"unknown task kind {kind!r}; valid: {', '.join(TASK_KINDS)}")


def calibration_batch(
    tokenizer: Any, examples: list[Example], max_length: int, end_text: str = "", append_eos: bool = False
) -> dict[str, torch.Tensor]:
    """Plain causal-LM batch over prompt + gold continuation (right padded; labels are the
    input ids, -100 on padding), so that ``model(**batch).loss`` is the calibration loss.
    CPU tensors; the caller moves them."""
    suffix = _target_suffix(tokenizer, end_text, append_eos)
    rows = []
    for ex in examples:
        prompt_ids, (cont_ids,) = encode(tokenizer, ex.prompt, [gold_text(ex)], max_length, suffix, cut_long_continuations=True)
        rows.append(prompt_ids + cont_ids)
    input_ids, attention_mask = _right_pad(rows, _pad_id(tokenizer))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- scoring


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd; the previous train/eval mode is restored afterwards.
    (``no_grad`` rather than ``inference_mode``: a wrapper may cache tensors that training reuses.)"""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first, so memory peaks early), cut into batches."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


Encoded = list[tuple[list[int], list[list[int]]]]  # per example: prompt ids, candidate ids


def _score_one_pass(model: nn.Module, encoded: Encoded, pad_id: int) -> list[list[float]]:
    """Mean log-prob per candidate, the shared prompt run once.

    The prompt's last position gives every candidate's first token. Multi-token candidates
    then run against the prompt's KV cache, repeated once per candidate, with the attention
    mask and positions continuing the left-padded prompt."""
    device = _device(model)
    prompt = _left_pad([p for p, _ in encoded], pad_id, device)
    multi = any(len(c) > 1 for _, cands in encoded for c in cands)
    last = torch.full((len(encoded), 1), prompt["input_ids"].shape[1] - 1, device=device)
    first, out = _forward_at(model, last, **prompt, use_cache=multi)
    first = first[:, 0]  # (examples, vocab)
    owners = [i for i, (_, cands) in enumerate(encoded) for _ in cands]
    conts = [c for _, cands in encoded for c in cands]
    rows = torch.tensor(owners, device=device)
    first_tokens = torch.tensor([c[0] for c in conts], device=device)
    sums = first[rows, first_tokens]
    if multi:
        cache = out.past_key_values
        cache.batch_select_indices(rows)  # new tensors per candidate row; the prompt's are not reused
        cand_ids, cand_mask = _right_pad(conts, pad_id)
        cand_ids, cand_mask = cand_ids.to(device), cand_mask.to(device)
        width = cand_ids.shape[1]
        prompt_lengths = prompt["attention_mask"].sum(-1)[rows]
        position_ids = prompt_lengths[:, None] + torch.arange(width, device=device)[None, :]
        # Column j predicts candidate token j+1.
        columns = torch.arange(width - 1, device=device).expand(len(conts), -1)
        logprobs = answer_logprobs(
            model,
            cand_ids,
            torch.cat([prompt["attention_mask"][rows], cand_mask], dim=1),
            columns,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        rest = torch.take_along_dim(logprobs, cand_ids[:, 1:, None], dim=-1).squeeze(-1)
        sums = sums + (rest * cand_mask[:, 1:]).sum(-1)
    means = (sums / torch.tensor([len(c) for c in conts], device=device)).tolist()
    return _regroup(means, [len(cands) for _, cands in encoded])


def _score_reference(model: nn.Module, encoded: Encoded, pad_id: int) -> list[list[float]]:
    """The plain path: one right-padded sequence per candidate, the LM head everywhere
    (a check on the fast path; its logits are rows x length x vocab, so keep batches small)."""
    device = _device(model)
    rows = [(p, c) for p, cands in encoded for c in cands]
    input_ids, mask = _right_pad([p + c for p, c in rows], pad_id)
    logprobs = F.log_softmax(model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
    means = []
    for r, (p, c) in enumerate(rows):
        predicted_from = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
        means.append(logprobs[r, predicted_from, torch.tensor(c, device=device)].mean().item())
    return _regroup(means, [len(cands) for _, cands in encoded])


def _regroup(flat: list[float], counts: list[int]) -> list[list[float]]:
    out, start = [], 0
    for n in counts:
        out.append(flat[start : start + n])
        start += n
    return out


def score_candidates(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    batch_size: int,
    max_length: int,
    one_pass: bool = True,
) -> list[list[float]]:
    """Mean token log-probability of every candidate of every example, in input order.

    ``one_pass`` runs each prompt once (see ``_score_one_pass``); ``one_pass=False`` is the
    reference path with one full sequence per candidate. Both agree to float rounding.
    ``batch_size`` counts examples per forward."""
    model = unwrap(model)  # no DDP forward: evaluation may run on some processes only
    pad_id = _pad_id(tokenizer)
    encoded = [encode(tokenizer, ex.prompt, ex.candidates, max_length) for ex in examples]
    score = _score_one_pass if one_pass else _score_reference
    scores: list[list[float]] = [[] for _ in examples]
    with _evaluating(model):
        for batch in _length_batches([len(p) for p, _ in encoded], batch_size):
            for i, s in zip(batch, score(model, [encoded[i] for i in batch], pad_id)):
                scores[i] = s
    return scores


def predict_classes(scores: list[list[float]]) -> list[int]:
    """Index of the best-scoring candidate (the first one on ties)."""
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


# --------------------------------------------------------------------------- generation


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string."""
    ends = [text.find(s) for s in stop_strings if s and s in text]
    return text[: min(ends)] if ends else text


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop_strings: Sequence[str] = ("\n",),
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int | None = None,
    max_length: int | None = None,
) -> list[list[str]]:
    """``num_samples`` continuations per prompt (only the new text, cut before the first stop
    string), in input order.

    Greedy when ``temperature == 0``, else sampling at that temperature (top-k/top-p come
    from the model's generation config; transformers' default is top_k=50); ``seed`` fixes
    the sampling without touching the caller's RNG. Prompts are tokenised as in scoring, left truncated to
    ``max_length - max_new_tokens`` when ``max_length`` is given, sorted by length and
    LEFT-padded in batches; generation stops per row at EOS or a stop string."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if num_samples < 1 or (num_samples > 1 and temperature == 0):
        raise ConfigError(f"num_samples={num_samples} needs temperature > 0 (greedy gives one answer)")
    model = unwrap(model)
    device = _device(model)
    pad_id = _pad_id(tokenizer)
    ids = [list(tokenizer(p).input_ids) for p in prompts]
    if max_length is not None:
        ids = [truncate_prompt(tokenizer, x, max_length - max_new_tokens) for x in ids]
    options: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        options = {"do_sample": True, "temperature": temperature, "num_return_sequences": num_samples}
    stops = [s for s in stop_strings if s]
    if stops:
        options.update(stop_strings=list(stops), tokenizer=tokenizer)
    outputs: list[list[str]] = [[] for _ in prompts]
    devices = [device] if device.type == "cuda" else []
    with _evaluating(model), torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for batch in _length_batches([len(x) for x in ids], batch_size):
            inputs = _left_pad([ids[i] for i in batch], pad_id, device)
            inputs.pop("position_ids")  # generate derives them from the attention mask
            generated = model.generate(
                **inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **options
            )
            new = generated[:, inputs["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(batch):
                outputs[i] = [_cut(t, stops) for t in texts[j * num_samples : (j + 1) * num_samples]]
    return outputs
