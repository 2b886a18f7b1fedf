"""How stable the CPU matmul peak behind CPU MFU is: one 0.3 s timing against the trainer's best of five 0.1 s
timings, repeated, on an idle machine and while another process runs matrix multiplies.

    .venv/bin/python benchmarks/cpu_peak.py [--repeats 8]

Prints each method's range in TFLOP/s for both conditions (open_instruct/flops.py measured_cpu_peak_flops; the
figures are recorded in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from open_instruct.flops import measured_cpu_peak_flops  # noqa: E402

LOAD = "import torch\na = torch.randn(512, 512)\nwhile True:\n    torch.mm(a, a)\n"
METHODS = {"one 0.3 s timing": {"trials": 1, "seconds": 0.3}, "best of 5 x 0.1 s (trainer)": {}}


def ranges(repeats: int) -> dict[str, list[float]]:
    return {name: [measured_cpu_peak_flops(torch.float32, **kwargs) / 1e12 for _ in range(repeats)]
            for name, kwargs in METHODS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 1024x1024 matmuls")
    for condition in ("idle", "under a concurrent matmul loop"):
        load = subprocess.Popen([sys.executable, "-c", LOAD]) if condition != "idle" else None
        try:
            time.sleep(2 if load else 0)
            for name, values in ranges(args.repeats).items():
                print(f"  {condition:<32} {name:<28} {min(values):.3f} - {max(values):.3f} TFLOP/s")
        finally:
            if load:
                load.kill()
                load.wait()


if __name__ == "__main__":
    main()
