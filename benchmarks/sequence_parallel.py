"""Per-rank peak memory and step time of sequence parallelism (--sequence_parallel_size N) against one process, at
rows of 4k, 16k and 32k tokens, on CPU.

    python benchmarks/sequence_parallel.py --work_dir /tmp/sp-bench
    python benchmarks/sequence_parallel.py --work_dir /tmp/sp-bench --rows 4096 16384 32768 --steps 3

Each configuration trains --steps steps of one packed row per step (--global_batch_tokens = --max_tokens_per_micro_batch
= the row), fp32, on the embedded tiny model: N=1 as one plain process, N=2 as 2 processes under DeepSpeed ZeRO-3
(gloo) sharing every row. Peak memory is each process's peak resident set (the trainer's peak_memory_gb, the largest
over ranks); a 512-token run of the same layout gives the baseline (weights, optimizer, libraries), so
"activations" = peak - baseline, and the last column is N=2's over N=1's (expected: close to 1/2). Step time is the
mean over all steps (training time / steps). On 2 CPU cores the 2-process runs share the cores, so their step time is not a
speed-up measure; the point of the benchmark is the memory per rank.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "configs" / "ds_configs" / "stage3_no_offloading_accelerate.conf"


def train(model_dir: Path, output: Path, rows: int, n: int, steps: int, cache: Path) -> dict:
    if n == 1:
        command = [sys.executable, "-m", "open_instruct.finetune"]
    else:
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(n),
                   "--use_deepspeed", "--deepspeed_config_file", str(ZERO3), "-m", "open_instruct.finetune",
                   "--sequence_parallel_size", str(n)]
    args = ["--model_name_or_path", str(model_dir), "--output_dir", str(output), "--dataset_mixer_list",
            "synthetic:spelling", "4000", "--max_seq_length", "512", "--global_batch_tokens", str(rows),
            "--max_tokens_per_micro_batch", str(rows), "--max_train_steps", str(steps), "--logging_steps", "1",
            "--seed", "1", "--dataset_local_cache_dir", str(cache)]
    result = subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"run failed ({rows} tokens, N={n}):\n{result.stderr[-3000:]}")
    summary = json.loads((output / "summary.json").read_text())
    return {"peak_gb": summary["peak_memory_gb"], "step_s": summary["train_seconds"] / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "tiny"
    if not model_dir.exists():
        subprocess.run([sys.executable, "-m", "open_instruct.tiny_model", str(model_dir)], check=True,
                       capture_output=True)
    cache = work / "cache"
    baseline = {n: train(model_dir, work / f"base-n{n}", 512, n, 2, cache)["peak_gb"] for n in (1, 2)}
    print(f"baseline peak (512-token rows): N=1 {baseline[1]:.2f} GiB, N=2 {baseline[2]:.2f} GiB per rank", flush=True)
    print(f"{'row tokens':>10}  {'N=1 peak':>9} {'act.':>6} {'step':>7}  {'N=2 peak':>9} {'act.':>6} {'step':>7}  "
          "N=2/N=1 activations")
    for rows in args.rows:
        one = train(model_dir, work / f"r{rows}-n1", rows, 1, args.steps, cache)
        two = train(model_dir, work / f"r{rows}-n2", rows, 2, args.steps, cache)
        act1, act2 = one["peak_gb"] - baseline[1], two["peak_gb"] - baseline[2]
        print(f"{rows:>10}  {one['peak_gb']:7.2f}Gi {act1:6.2f} {one['step_s']:6.2f}s  {two['peak_gb']:7.2f}Gi "
              f"{act2:6.2f} {two['step_s']:6.2f}s  {act2 / act1 if act1 > 0 else float('nan'):.2f}", flush=True)


if __name__ == "__main__":
    main()
