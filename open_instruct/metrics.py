"""Per-step metrics: console line, OUTPUT_DIR/metrics.jsonl, and the experiment tracker.

Token counts are global (all processes). Throughputs are cumulative since this process started training (a resumed
run counts only its own steps): per_device_tps = tokens / num_processes / elapsed seconds (padding excluded), and
per_device_tps_including_padding counts every position the model computed, padding included. Every field is
defined in docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from open_instruct.ranks import main_process_work
from open_instruct.storage import StorageError, cause_of, free_bytes, size_text, write_text

logger = logging.getLogger(__name__)


@dataclass
class RunCounters:
    num_processes: int
    total_tokens: int = 0
    total_tokens_including_padding: int = 0
    trained_tokens: int = 0
    model_flops: float = 0.0  # this run's steps only (open_instruct/flops.py)
    data_seconds: float = 0.0  # main process: time spent building micro-batches, while the device waits
    start_time: float = field(default_factory=time.perf_counter)
    tokens_before_start: tuple[int, int, int] = (0, 0, 0)  # counted by the run this one resumed; not in its speed

    def state(self) -> dict:
        return {"total_tokens": self.total_tokens, "total_tokens_including_padding": self.total_tokens_including_padding,
                "trained_tokens": self.trained_tokens}

    def restore(self, state: dict) -> None:
        """Continue a resumed run's totals; throughput counts only what this process computes."""
        self.total_tokens = state["total_tokens"]
        self.total_tokens_including_padding = state["total_tokens_including_padding"]
        self.trained_tokens = state["trained_tokens"]
        self.tokens_before_start = (self.total_tokens, self.total_tokens_including_padding, self.trained_tokens)

    def add(self, tokens: int, tokens_including_padding: int, trained_tokens: int) -> None:
        self.total_tokens += tokens
        self.total_tokens_including_padding += tokens_including_padding
        self.trained_tokens += trained_tokens

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start_time, 1e-9)

    def throughput(self) -> dict[str, float]:
        per_device_seconds = self.elapsed * self.num_processes
        tokens, with_padding, _ = self.tokens_before_start
        return {
            "per_device_tps": (self.total_tokens - tokens) / per_device_seconds,
            "per_device_tps_including_padding": (self.total_tokens_including_padding - with_padding) / per_device_seconds,
        }

    def efficiency(self, peak_flops: float | None) -> dict[str, float]:
        """MFU and its inputs, cumulative over this run (definitions in docs/metrics.md)."""
        seconds = self.elapsed
        tokens, with_padding, trained = self.tokens_before_start
        computed = self.total_tokens_including_padding - with_padding
        achieved = self.model_flops / (seconds * self.num_processes)  # model FLOP/s per device
        values = {
            "tflops": achieved / 1e12,
            "padding_fraction": 1.0 - (self.total_tokens - tokens) / computed if computed else 0.0,
            "trained_tokens_per_sec": (self.trained_tokens - trained) / seconds,
            "dataloader_wait_fraction": self.data_seconds / seconds,
        }
        if peak_flops:
            values["mfu"] = achieved / peak_flops
        return values


def peak_memory_gb(accelerator) -> float:
    """The largest peak over all processes, GiB: allocated CUDA memory on GPUs, the process's peak resident memory
    (RSS) on CPU. Every process must call it (it gathers)."""
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return float(accelerator.gather(torch.tensor([peak], device=accelerator.device)).max())


class MetricsLogger:
    """Writes one JSON object a line; only the main process writes."""

    def __init__(self, accelerator, output_dir: str | Path, with_tracking: bool, resumed_step: int = 0,
                 intact: str = "nothing was trained yet"):
        """A resumed run keeps the lines up to its checkpoint's step and drops the rest (steps the killed run
        logged after its last checkpoint are trained again). `intact`: what a failed write leaves the user."""
        self.accelerator = accelerator
        self.with_tracking = with_tracking
        self.path = Path(output_dir) / "metrics.jsonl"
        self.failure: str | None = None
        kept = "".join(line + "\n" for line in lines_up_to(self.path, resumed_step)) if accelerator.is_main_process else ""
        main_process_work(accelerator, lambda: write_text(self.path, kept, "metrics.jsonl", intact),
                          (StorageError,), lambda: StorageError(f"The main process could not write {self.path}."))

    def log(self, metrics: dict, step: int) -> None:
        """Append the line (main process). A failed write (a full disk) does not raise here, where only the main
        process would stop: it is kept in `failure` and the trainer stops all ranks at the next step boundary."""
        if not self.accelerator.is_main_process:
            return
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        except OSError as error:
            if self.failure is None:
                self.failure = f"{self.path} could not be written ({cause_of(error)}, {size_text(free_bytes(self.path))} free)"
                logger.error("%s: the run stops after this step, with a checkpoint if the disk still takes one.",
                             self.failure)
        if self.with_tracking:
            self.accelerator.log(metrics, step=step)
        tqdm.write(format_line(metrics))


def lines_up_to(path: Path, step: int) -> list[str]:
    if step == 0 or not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]


def format_line(m: dict) -> str:
    if "train_loss" not in m:  # an evaluation record (open_instruct/evaluation.py)
        return f"step {m['step']:>5} | " + " | ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "step")
    mfu = f" | mfu {m['mfu']:.1%}" if "mfu" in m else ""
    return (f"step {m['step']:>5} | epoch {m['epoch']:.2f} | loss {m['train_loss']:.4f} | lr {m['learning_rate']:.2e} "
            f"| tokens {m['total_tokens']} | tok/s/device {m['per_device_tps']:.0f} "
            f"(incl. padding {m['per_device_tps_including_padding']:.0f}){mfu} | mem {m['peak_memory_gb']:.1f} GiB")
