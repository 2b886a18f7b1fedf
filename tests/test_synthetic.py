"""The built-in synthetic tasks: deterministic, disjoint splits, correct answers."""

from __future__ import annotations

import random
import re

import pytest

from open_instruct import synthetic
from open_instruct.synthetic import SPLITS, TASKS, is_held_out, load_task


def _pairs(task: str, split: str) -> list[tuple[str, str]]:
    rows = load_task(task, split)
    pairs = []
    for row in rows:
        user, assistant = row["messages"][0], row["messages"][-1]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        pairs.append((user["content"], assistant["content"]))
    return pairs


def test_known_tasks():
    assert set(TASKS) == {"spelling", "reverse", "letter_count", "arithmetic", "tool_calc", "reasoning"}
    assert SPLITS == ("train", "test")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic(task):
    first = {split: load_task(task, split) for split in SPLITS}
    synthetic._split_rows.cache_clear()  # regenerate instead of reading the cache
    assert {split: load_task(task, split) for split in SPLITS} == first


def test_rows_do_not_depend_on_global_random_state():
    random.seed(0)
    first = load_task("spelling")[:20]
    synthetic._split_rows.cache_clear()
    random.seed(12345)
    assert load_task("spelling")[:20] == first


def test_default_split_is_train():
    assert load_task("reverse") == load_task("reverse", "train")


def test_returned_rows_are_independent_copies():
    rows = load_task("spelling")
    rows[0]["messages"][0]["content"] = "changed"
    assert load_task("spelling")[0]["messages"][0]["content"] != "changed"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_non_empty_disjoint_and_deduplicated(task):
    train = [p for p, _ in _pairs(task, "train")]
    test = [p for p, _ in _pairs(task, "test")]
    assert train and test
    assert not set(train) & set(test)
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    # The test split is the held-out ~10%.
    assert all(is_held_out(p) for p in test)
    assert not any(is_held_out(p) for p in train)
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.15


@pytest.mark.parametrize("split", SPLITS)
def test_spelling_answers(split):
    for prompt, answer in _pairs("spelling", split):
        word = re.fullmatch(r"Spell the word: ([a-z]+)", prompt).group(1)
        assert answer == " ".join(word)


@pytest.mark.parametrize("split", SPLITS)
def test_reverse_answers(split):
    for prompt, answer in _pairs("reverse", split):
        word = re.fullmatch(r"Reverse the word: ([a-z]+)", prompt).group(1)
        assert answer == word[::-1]


@pytest.mark.parametrize("split", SPLITS)
def test_letter_count_answers(split):
    answers = []
    for prompt, answer in _pairs("letter_count", split):
        letter, word = re.fullmatch(r"How many times does the letter ([a-z]) appear in ([a-z]+)\?", prompt).groups()
        assert answer == str(word.count(letter)) and 4 <= len(word) <= 8
        answers.append(answer)
    # balanced: always answering one number scores about 25% (it was 72% for "1" when the letter came from the word)
    assert set(answers) == {"0", "1", "2", "3"}
    assert max(map(answers.count, set(answers))) / len(answers) < 0.28


@pytest.mark.parametrize("split", SPLITS)
def test_arithmetic_answers(split):
    ops = set()
    for prompt, answer in _pairs("arithmetic", split):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", prompt).groups()
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert answer == str(expected)
        assert int(answer) >= 0
        ops.add(op)
    assert ops == {"+", "-"}


FIRST_ROWS = {
    "spelling": ("Spell the word: rkgd", "r k g d"),
    "reverse": ("Reverse the word: tupnb", "bnput"),
    "letter_count": ("How many times does the letter a appear in gpasachx?", "2"),
    "arithmetic": ("What is 83 - 39?", "44"),
    "tool_calc": ("What is 83 - 52?", "31"),
    "reasoning": ("How many times does the letter y appear in lxylzzi?", "1"),
}
FIRST_TEST_PROMPTS = {
    "spelling": "Spell the word: apu",
    "reverse": "Reverse the word: pzvje",
    "letter_count": "How many times does the letter b appear in bbbskm?",
    "arithmetic": "What is 40 + 23?",
    "tool_calc": "What is 36 * 95?",
    "reasoning": "How many times does the letter m appear in rqvovsm?",
}
SPLIT_SIZES = {"spelling": (7151, 759), "reverse": (7127, 784), "letter_count": (7186, 797), "arithmetic": (5399, 590),
               "tool_calc": (6052, 667), "reasoning": (7212, 788)}


CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "83 - 52"}}}
LITERAL_ROWS = {
    "tool_calc": {"messages": [{"role": "user", "content": "What is 83 - 52?"},
                               {"role": "assistant", "content": "", "tool_calls": [CALL]},
                               {"role": "tool", "content": "31"},
                               {"role": "assistant", "content": "31"}]},
    "reasoning": {"messages": [{"role": "user", "content": "How many times does the letter y appear in lxylzzi?"},
                               {"role": "assistant", "reasoning_content": "l 0, x 0, y 1, l 1, z 1, z 1, i 1",
                                "content": "1"}]},
}


def test_tool_calc_rows_are_right():
    for row in load_task("tool_calc", "test"):
        user, call, result, answer = row["messages"]
        expression = call["tool_calls"][0]["function"]["arguments"]["expression"]
        assert user["content"] == f"What is {expression}?"
        assert result["content"] == answer["content"] == str(eval(expression))  # noqa: S307 (our own digits)


def test_reasoning_rows_count_letter_by_letter():
    for row in load_task("reasoning", "test"):
        prompt, reply = row["messages"]
        letter, word = re.fullmatch(r"How many times does the letter (.) appear in (\w+)\?", prompt["content"]).groups()
        steps = reply["reasoning_content"].split(", ")
        assert [step.split(" ")[0] for step in steps] == list(word)
        assert steps[-1].split(" ")[1] == reply["content"] == str(word.count(letter))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_literal_rows_are_stable(task):
    """The data is a pure function of the row index and never depends on the machine: pin it literally."""
    prompt, answer = FIRST_ROWS[task]
    train, test = load_task(task, "train"), load_task(task, "test")
    if task in ("tool_calc", "reasoning"):
        assert train[0] == LITERAL_ROWS[task]
    else:
        assert train[0] == {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    assert test[0]["messages"][0]["content"] == FIRST_TEST_PROMPTS[task]
    assert (len(train), len(test)) == SPLIT_SIZES[task]


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="nope") as info:
        load_task("nope")
    assert "spelling" in str(info.value)


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="validation") as info:
        load_task("spelling", "validation")
    assert "train" in str(info.value) and "test" in str(info.value)


def test_corpus_text_covers_every_task():
    text = synthetic.corpus_text()
    for prefix in ("Spell the word: ", "Reverse the word: ", "How many times does the letter ", "What is "):
        assert prefix in text
