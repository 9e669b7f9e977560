"""Generation tasks: SQuAD v1.1 and v2, GSM8k, MBPP.

Every task renders a prompt, a training ``target`` (the gold text trained as a language model
on its tokens after ``continuation(prompt, target)``) and the ``references`` its metric needs.
``postprocess`` turns a raw generation into the prediction; it is idempotent, and ``metrics``
applies it again so that raw generations score the same. ``stop_sequences`` are the strings at
which generation may stop early (the generation code decides whether to use them; postprocess
cuts at them anyway). Task metrics are fractions in [0, 1], like every task (metrics.py keeps the official 0-100 scale).

SQuAD (PROTOCOL.md, MeZO's template): ``Title: {title}\\nContext: {context}\\nQuestion:
{question}\\nAnswer:``; target = the first gold answer; prediction = the generation up to its
first newline, stripped. ``squad`` is v1.1 (what produced the paper's numbers), ``squad_v2``
the v2.0 the paper's text names.

SQuAD v2 "no answer" convention: an unanswerable question is trained with the target
``unanswerable`` (NO_ANSWER) and has no references; a generation that normalises to
``unanswerable`` (SQuAD normalisation: case, punctuation, articles) is mapped to the empty
prediction, which is what the official v2 metric counts as abstaining.

GSM8k: zero-shot ``Question: {question}\\nAnswer:`` (the conventional question/answer form);
target = the gold solution as released (with its ``<<...>>`` calculator annotations and the
final ``#### N`` line); exact match of the final number (``metrics.gsm8k_gold`` /
``metrics.gsm8k_prediction``). Postprocess cuts where the model starts something new (a blank
line, ``Question:``) and after the first ``#### N`` line.

MBPP: the conventional prompt of Austin et al. (2021) with the ``[BEGIN]``/``[DONE]`` markers.
Each shot is ``You are an expert Python programmer, and here is your task: {text} Your code
should pass these tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]\\n`` (tests one per line), the
query is the same up to ``[BEGIN]\\n``. Shots come from the ``prompt`` split (task ids 1-10):
``num_shots`` of them in the order 2, 3, 4 (the conventional three), then 1, 5, 6, ..., 10.
Code is taken with ``\\r\\n`` turned into ``\\n``. Target (train split, ids 601-974) =
``{code}\\n[DONE]``, so a fine-tuned model ends its program the way the shots do. A prediction
is the generation up to ``[DONE]``; it passes when ``code + test_setup_code + asserts`` exits
cleanly in the sandbox (``gem_bench.sandbox``). pass@k uses the unbiased estimator over
``num_samples`` samples per task. Executing generated code is opt-in (``execute_code: true``):
when it is off, the metrics are only ``executed: 0`` and ``total`` (no pass@k keys; every value
stays a number, so best-dev selection and reports keep working) and a warning is logged at
construction and at every evaluation, so that a run finishes instead of failing at its end.

MBPP needs the prompt split besides the run's train/test rows: set ``task.shot_rows`` (rows of
the prompt split) or ``task.data_root``; otherwise the shots are read with
``gem_bench.data.load_rows`` from ``$GEM_BENCH_DATA`` or the Hub on first use.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Sequence

from gem_bench import metrics as M
from gem_bench.config import TaskConfig
from gem_bench.errors import ConfigError
from gem_bench.sandbox import SandboxLimits, run_programs
from gem_bench.tasks.base import Example, Task, register_task

log = logging.getLogger(__name__)

NO_ANSWER = "unanswerable"


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


@register_task
class Squad(Task):
    name = "squad"
    kind = "generation"
    stop_sequences: ClassVar[tuple[str, ...]] = ("\n",)

    def example(self, row: dict[str, Any]) -> Example:
        prompt = f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question']}\nAnswer:"
        answers = list(row["answers"]["text"])
        return Example(
            prompt=prompt,
            target=answers[0] if answers else NO_ANSWER,
            references=answers,
            meta={"id": row["id"]},
        )

    def postprocess(self, text: str) -> str:
        return _first_line(text)

    def metrics(self, examples: list[Example], predictions: list[Any]) -> dict[str, float]:
        predictions = [self.postprocess(p) for p in predictions]
        scores = M.squad_metrics(predictions, [ex.references for ex in examples])
        # Records hold fractions in [0, 1] like every task; the official script's 0-100 scale is divided out.
        return {k: v if k.endswith("total") else v / 100 for k, v in scores.items()}


@register_task
class SquadV2(Squad):
    """v2: unanswerable questions train on NO_ANSWER; generating it means abstaining (empty)."""

    name = "squad_v2"

    def postprocess(self, text: str) -> str:
        answer = _first_line(text)
        return "" if M.normalize_answer(answer) == NO_ANSWER else answer


@register_task
class GSM8k(Task):
    name = "gsm8k"
    kind = "generation"
    stop_sequences: ClassVar[tuple[str, ...]] = ("\n\n", "Question:")

    def example(self, row: dict[str, Any]) -> Example:
        return Example(
            prompt=f"Question: {row['question']}\nAnswer:",
            target=row["answer"],
            references=[M.gsm8k_gold(row["answer"])],
        )

    def postprocess(self, text: str) -> str:
        for stop in self.stop_sequences:
            text = text.split(stop, 1)[0]
        if "####" in text:  # the solution's last line: "#### N"
            head, tail = text.split("####", 1)
            text = head + "####" + tail.split("\n", 1)[0]
        return text.strip()

    def metrics(self, examples: list[Example], predictions: list[Any]) -> dict[str, float]:
        if not examples:
            return {}
        answers = [M.gsm8k_prediction(self.postprocess(p)) for p in predictions]
        correct = [a is not None and a == ex.references[0] for a, ex in zip(answers, examples, strict=True)]
        return {
            "exact_match": sum(correct) / len(correct),
            "no_number": sum(a is None for a in answers) / len(answers),
            "total": float(len(correct)),
        }


MBPP_SHOT_ORDER = (2, 3, 4, 1, 5, 6, 7, 8, 9, 10)  # the conventional three first
MBPP_SHOT_SPLIT = "prompt"


def _code(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def mbpp_query(row: dict[str, Any]) -> str:
    """One task up to ``[BEGIN]\\n`` (a shot adds ``{code}\\n[DONE]\\n``)."""
    tests = "\n".join(row["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def mbpp_program(code: str, test_setup_code: str, tests: Sequence[str]) -> str:
    """The program the sandbox runs: solution, the task's setup code, then its asserts."""
    return "\n".join([code, _code(test_setup_code), *tests]) + "\n"


