"""Padded vs padding-free training throughput on a realistic SFT length distribution, side by side in one run.

    .venv/bin/python benchmarks/packing.py [--rows 2000] [--steps 20] [--batch_size 8] [--max_seq_length 4096]

Lengths (tokens per conversation) follow a log-normal distribution with median 300 and sigma 1.0, clipped to
[32, max_seq_length]: many short examples and a long tail (about 2% above 2,000 tokens), as in instruction mixtures.
Each row is one user turn (a fifth of the length) and one assistant reply. The embedded tiny Llama (byte-level
tokenizer, so characters are tokens) with 4,096 positions trains through the real trainer (`python -m
open_instruct.finetune`) twice on the same data, seed, global batch and steps: padded (each micro-batch padded to
its longest example) and padding-free (one packed row per micro-batch). Reported per mode: the fraction of computed
positions that are real tokens, and effective (non-pad) tokens/s = total_tokens / training seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def lengths(rows: int, max_seq_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(300), sigma=1.0, size=rows), 32, max_seq_length).astype(int)


def write_data(path: Path, target_lengths: np.ndarray, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    with path.open("w") as handle:
        for total in target_lengths:
            body = total - 30  # the template adds about 30 tokens of role markers
            prompt_len = max(4, body // 5)
            prompt = "".join(rng.choice(letters, prompt_len))
            reply = "".join(rng.choice(letters, max(4, body - prompt_len)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": reply}]}) + "\n")


def build_model(directory: Path, max_positions: int) -> Path:
    from open_instruct.tiny_model import build_tiny_model, default_config_path

    config = json.loads(default_config_path().read_text())
    config["max_position_embeddings"] = max_positions
    config_path = directory / "config.json"
    config_path.write_text(json.dumps(config))
    return build_tiny_model(directory / "model", config_path)


def train(model: Path, data: Path, out: Path, cache: Path, args, padding_free: bool) -> dict:
    command = [sys.executable, "-m", "open_instruct.finetune", "--model_name_or_path", str(model),
               "--dataset_mixer_list", str(data), "1.0", "--output_dir", str(out), "--dataset_local_cache_dir",
               str(cache), "--max_seq_length", str(args.max_seq_length), "--per_device_train_batch_size",
               str(args.batch_size), "--max_train_steps", str(args.steps), "--learning_rate", "1e-3", "--seed", "0",
               "--logging_steps", str(args.steps), "--padding_free" if padding_free else "--no_padding_free"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"training failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return {"seconds": summary["train_seconds"], "tokens": last["total_tokens"],
            "positions": last["total_tokens_including_padding"], "loss": last["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=4096)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    try:
        target = lengths(args.rows, args.max_seq_length)
        data = work / "chats.jsonl"
        write_data(data, target)
        model = build_model(work, args.max_seq_length)
        print(f"lengths: log-normal median 300, sigma 1.0, clipped to [32, {args.max_seq_length}]; "
              f"{args.rows} rows, mean {target.mean():.0f}, p50 {np.median(target):.0f}, "
              f"p90 {np.percentile(target, 90):.0f}, p99 {np.percentile(target, 99):.0f}, max {target.max()}")
        print(f"{args.steps} steps x {args.batch_size} examples, one process, {os.cpu_count()} cores, fp32")
        results = {}
        for name, padding_free in (("padded", False), ("padding-free", True)):
            results[name] = train(model, data, work / name, work / "cache", args, padding_free)
        for name, r in results.items():
            print(f"{name:<13} non-pad {r['tokens'] / r['positions']:7.2%}  {r['tokens'] / r['seconds']:9.0f} effective "
                  f"tokens/s  ({r['tokens']} tokens in {r['seconds']:.1f} s, last loss {r['loss']:.4f})")
        padded, packed = results["padded"], results["padding-free"]
        assert padded["tokens"] == packed["tokens"], "both modes must see the same examples"
        ratio = (packed["tokens"] / packed["seconds"]) / (padded["tokens"] / padded["seconds"])
        print(f"padding-free / padded effective tokens/s: {ratio:.2f}x")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
