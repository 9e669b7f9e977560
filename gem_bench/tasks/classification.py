"""The six classification tasks, with MeZO's prompt templates (PROTOCOL.md, "Prompts").

Each prompt is MeZO's ``Template.encode`` text as its ``encode_prompt`` uses it (leading white
space stripped, trailing spaces stripped); each candidate is the text MeZO's ``verbalize``
appends. The scored text is ``prompt + continuation(prompt, candidate)``, which reproduces
MeZO's ``verbalize`` output.
"""

from __future__ import annotations

from typing import Any

from gem_bench.errors import DataError
from gem_bench.metrics_superglue import accuracy, multirc_em, multirc_f1a
from gem_bench.tasks.base import Example, Task, register_task


class ClassificationTask(Task):
    """Rows -> prompt + fixed candidates; predictions are candidate indices."""

    kind = "classification"

    def field(self, row: dict[str, Any], key: str) -> Any:
        try:
            return row[key]
        except KeyError:
            raise DataError(
                f"task {self.name}: a row of {self.cfg.hub_id} ({self.cfg.hub_config}) has no "
                f"field {key!r} (fields: {', '.join(sorted(row))}); check task.hub_id/hub_config"
            ) from None

    def label(self, row: dict[str, Any], num_classes: int, key: str = "label") -> int:
        value = self.field(row, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
            raise DataError(
                f"task {self.name}: label {value!r} in field {key!r} is not one of "
                f"0..{num_classes - 1} (an unlabelled test split?)"
            )
        return value

    @staticmethod
    def make(prompt: str, candidates: list[str], label: int, **meta: Any) -> Example:
        # MeZO's encode_prompt lstrips the assembled text (some MultiRC paragraphs start with
        # white space) and strips trailing spaces from the prompt (COPA's " because ").
        return Example(
            prompt=prompt.lstrip().rstrip(" "),
            candidates=candidates,
            label=label,
            target=candidates[label],
            meta=meta,
        )

    def metrics(self, examples: list[Example], predictions: list[Any]) -> dict[str, float]:
        return {"accuracy": accuracy([e.label for e in examples], predictions)}


@register_task
class SST2(ClassificationTask):
    name = "sst2"

    def example(self, row: dict[str, Any]) -> Example:
        sentence = self.field(row, "sentence").strip()
        return self.make(
            f"{sentence} It was", ["terrible", "great"], self.label(row, 2), idx=row.get("idx")
        )


@register_task
class RTE(ClassificationTask):
    name = "rte"

    def example(self, row: dict[str, Any]) -> Example:
        premise, hypothesis = self.field(row, "premise"), self.field(row, "hypothesis")
        prompt = f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'
        # label 0 = entailment -> "Yes"
        return self.make(prompt, ["Yes", "No"], self.label(row, 2), idx=row.get("idx"))


@register_task
class WiC(ClassificationTask):
    name = "wic"

    def example(self, row: dict[str, Any]) -> Example:
        word = self.field(row, "word")
        prompt = (
            f'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
            f"{self.field(row, 'sentence1')}\n{self.field(row, 'sentence2')}\n"
        )
        return self.make(prompt, ["No", "Yes"], self.label(row, 2), idx=row.get("idx"))


@register_task
class BoolQ(ClassificationTask):
    """google/boolq rows (``answer`` is a bool); MeZO's BoolQTemplateV3, its default."""

    name = "boolq"

    def example(self, row: dict[str, Any]) -> Example:
        question = self.field(row, "question")
        if not question.endswith("?"):
            question += "?"
        question = question[0].upper() + question[1:]
        answer = self.field(row, "answer")
        if not isinstance(answer, bool):
            raise DataError(f"task {self.name}: field 'answer' is {answer!r}, expected true/false")
        prompt = f"{self.field(row, 'passage')} {question}\n"
        return self.make(prompt, ["Yes", "No"], 0 if answer else 1)


@register_task
class MultiRC(ClassificationTask):
    """One example per (paragraph, question, answer option) row, as the released code samples
    them; ``meta`` keeps the ids so that EM can group the options of a question."""

    name = "multirc"

    def example(self, row: dict[str, Any]) -> Example:
        prompt = (
            f"{self.field(row, 'paragraph')}\nQuestion: {self.field(row, 'question')}\n"
            f'I found this answer "{self.field(row, "answer")}". Is that correct? Yes or No?\n'
        )
        idx = self.field(row, "idx")
        return self.make(
            prompt,
            ["No", "Yes"],
            self.label(row, 2),
            paragraph=idx["paragraph"],
            question=idx["question"],
            answer=idx["answer"],
        )

    def metrics(self, examples: list[Example], predictions: list[Any]) -> dict[str, float]:
        """accuracy per answer row (what the released code reports), F1a and EM (SuperGLUE's;
        the paper's text says F1)."""
        labels = [e.label for e in examples]
        questions = [(e.meta["paragraph"], e.meta["question"]) for e in examples]
        return {
            "accuracy": accuracy(labels, predictions),
            "f1a": multirc_f1a(labels, predictions),
            "em": multirc_em(questions, labels, predictions),
        }


def _copa_choice(choice: str) -> str:
    """MeZO's CopaTemplate.capitalize ("correct"): lower-case the first word unless it is "I"."""
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


@register_task
class COPA(ClassificationTask):
    name = "copa"

    def example(self, row: dict[str, Any]) -> Example:
        premise = self.field(row, "premise").rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        question = self.field(row, "question")
        conjunctions = {"effect": " so", "cause": " because"}
        if question not in conjunctions:
            raise DataError(
                f"task {self.name}: field 'question' is {question!r}; expected cause or effect"
            )
        # The space after the conjunction belongs to the candidate (continuation() adds it).
        choices = [self.field(row, "choice1"), self.field(row, "choice2")]
        return self.make(
            premise + conjunctions[question],
            [_copa_choice(choice) for choice in choices],
            self.label(row, 2),
            idx=row.get("idx"),
        )