@register_task
class MBPP(Task):
    name = "mbpp"
    kind = "generation"
    stop_sequences: ClassVar[tuple[str, ...]] = ("[DONE]",)

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        if not 0 <= cfg.num_shots <= len(MBPP_SHOT_ORDER):
            raise ConfigError(f"task.num_shots={cfg.num_shots}; MBPP allows 0 to {len(MBPP_SHOT_ORDER)}")
        bad_k = [k for k in cfg.pass_k if not 1 <= k <= cfg.num_samples]
        if bad_k:
            raise ConfigError(
                f"task.pass_k={list(cfg.pass_k)} has k={bad_k} outside 1..task.num_samples={cfg.num_samples}; "
                "raise task.num_samples or drop those k"
            )
        if not cfg.execute_code:
            log.warning(
                "MBPP: task.execute_code=false, generated programs will NOT be run and there will be "
                "no pass@k; set task.execute_code=true to score them in the sandbox"
            )
        self.shot_rows: list[dict[str, Any]] | None = None
        self._shots: str | None = None

    def shots(self) -> str:
        """The few-shot preamble (cached)."""
        if self._shots is not None:
            return self._shots
        wanted = MBPP_SHOT_ORDER[: self.cfg.num_shots]
        if wanted and self.shot_rows is None:
            # imported here: gem_bench.data pulls in `datasets`, which only this path needs
            from gem_bench.data import load_rows

            self.shot_rows = load_rows(
                self.cfg.hub_id, self.cfg.hub_config, MBPP_SHOT_SPLIT, self.data_root, self.name
            )
        by_id = {row["task_id"]: row for row in self.shot_rows or []}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ConfigError(
                f"MBPP shots: task ids {missing} not in the {MBPP_SHOT_SPLIT} split "
                f"(ids {sorted(by_id)}); lower task.num_shots={self.cfg.num_shots}"
            )
        self._shots = "".join(f"{mbpp_query(by_id[i])}{_code(by_id[i]['code'])}\n[DONE]\n" for i in wanted)
        return self._shots

    def example(self, row: dict[str, Any]) -> Example:
        tests = list(row["test_list"])
        return Example(
            prompt=self.shots() + mbpp_query(row),
            target=_code(row["code"]) + "\n[DONE]",
            references=tests,
            meta={"task_id": row["task_id"], "test_setup_code": row.get("test_setup_code") or ""},
        )

    def postprocess(self, text: str) -> str:
        return text.split("[DONE]", 1)[0].strip()

    def metrics(self, examples: list[Example], predictions: list[Any]) -> dict[str, float]:
        """``predictions[i]``: one program or a list of ``num_samples`` programs for task i."""
        samples = [[p] if isinstance(p, str) else list(p) for p in predictions]
        if len(samples) != len(examples):
            raise ValueError(f"{len(samples)} predictions for {len(examples)} MBPP tasks")
        if not self.cfg.execute_code:
            log.warning(
                "MBPP: %d tasks NOT scored: generated programs are not executed (task.execute_code=false); "
                "the metrics hold executed=0 and no pass@k",
                len(examples),
            )
            return {"executed": 0.0, "total": float(len(examples))}
        programs, owners = [], []
        for i, (ex, progs) in enumerate(zip(examples, samples)):
            for prog in progs:
                programs.append(mbpp_program(self.postprocess(prog), ex.meta["test_setup_code"], ex.references))
                owners.append(i)
        limits = SandboxLimits(timeout_s=self.cfg.exec_timeout_s, cpu_s=max(1, int(self.cfg.exec_timeout_s)))
        results = run_programs(programs, limits)
        passed = [0] * len(examples)
        for owner, result in zip(owners, results):
            passed[owner] += result.passed
        out = {"executed": 1.0}
        for k in self.cfg.pass_k:
            scores = [M.pass_at_k(len(s), c, k) for s, c in zip(samples, passed) if len(s) >= k]
            if scores:  # tasks with fewer than k samples have no pass@k
                out[f"pass@{k}"] = sum(scores) / len(scores)
        out["total"] = float(len(examples))
        out["sandbox_errors"] = float(sum(r.status == "error" for r in results))
        out["sandbox_timeouts"] = float(sum(r.status == "timeout" for r in results))
        out["sandbox_isolated"] = float(all(r.isolated for r in results)) if results else 0.0
        return out
