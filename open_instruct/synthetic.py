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
    word = _word(rng, 4, 8)
    # Ask about a letter of the word most of the time, so answers are not almost always zero.
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
    return f"How many times does the letter {letter} appear in {word}?", str(word.count(letter))


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "spelling": spelling,
    "reverse": reverse,
    "letter_count": letter_count,
    "arithmetic": arithmetic,
}
SPLITS = ("train", "test")


def is_held_out(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT


@lru_cache(maxsize=None)
def _split_rows(task: str) -> dict[str, tuple[tuple[str, str], ...]]:
    generator = TASKS[task]
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for index in range(ROWS_PER_TASK):
        prompt, answer = generator(random.Random(f"{task}:{index}"))
        if prompt in seen:
            continue
        seen.add(prompt)
        splits["test" if is_held_out(prompt) else "train"].append((prompt, answer))
    return {name: tuple(rows) for name, rows in splits.items()}


def load_task(task: str, split: str = "train") -> list[dict]:
    """Rows of one task as {"messages": [...]} dicts, in a fixed order."""
    if task not in TASKS:
        raise ValueError(f"Unknown synthetic task {task!r}; choose one of {', '.join(sorted(TASKS))}.")
    if split not in SPLITS:
        raise ValueError(f"Synthetic task {task!r} has no split {split!r}; choose one of {', '.join(SPLITS)}.")
    return [
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        for prompt, answer in _split_rows(task)[split]
    ]


def corpus_text() -> str:
    """All synthetic text, for building a tokenizer's training corpus."""
    return "\n".join(p + "\n" + a for task in TASKS for split in SPLITS for p, a in _split_rows(task)[split])


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
