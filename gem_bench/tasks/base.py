"""The task interface: a row of a Hub dataset in, an Example out; predictions in, metrics out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from gem_bench.config import TaskConfig


@dataclass
class Example:
    """One rendered example.

    Classification: ``candidates`` holds the candidate texts exactly as PROTOCOL.md writes
    them and ``label`` the gold index. Generation: ``references`` holds the gold answers.
    ``target`` is the text the model is trained on (gold candidate or gold answer); the
    training/scoring text is ``prompt + continuation(prompt, candidate_or_target)``.
    """

    prompt: str
    candidates: list[str] = field(default_factory=list)
    label: int | None = None
    target: str = ""
    references: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def continuation(prompt: str, text: str) -> str:
    """The text that follows ``prompt``: a space then ``text``, unless the prompt already
    ends in white space (e.g. RTE's trailing newline). Like lm-eval-harness, the space
    belongs to the continuation, so the prompt's tokens are the same for every candidate."""
    if not prompt or prompt[-1].isspace():
        return text
    return " " + text


class Task:
    """Base class. Subclasses set ``name``, ``kind`` and implement ``example`` and ``metrics``."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "classification" | "generation"

    # Generation: the strings at which an answer ends (generation stops there early).
    stop_sequences: ClassVar[tuple[str, ...]] = ("\n",)

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.data_root: str | None = None  # where a task that reads a further split (MBPP's shots) finds it

    def postprocess(self, text: str) -> str:
        """A raw generation -> the prediction that the metrics score."""
        return text.strip()

    def example(self, row: dict[str, Any]) -> Example:
        raise NotImplementedError

    def examples(self, rows: list[dict[str, Any]]) -> list[Example]:
        """Rows of one split -> examples (MultiRC and MBPP override to group rows)."""
        return [self.example(row) for row in rows]

    def metrics(self, examples: list[Example], predictions: list[Any]) -> dict[str, float]:
        """Classification predictions are candidate indices; generation ones are strings
        (MBPP: a list of sampled programs per example)."""
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls
