"""Generation tasks: real mirror rows render to exactly the expected prompts; postprocessing and
metrics end to end; the task YAMLs fit the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from gem_bench.config import TaskConfig
from gem_bench.errors import ConfigError
from gem_bench.tasks.base import TASKS, continuation
from gem_bench.tasks.generation import GSM8k, MBPP, NO_ANSWER, Squad, SquadV2

HUB = Path("/work/shared/data/hub")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "task"
needs_mirror = pytest.mark.skipif(not HUB.is_dir(), reason=f"data mirror {HUB} not present")


def mirror_rows(hub_id: str, config: str, split: str, where=lambda row: True, limit: int = 1) -> list[dict]:
    rows = []
    with (HUB / hub_id / config / f"{split}.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if where(row):
                rows.append(row)
                if len(rows) == limit:
                    break
    return rows


def task_cfg(name: str, **overrides) -> TaskConfig:
    """The task's YAML merged onto the schema (so this also checks the YAML), plus overrides."""
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert data.pop("defaults") == ["task_schema", "_self_"]
    merged = OmegaConf.merge(OmegaConf.structured(TaskConfig), data, overrides)
    return OmegaConf.to_object(merged)


def test_registered():
    for name, cls in {"squad": Squad, "squad_v2": SquadV2, "gsm8k": GSM8k, "mbpp": MBPP}.items():
        assert TASKS[name] is cls and cls.kind == "generation"
        assert task_cfg(name).name == name


@needs_mirror
def test_squad_prompt_exact():
    row = mirror_rows("rajpurkar/squad", "plain_text", "validation")[0]
    ex = Squad(task_cfg("squad")).example(row)
    assert ex.prompt == (
        "Title: Super_Bowl_50\n"
        "Context: Super Bowl 50 was an American football game to determine the champion of the National "
        "Football League (NFL) for the 2015 season. The American Football Conference (AFC) champion Denver "
        "Broncos defeated the National Football Conference (NFC) champion Carolina Panthers 24–10 to earn "
        "their third Super Bowl title. The game was played on February 7, 2016, at Levi's Stadium in the San "
        "Francisco Bay Area at Santa Clara, California. As this was the 50th Super Bowl, the league emphasized "
        'the "golden anniversary" with various gold-themed initiatives, as well as temporarily suspending the '
        "tradition of naming each Super Bowl game with Roman numerals (under which the game would have been "
        'known as "Super Bowl L"), so that the logo could prominently feature the Arabic numerals 50.\n'
        "Question: Which NFL team represented the AFC at Super Bowl 50?\n"
        "Answer:"
    )
    assert ex.target == "Denver Broncos"
    assert ex.references == ["Denver Broncos"] * 3
    assert continuation(ex.prompt, ex.target) == " Denver Broncos"


@needs_mirror
def test_squad_v2_unanswerable_prompt_and_target():
    row = mirror_rows("rajpurkar/squad_v2", "squad_v2", "validation", lambda r: not r["answers"]["text"])[0]
    ex = SquadV2(task_cfg("squad_v2")).example(row)
    assert ex.prompt == (
        "Title: Normans\n"
        "Context: The Normans (Norman: Nourmands; French: Normands; Latin: Normanni) were the people who in "
        "the 10th and 11th centuries gave their name to Normandy, a region in France. They were descended "
        'from Norse ("Norman" comes from "Norseman") raiders and pirates from Denmark, Iceland and Norway '
        "who, under their leader Rollo, agreed to swear fealty to King Charles III of West Francia. Through "
        "generations of assimilation and mixing with the native Frankish and Roman-Gaulish populations, their "
        "descendants would gradually merge with the Carolingian-based cultures of West Francia. The distinct "
        "cultural and ethnic identity of the Normans emerged initially in the first half of the 10th century, "
        "and it continued to evolve over the succeeding centuries.\n"
        "Question: Who gave their name to Normandy in the 1000's and 1100's\n"
        "Answer:"
    )
    assert ex.target == NO_ANSWER and ex.references == []


@needs_mirror
def test_gsm8k_prompt_exact():
    row = mirror_rows("openai/gsm8k", "main", "test")[0]
    ex = GSM8k(task_cfg("gsm8k")).example(row)
    assert ex.prompt == (
        "Question: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
        "muffins for her friends every day with four. She sells the remainder at the farmers' market daily "
        "for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?\n"
        "Answer:"
    )
    assert ex.target == row["answer"] and ex.target.endswith("#### 18")
    assert ex.references == ["18"]


MBPP_TASK_11 = (
    "You are an expert Python programmer, and here is your task: Write a python function to remove first "
    "and last occurrence of a given character from the string. Your code should pass these tests:\n\n"
    'assert remove_Occ("hello","l") == "heo"\n'
    'assert remove_Occ("abcda","a") == "bcd"\n'
    'assert remove_Occ("PHP","P") == "H"\n'
    "[BEGIN]\n"
)
MBPP_SHOTS = (
    "You are an expert Python programmer, and here is your task: Write a function to find the similar "
    "elements from the given two tuple lists. Your code should pass these tests:\n\n"
    "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
    "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
    "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n"
    "[BEGIN]\n"
    "def similar_elements(test_tup1, test_tup2):\n"
    "  res = tuple(set(test_tup1) & set(test_tup2))\n"
    "  return (res)\n"
    "[DONE]\n"
    "You are an expert Python programmer, and here is your task: Write a python function to identify "
    "non-prime numbers. Your code should pass these tests:\n\n"
    "assert is_not_prime(2) == False\n"
    "assert is_not_prime(10) == True\n"
    "assert is_not_prime(35) == True\n"
    "[BEGIN]\n"
    "import math\n"
    "def is_not_prime(n):\n"
    "    result = False\n"
    "    for i in range(2,int(math.sqrt(n)) + 1):\n"
    "        if n % i == 0:\n"
    "            result = True\n"
    "    return result\n"
    "[DONE]\n"
    "You are an expert Python programmer, and here is your task: Write a function to find the largest "
    "integers from a given list of numbers using heap queue algorithm. Your code should pass these tests:\n\n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]\n"
    "[BEGIN]\n"
    "import heapq as hq\n"
    "def heap_queue_largest(nums,n):\n"
    "  largest_nums = hq.nlargest(n, nums)\n"
    "  return largest_nums\n"
    "[DONE]\n"
)


def mbpp_task(**overrides) -> MBPP:
    task = MBPP(task_cfg("mbpp", **overrides))
    task.shot_rows = mirror_rows("google-research-datasets/mbpp", "full", "prompt", limit=10)
    return task


@needs_mirror
def test_mbpp_prompt_exact_three_shots():
    row = mirror_rows("google-research-datasets/mbpp", "full", "test")[0]
    ex = mbpp_task().example(row)
    assert ex.prompt == MBPP_SHOTS + MBPP_TASK_11
    assert ex.target.startswith("def remove_Occ(s,ch): \n    for i in range(len(s)): \n")
    assert ex.target.endswith("    return s\n[DONE]") and "\r" not in ex.target
    assert continuation(ex.prompt, ex.target) == ex.target  # the prompt ends with a newline
    assert ex.references == row["test_list"] and ex.meta["task_id"] == 11


@needs_mirror
def test_mbpp_zero_shots_and_shots_read_through_data_root():
    row = mirror_rows("google-research-datasets/mbpp", "full", "test")[0]
    assert MBPP(task_cfg("mbpp", num_shots=0)).example(row).prompt == MBPP_TASK_11
    task = MBPP(task_cfg("mbpp", num_shots=5))
    task.data_root = str(HUB)  # read by gem_bench.data.load_rows
    shots = task.shots()
    assert shots.startswith(MBPP_SHOTS)  # 2, 3, 4 first, then 1 and 5
    assert shots.count("[DONE]\n") == 5 and "def min_cost(" in shots


def test_mbpp_config_errors():
    with pytest.raises(ConfigError, match="num_shots=11"):
        MBPP(task_cfg("mbpp", num_shots=11))
    with pytest.raises(ConfigError, match=r"k=\[3\].*num_samples=2"):
        MBPP(task_cfg("mbpp", num_samples=2, pass_k=[1, 3]))


def test_postprocess():
    cfg = task_cfg("squad")
    assert Squad(cfg).postprocess(" Denver Broncos\nQuestion: next") == "Denver Broncos"
    v2 = SquadV2(task_cfg("squad_v2"))
    assert v2.postprocess(" Unanswerable.\nmore") == ""
    assert v2.postprocess(" the unanswerable ") == ""
    assert v2.postprocess(" France\n") == "France"
    gsm = GSM8k(task_cfg("gsm8k"))
    assert gsm.postprocess(" 2 + 3 = 5\n#### 5\nQuestion: 7 more?") == "2 + 3 = 5\n#### 5"
    assert gsm.postprocess(" She has 4.\n\nQuestion: a 9") == "She has 4."
    assert gsm.postprocess(" x = 5\n#### 5\n#### 6") == "x = 5\n#### 5"
    mbpp = MBPP(task_cfg("mbpp"))
    assert mbpp.postprocess("def f():\n  return 1\n[DONE]\nYou are") == "def f():\n  return 1"
    for task, text in ((v2, " Paris\nx"), (gsm, " 3\n#### 3\n\nQ"), (mbpp, "x=1\n[DONE]")):
        assert task.postprocess(task.postprocess(text)) == task.postprocess(text)  # idempotent


def test_squad_v2_metrics_with_no_answer_convention():
    task = SquadV2(task_cfg("squad_v2"))
    from gem_bench.tasks.base import Example

    examples = [
        Example(prompt="p", references=["France", "in France"]),
        Example(prompt="p", references=[]),
        Example(prompt="p", references=[]),
    ]
    # raw generations: answerable right; abstains; answers an unanswerable question
    out = task.metrics(examples, [" France\nfoo", " unanswerable\n", " Paris"])
    assert out["HasAns_exact"] == 1.0 and out["NoAns_exact"] == 0.5
    assert out["exact"] == pytest.approx(2 / 3) and out["f1"] == pytest.approx(2 / 3)


def test_gsm8k_metrics():
    task = GSM8k(task_cfg("gsm8k"))
    rows = [{"question": "q", "answer": "so 2*500=1000\n#### 1,000"}, {"question": "q", "answer": "#### -3"}]
    examples = task.examples(rows)
    assert [ex.references for ex in examples] == [["1000"], ["-3"]]
    out = task.metrics(examples, [" 2 * 500 = $1,000.\n#### $1,000.\n\nQuestion: 5", " no idea"])
    assert out == {"exact_match": 0.5, "no_number": 0.5, "total": 2.0}


MBPP_ROW = {
    "task_id": 900,
    "text": "Write a function to add two numbers.",
    "code": "def add(a, b):\r\n  return a + b",
    "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
    "test_setup_code": "",
    "challenge_test_list": [],
}


def test_mbpp_metrics_execute_pass_at_k():
    task = MBPP(task_cfg("mbpp", num_shots=0, execute_code=True, num_samples=3, pass_k=[1, 3], exec_timeout_s=10))
    examples = task.examples([MBPP_ROW, {**MBPP_ROW, "task_id": 901}])
    good, bad = "def add(a, b):\n  return a + b\n[DONE]", "def add(a, b):\n  return a - b"
    out = task.metrics(examples, [[good, bad, good], [bad, bad, "def add(a, b) return"]])
    assert out["pass@1"] == pytest.approx((2 / 3) / 2)
    assert out["pass@3"] == pytest.approx(0.5)
    assert out["executed"] == 1.0 and out["total"] == 2.0 and out["sandbox_errors"] == 0.0


def test_mbpp_metrics_execution_disabled(caplog):
    task = MBPP(task_cfg("mbpp", num_shots=0, execute_code=False))
    out = task.metrics(task.examples([MBPP_ROW]), [["def add(a, b):\n  return a + b"] * 10])
    assert out == {"executed": 0.0, "total": 1.0}
    assert "task.execute_code=false" in caplog.text
