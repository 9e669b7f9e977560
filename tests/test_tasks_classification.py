"""The six classification tasks render MeZO's prompts exactly; their metrics; their YAMLs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gem_bench.config import TaskConfig, register_configs
from gem_bench.data import load_rows, mirror_path
from gem_bench.errors import DataError
from gem_bench.metrics_superglue import accuracy, multirc_em, multirc_f1a
from gem_bench.tasks import TASKS, continuation

MIRROR = Path(os.environ.get("GEM_BENCH_DATA", "/work/shared/data/hub"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HUB = {
    "sst2": ("nyu-mll/glue", "sst2"),
    "rte": ("aps/super_glue", "rte"),
    "wic": ("aps/super_glue", "wic"),
    "boolq": ("google/boolq", "default"),
    "multirc": ("aps/super_glue", "multirc"),
    "copa": ("aps/super_glue", "copa"),
}


def task(name: str):
    hub_id, config = HUB[name]
    return TASKS[name](TaskConfig(name=name, hub_id=hub_id, hub_config=config))


def mirror_row(name: str, split: str, line: int, tmp_path: Path) -> dict:
    """Row ``line`` (0-based) of the real mirror, read through load_rows from a one-line copy."""
    hub_id, config = HUB[name]
    source = mirror_path(MIRROR, hub_id, config, split)
    if not source.is_file():
        pytest.skip(f"benchmark mirror not found at {source} (set GEM_BENCH_DATA)")
    with source.open(encoding="utf-8") as handle:
        text = next(l for i, l in enumerate(handle) if i == line)
    copy = mirror_path(tmp_path, hub_id, config, split)
    copy.parent.mkdir(parents=True)
    copy.write_text(text, encoding="utf-8")
    (row,) = load_rows(hub_id, config, split, tmp_path, name)
    return row


def full_text(example, index: int) -> str:
    return example.prompt + continuation(example.prompt, example.candidates[index])


def test_registry_has_the_six_tasks():
    for name in HUB:
        assert TASKS[name].name == name and TASKS[name].kind == "classification"


# ---- one real example per task, written out ----------------------------------------------------


def test_sst2(tmp_path):
    ex = task("sst2").example(mirror_row("sst2", "validation", 0, tmp_path))
    assert ex.prompt == "it 's a charming and often affecting journey . It was"
    assert ex.candidates == ["terrible", "great"]
    assert (ex.label, ex.target) == (1, "great")
    assert full_text(ex, 1) == "it 's a charming and often affecting journey . It was great"


def test_rte(tmp_path):
    ex = task("rte").example(mirror_row("rte", "validation", 0, tmp_path))
    assert ex.prompt == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation.\n"
        'Does this mean that "Christopher Reeve had an accident." is true? Yes or No?\n'
    )
    assert ex.candidates == ["Yes", "No"]
    assert (ex.label, ex.target) == (1, "No")  # not_entailment
    assert full_text(ex, 1).endswith("Yes or No?\nNo")  # no space after the newline


def test_wic(tmp_path):
    ex = task("wic").example(mirror_row("wic", "validation", 0, tmp_path))
    assert ex.prompt == (
        'Does the word "board" have the same meaning in these two sentences? Yes, No?\n'
        "Room and board .\nHe nailed boards across the windows .\n"
    )
    assert ex.candidates == ["No", "Yes"]
    assert (ex.label, ex.target) == (0, "No")


def test_boolq(tmp_path):
    ex = task("boolq").example(mirror_row("boolq", "validation", 2644, tmp_path))
    assert ex.prompt == "The season is set for release in 2019. Are they going to make a punisher season 2?\n"
    assert ex.candidates == ["Yes", "No"]
    assert (ex.label, ex.target) == (0, "Yes")  # answer true


def test_boolq_false_answer_and_existing_question_mark():
    ex = task("boolq").example({"question": "is it?", "answer": False, "passage": "P."})
    assert ex.prompt == "P. Is it?\n"
    assert (ex.label, ex.target) == (1, "No")


def test_multirc(tmp_path):
    ex = task("multirc").example(mirror_row("multirc", "validation", 2134, tmp_path))
    assert ex.prompt == (
        "Susan wanted to have a birthday party. She called all of her friends. She has five "
        "friends. Her mom said that Susan can invite them all to the party. Her first friend could "
        "not go to the party because she was sick. Her second friend was going out of town. Her "
        "third friend was not so sure if her parents would let her. The fourth friend said maybe. "
        "The fifth friend could go to the party for sure. Susan was a little sad. On the day of the "
        "party, all five friends showed up. Each friend had a present for Susan. Susan was happy "
        "and sent each friend a thank you card the next week. \n"
        "Question: Did Susan's sick friend recover?\n"
        'I found this answer "Yes,she recovered". Is that correct? Yes or No?\n'
    )
    assert ex.candidates == ["No", "Yes"]
    assert (ex.label, ex.target) == (1, "Yes")
    assert ex.meta == {"paragraph": 36, "question": 422, "answer": 2134}


def test_multirc_leading_white_space_is_stripped_like_mezo():
    row = {"paragraph": " Para. ", "question": "Q?", "answer": "A", "label": 0,
           "idx": {"paragraph": 0, "question": 0, "answer": 0}}
    ex = task("multirc").example(row)
    assert ex.prompt == 'Para. \nQuestion: Q?\nI found this answer "A". Is that correct? Yes or No?\n'


def test_copa_effect(tmp_path):
    ex = task("copa").example(mirror_row("copa", "validation", 0, tmp_path))
    assert ex.prompt == "The man turned on the faucet so"
    assert ex.candidates == ["the toilet filled with water.", "water flowed from the spout."]
    assert (ex.label, ex.target) == (1, "water flowed from the spout.")
    # MeZO's verbalize: premise without "." + " so " + choice with its first word lower-cased
    assert full_text(ex, 1) == "The man turned on the faucet so water flowed from the spout."


def test_copa_cause(tmp_path):
    ex = task("copa").example(mirror_row("copa", "validation", 4, tmp_path))
    assert ex.prompt == "The hamburger meat browned because"
    assert ex.candidates == ["the cook froze it.", "the cook grilled it."]
    assert ex.label == 1


def test_copa_keeps_capital_i(tmp_path):
    ex = task("copa").example(mirror_row("copa", "validation", 3, tmp_path))
    assert ex.prompt == "I wanted to conserve energy so"
    assert ex.candidates == [
        "I swept the floor in the unoccupied room.",
        "I shut off the light in the unoccupied room.",
    ]


# ---- bad rows -------------------------------------------------------------------------------


def test_missing_field_names_it():
    with pytest.raises(DataError, match="no field 'answer'.*fields: label, passage, question"):
        task("boolq").example({"question": "q", "passage": "p", "label": 1})


def test_unlabelled_row_is_rejected():
    with pytest.raises(DataError, match="label -1 in field 'label' is not one of 0..1"):
        task("rte").example({"premise": "p", "hypothesis": "h", "label": -1, "idx": 0})


def test_copa_unknown_question():
    row = {"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}
    with pytest.raises(DataError, match="'why'; expected cause or effect"):
        task("copa").example(row)


# ---- metrics --------------------------------------------------------------------------------

# Three questions. q(0,0): gold 1 0 1, predicted 1 0 0 (one miss); q(0,1): gold 0 1, predicted
# 0 1 (all right); q(1,2): gold 1 0, predicted 1 1 (one false positive).
# TP=3, FP=1, FN=1 -> precision 3/4, recall 3/4, F1a 0.75; EM 1/3; accuracy 5/7.
QUESTIONS = [(0, 0)] * 3 + [(0, 1)] * 2 + [(1, 2)] * 2
GOLD = [1, 0, 1, 0, 1, 1, 0]
PRED = [1, 0, 0, 0, 1, 1, 1]


def test_multirc_metric_functions():
    assert multirc_f1a(GOLD, PRED) == pytest.approx(0.75)
    assert multirc_em(QUESTIONS, GOLD, PRED) == pytest.approx(1 / 3)
    assert accuracy(GOLD, PRED) == pytest.approx(5 / 7)


def test_multirc_f1a_unbalanced_and_degenerate():
    # TP=1, FP=2, FN=0: precision 1/3, recall 1, F1 = 2*(1/3)/(4/3) = 0.5
    assert multirc_f1a([1, 0, 0], [1, 1, 1]) == pytest.approx(0.5)
    assert multirc_f1a([0, 0], [0, 0]) == 0.0  # no positives at all
    with pytest.raises(ValueError, match="differ in length"):
        multirc_f1a([1, 0], [1])


def test_multirc_em_groups_by_paragraph_and_question():
    # the same question id under two paragraphs is two questions
    assert multirc_em([(0, 5), (1, 5)], [1, 1], [1, 0]) == pytest.approx(0.5)


def test_multirc_task_metrics_group_by_meta():
    multirc = task("multirc")
    examples = [
        multirc.example({"paragraph": "P", "question": "Q", "answer": "A", "label": gold,
                         "idx": {"paragraph": p, "question": q, "answer": i}})
        for i, ((p, q), gold) in enumerate(zip(QUESTIONS, GOLD))
    ]
    metrics = multirc.metrics(examples, PRED)
    assert metrics == pytest.approx({"accuracy": 5 / 7, "f1a": 0.75, "em": 1 / 3})


def test_accuracy_metrics_of_a_plain_task():
    sst2 = task("sst2")
    examples = [sst2.example({"sentence": "s", "label": y, "idx": i}) for i, y in enumerate([0, 1, 1, 0])]
    assert sst2.metrics(examples, [0, 1, 0, 0]) == {"accuracy": 0.75}


# ---- task YAMLs -----------------------------------------------------------------------------

EXPECTED = {  # PROTOCOL.md: hub id, config, train, dev, epochs
    "sst2": ("nyu-mll/glue", "sst2", 6060, 675, 7),
    "rte": ("aps/super_glue", "rte", 1000, 500, 10),
    "wic": ("aps/super_glue", "wic", 1000, 500, 10),
    "boolq": ("google/boolq", "default", 1000, 500, 10),
    "multirc": ("aps/super_glue", "multirc", 1000, 500, 10),
    "copa": ("aps/super_glue", "copa", 360, 40, 10),
}


def test_task_yamls_compose_against_the_schema():
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        for name, (hub_id, config, n_train, n_dev, epochs) in EXPECTED.items():
            cfg = OmegaConf.to_object(compose(overrides=[f"+task={name}"]).task)
            assert isinstance(cfg, TaskConfig)
            assert (cfg.name, cfg.hub_id, cfg.hub_config) == (name, hub_id, config)
            assert (cfg.num_train, cfg.num_dev, cfg.num_test, cfg.epochs) == (n_train, n_dev, None, epochs)
            assert (cfg.train_split, cfg.test_split, cfg.max_length) == ("train", "validation", 1024)
            assert cfg.metric == "accuracy" and cfg.carve_train_from_test is False
            assert name in TASKS
