"""Time the embedded debug recipe end to end and print its figures (recorded in docs/benchmarks.md).

    .venv/bin/python benchmarks/debug_run.py [--output_dir output/bench-debug] [finetune.py flags...]

Runs `bash scripts/train/debug/finetune.sh` as a user would (tiny-model build, training, save, held-out answers)
and reports: wall time of the whole script, training time, first and last train loss, tokens/s per device, MFU,
every in-loop eval metric before and after training, and the held-out exact match printed by the script's final
check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--output_dir", default="output/bench-debug")
    args, extra = parser.parse_known_args()
    env = dict(os.environ, OUTPUT_DIR=args.output_dir, PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    start = time.perf_counter()
    result = subprocess.run(["bash", "scripts/train/debug/finetune.sh", *extra], cwd=REPO, env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"debug recipe failed:\n{result.stderr[-3000:]}")
    summary = json.loads((REPO / args.output_dir / "summary.json").read_text())
    match = re.search(r"held-out exact match: (\d+)/(\d+)", result.stdout)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"script wall time:      {wall:.1f} s")
    print(f"training time:         {summary['train_seconds']:.1f} s for {summary['steps']} steps")
    print(f"train loss:            {summary['first_train_loss']:.3f} -> {summary['last_train_loss']:.3f}")
    print(f"tokens/s per device:   {summary['per_device_tps']:.0f} (padding-free: same with padding)")
    if summary.get("mfu") is not None:
        print(f"MFU:                   {summary['mfu']:.1%} of this CPU's measured matmul peak")
    for name in [key[len("initial_"):] for key in summary if key.startswith("initial_eval")]:
        print(f"{name + ':':<38} {summary[f'initial_{name}']:.3f} -> {summary[f'final_{name}']:.3f} (before -> after)")
    if match:
        print(f"held-out exact match:  {match.group(1)}/{match.group(2)}")


if __name__ == "__main__":
    main()
