"""Tokenization with one process vs a pool, by source size and row length: where does the pool start to pay?

    .venv/bin/python benchmarks/num_proc.py [--rows 2000 5530 20000] [--num_proc 2]

Times `data.tokenize_source` (render, tokenize, mask: the prepare path's work per source) on the same rows with
num_proc=1 and num_proc=N, side by side, for two kinds of rows: the debug recipe's short synthetic rows (the embedded
byte-level tokenizer) and long multi-turn chats (benchmarks/tokenization.py's generator and 32k BPE tokenizer, with
the tulu template). From the one-process time per row and the pool's extra cost it prints the size from which a
pool of N is faster, which is what `data.pool_size` (the --dataset_num_proc default) is built on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _source(rows: list[dict], work: Path, name: str):
    import json

    from open_instruct.data import MixerItem, load_source

    path = work / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_source(MixerItem(str(path), 1.0, is_fraction=True, split="train", kind="local"))


def _time(source, tokenizer, num_proc: int) -> float:
    import numpy as np

    from open_instruct.data import EncodeOptions, tokenize_source

    options = EncodeOptions(max_seq_length=4096)
    start = time.perf_counter()
    tokenize_source(source, np.arange(len(source)), tokenizer, options, False, 0.01, num_proc, pool_min_rows=1)
    return time.perf_counter() - start


def workloads(work: Path, largest: int):
    from tokenization import generate_conversations, train_tokenizer

    from open_instruct.synthetic import load_task
    from open_instruct.tiny_model import build_tokenizer

    task = load_task("spelling")
    short = [task[i % len(task)] for i in range(largest)]
    yield "synthetic spelling (byte tokenizer)", short, build_tokenizer()
    chats = generate_conversations(largest)
    yield "multi-turn chats (32k BPE, tulu)", chats, train_tokenizer(chats, 32000, work / "bpe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 5530, 20000])
    parser.add_argument("--num_proc", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-num-proc-"))
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; pool of {args.num_proc} vs one process")
    try:
        for label, rows, tokenizer in workloads(work, max(args.rows)):
            print(f"\n{label}")
            for count in sorted(args.rows):
                source = _source(rows[:count], work, f"rows{count}")
                one, pool = _time(source, tokenizer, 1), _time(source, tokenizer, args.num_proc)
                per_row = one / count
                # pool time ~ overhead + one / num_proc: the overhead this size shows, and the size it would pay from
                overhead = pool - one / args.num_proc
                break_even = overhead / (per_row * (1 - 1 / args.num_proc))
                print(f"  {count:6d} rows: one {one:6.2f} s ({per_row * 1e6:6.0f} us/row), pool {pool:6.2f} s, "
                      f"pool/one {pool / one:4.2f}x; pool overhead {overhead:5.2f} s -> pays from ~{break_even:,.0f} "
                      f"rows")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
