"""Built-in generated chat datasets, usable in the mixer as ``synthetic:<task>`` with no network.

Each task is a pure function of a row index, so the data never depends on --seed or on the machine: the mixer's
seed decides which rows a run samples, not what the rows are. A row belongs to the held-out ``test`` split when a
hash of its prompt says so, which keeps train and test disjoint by construction (the same prompt cannot land in
both), and prompts are de-duplicated within a split.

    python -m open_instruct.synthetic spelling --split test --n 3     # print a few rows
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable
from functools import lru_cache

ROWS_PER_TASK = 8000  # rows generated per task before the train/test split (about 10% go to test)
TEST_PERCENT = 10
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, min_len: int = 3, max_len: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))


def spelling(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"Spell the word: {word}", " ".join(word)


def reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"Reverse the word: {word}", word[::-1]


def letter_count(rng: random.Random) -> tuple[str, str]:
    """Balanced answers: the count is drawn uniformly from 0..3 and the word (4 to 8 letters) built to hold the
    letter exactly that often, so always answering one number scores about 25%, not the 72% that always answering
    "1" scored when the letter was mostly picked from the word."""
    count, letter = rng.randrange(4), rng.choice(LETTERS)
    others = LETTERS.replace(letter, "")
    chars = [rng.choice(others) for _ in range(rng.randint(4, 8))]
    for position in rng.sample(range(len(chars)), count):
        chars[position] = letter
    return f"How many times does the letter {letter} appear in {''.join(chars)}?", str(count)


def _letter_question(rng: random.Random) -> tuple[str, str]:
    """The reasoning task's question (a letter of the word most of the time; its rows are unchanged)."""
    word = _word(rng, 4, 8)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
    return f"How many times does the letter {letter} appear in {word}?", str(word.count(letter))


def tool_calc(rng: random.Random) -> dict:
    """The user asks a sum, difference or product; the assistant calls the calculator with the expression, the tool
    answers, the assistant repeats the result. The model learns the call's format and arguments and to read the
    result, not to multiply.

    The rows carry no `tools` list: every tool template renders the schemas as a few hundred tokens of system text,
    and behind that preamble the embedded tiny model (trained from scratch) did not learn to copy the operands or the
    result within 2,400 steps, where without it it gets 30/30 of both after 800 (docs/benchmarks.md). Rows with a
    tools list are covered by the template tests."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    expression = f"{a} {op} {b}"
    result = str({"+": a + b, "-": a - b, "*": a * b}[op])
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return {"messages": [
        {"role": "user", "content": f"What is {expression}?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": result},
    ]}


def reasoning(rng: random.Random) -> dict:
    """Letter counting with the count written out letter by letter in the reasoning, then the answer."""
    prompt, answer = _letter_question(rng)
    letter, word = prompt.split(" the letter ")[1].split(" appear in ")
    word = word.rstrip("?")
    count, steps = 0, []
    for char in word:
        count += char == letter
        steps.append(f"{char} {count}")
    return {"messages": [
        {"role": "user", "content": prompt},
        {"role": "assistant", "reasoning_content": ", ".join(steps), "content": answer},
    ]}


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b)


# A task returns (prompt, answer) for a one-turn chat, or a whole row ({"messages", ["tools"]}).
TASKS: dict[str, Callable[[random.Random], tuple[str, str] | dict]] = {
    "spelling": spelling,
    "reverse": reverse,
    "letter_count": letter_count,
    "arithmetic": arithmetic,
    "tool_calc": tool_calc,
    "reasoning": reasoning,
}
SPLITS = ("train", "test")


def is_held_out(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT


def _as_row(generated: tuple[str, str] | dict) -> dict:
    if isinstance(generated, dict):
        return generated
    prompt, answer = generated
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@lru_cache(maxsize=None)
def _split_rows(task: str) -> dict[str, tuple[str, ...]]:
    """Rows as JSON text (cached, immutable), split by a hash of the first user message."""
    generator = TASKS[task]
    seen: set[str] = set()
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for index in range(ROWS_PER_TASK):
        row = _as_row(generator(random.Random(f"{task}:{index}")))
        prompt = row["messages"][0]["content"]
        if prompt in seen:
            continue
        seen.add(prompt)
        splits["test" if is_held_out(prompt) else "train"].append(json.dumps(row))
    return {name: tuple(rows) for name, rows in splits.items()}


def load_task(task: str, split: str = "train") -> list[dict]:
    """Rows of one task as {"messages": [...]} dicts (with "tools" for tool tasks), in a fixed order."""
    if task not in TASKS:
        raise ValueError(f"Unknown synthetic task {task!r}; choose one of {', '.join(sorted(TASKS))}.")
    if split not in SPLITS:
        raise ValueError(f"Synthetic task {task!r} has no split {split!r}; choose one of {', '.join(SPLITS)}.")
    return [json.loads(row) for row in _split_rows(task)[split]]


def _row_text(row: dict) -> str:
    parts = []
    for message in row["messages"]:
        parts += [message.get("reasoning_content", ""), message["content"]]
        parts += [json.dumps(call["function"]) for call in message.get("tool_calls", [])]
    return "\n".join(part for part in parts if part)


def corpus_text() -> str:
    """All synthetic text, for building a tokenizer's training corpus."""
    return "\n".join(_row_text(json.loads(row)) for task in TASKS for split in SPLITS for row in _split_rows(task)[split])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print rows of a synthetic task.", allow_abbrev=False)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--n", type=int, default=5)
    args = parser.parse_args(argv)
    rows = load_task(args.task, args.split)
    print(f"# {args.task}/{args.split}: {len(rows)} rows")
    for row in rows[: args.n]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
