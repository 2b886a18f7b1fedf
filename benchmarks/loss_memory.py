"""Peak memory and time of the chunked loss vs the naive loss, forward + backward, fp32, on CPU.

    .venv/bin/python benchmarks/loss_memory.py            # defaults: 8192 tokens, vocab 128256, hidden 4096
    .venv/bin/python benchmarks/loss_memory.py --tokens 8192 --vocab 128256 --hidden 4096 --chunk_size 1024 \\
        --untrained_fraction 0 0.7 --repeats 3

naive:   logits = lm_head(hidden); token_loss_sum(logits, targets)            (all [tokens x vocab] logits at once)
chunked: chunked_linear_cross_entropy_sum(hidden, lm_head, targets, chunk_size)  (trained rows only, chunk by chunk)

Both get the same hidden states [tokens, hidden] (a leaf that requires grad) and the same bias-free nn.Linear output
layer, and both run the backward to the hidden states and the output layer's weight. Targets are drawn at random; a
`--untrained_fraction` of the positions (exactly rounded) is set to IGNORE_INDEX. Every fraction in the list is a
separate case (0 = every position trained, the worst case for the chunked loss; 0.7 is typical of SFT, where the
prompts are untrained; the naive loss computes every position's logits whatever the fraction).

Each (variant, fraction) runs alone in a fresh Python subprocess, so only one variant's memory is ever alive and no
run inherits another's allocator state. Peak memory: the increase of the process's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) from just after the inputs are allocated to after a small warm-up
(the first 512 tokens) and `--repeats` full forward + backward passes (the passes are identical, so the peak is the
peak of one). PyTorch's CPU allocator does not cache, and glibc returns large blocks to the OS on free, so the
resident set follows the live tensors. The increase includes the output layer's weight gradient (vocab x hidden
fp32, created by both variants). Time: the median of the `--repeats` full passes, after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARMUP_TOKENS = 512


def _rss_mb() -> float:
    """Current resident set size (MB), from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def worker(config: dict) -> dict:
    """One variant in this (fresh) process: allocate inputs, warm up, time `repeats` passes, report the peak RSS rise."""
    import torch

    from open_instruct.loss import chunked_linear_cross_entropy_sum, token_loss_sum
    from open_instruct.tokenization import IGNORE_INDEX

    torch.manual_seed(0)
    tokens, vocab, hidden_size = config["tokens"], config["vocab"], config["hidden"]
    hidden = torch.randn(tokens, hidden_size).requires_grad_()
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False)
    lm_head.requires_grad_(not config["freeze_lm_head"])
    targets = torch.randint(0, vocab, (tokens,))
    untrained = round(config["untrained_fraction"] * tokens)
    targets[torch.randperm(tokens)[:untrained]] = IGNORE_INDEX

    if config["variant"] == "naive":

        def loss_fn(h, t):
            return token_loss_sum(lm_head(h), t)  # the logits live only inside this call (and the autograd graph)

    else:

        def loss_fn(h, t):
            return chunked_linear_cross_entropy_sum(h, lm_head, t, chunk_size=config["chunk_size"])

    def step(h, t) -> float:
        loss = loss_fn(h, t)
        loss.backward()
        value = loss.item()
        del loss
        hidden.grad = None
        lm_head.weight.grad = None
        return value

    rss_base, max_rss_base = _rss_mb(), _max_rss_mb()
    step(hidden[:WARMUP_TOKENS].detach().requires_grad_(), targets[:WARMUP_TOKENS])
    times, cpu_times, losses = [], [], []
    load_before = os.getloadavg()[0]
    for _ in range(config["repeats"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(hidden, targets))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        **config,
        "trained_tokens": tokens - untrained,
        "peak_extra_mb": _max_rss_mb() - max_rss_base,
        "base_rss_mb": rss_base,
        "base_max_rss_mb": max_rss_base,
        "times_s": times,
        "time_s": statistics.median(times),
        "cpu_times_s": cpu_times,
        "cpu_time_s": statistics.median(cpu_times),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "loss": losses[-1],
        "threads": torch.get_num_threads(),
    }


def run_in_subprocess(config: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(config)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:  # e.g. killed for memory: report it and go on with the other variants
        print(f"worker {config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
        return {**config, "failed": f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The baseline is a valid "peak so far" only if allocating the inputs left no higher transient peak behind.
    if result["base_max_rss_mb"] > result["base_rss_mb"] * 1.05 + 50:
        print(f"warning: peak RSS before the passes ({result['base_max_rss_mb']:.0f} MB) exceeds the RSS then "
              f"({result['base_rss_mb']:.0f} MB); the peak increase may be understated", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--chunk_size", type=int, default=1024,
                        help="rows per chunk for the chunked loss: one chunk's fp32 logits are alive at a time "
                             "(1024 x 128256: 501 MB; 2048 gave 3,194 MB peak vs 2,677, at the same speed)")
    parser.add_argument("--untrained_fraction", type=float, nargs="+", default=[0.0, 0.7],
                        help="one case per value: the fraction of positions whose target is IGNORE_INDEX")
    parser.add_argument("--repeats", type=int, default=3, help="timed full passes per variant (median reported)")
    parser.add_argument("--variants", nargs="+", choices=["naive", "chunked"], default=["naive", "chunked"])
    parser.add_argument("--freeze_lm_head", action="store_true",
                        help="no gradient for the output layer's weight (e.g. LoRA): activations only")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return

    weight_mb = args.vocab * args.hidden * 4 / 2**20
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden}, fp32, CPU, forward + backward"
          f"{', lm_head frozen' if args.freeze_lm_head else ''}; chunk_size {args.chunk_size}; "
          f"median of {args.repeats} after a {WARMUP_TOKENS}-token warm-up")
    print(f"memory: peak RSS increase (ru_maxrss) over the allocated inputs, each variant in a fresh subprocess; "
          f"full logits = {logits_mb:.0f} MB, lm_head weight gradient = "
          f"{0 if args.freeze_lm_head else weight_mb:.0f} MB (included)")
    results = []
    for fraction in args.untrained_fraction:
        for variant in args.variants:
            config = {"variant": variant, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
                      "chunk_size": args.chunk_size, "untrained_fraction": fraction, "repeats": args.repeats,
                      "freeze_lm_head": args.freeze_lm_head}
            print(f"  running {variant} untrained={fraction} ...", file=sys.stderr, flush=True)
            results.append(run_in_subprocess(config))
            r = results[-1]
            if "failed" not in r:
                print(f"  {variant} untrained={fraction}: peak +{r['peak_extra_mb']:.0f} MB, wall "
                      f"{', '.join(f'{t:.1f}' for t in r['times_s'])} s, cpu "
                      f"{', '.join(f'{t:.1f}' for t in r['cpu_times_s'])} s, load avg {r['load_avg_1min']}, "
                      f"loss {r['loss']:.4f}", file=sys.stderr, flush=True)

    header = (f"{'variant':<8} {'untrained':>9} {'trained tok':>11} {'peak extra MB':>13} {'time s':>8} "
              f"{'cpu time s':>10} {'loss':>14}")
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        if "failed" in r:
            print(f"{r['variant']:<8} {r['untrained_fraction']:>9.2f} failed ({r['failed']})")
            continue
        print(f"{r['variant']:<8} {r['untrained_fraction']:>9.2f} {r['trained_tokens']:>11} {r['peak_extra_mb']:>13.0f} "
              f"{r['time_s']:>8.1f} {r['cpu_time_s']:>10.1f} {r['loss']:>14.4f}")
    print()
    print("time s: median wall time of the full passes; cpu time s: median process CPU time (all threads), less "
          "sensitive to other processes on the machine")
    for fraction in args.untrained_fraction:
        by_variant = {r["variant"]: r for r in results if r["untrained_fraction"] == fraction and "failed" not in r}
        if {"naive", "chunked"} <= by_variant.keys():
            naive, chunked = by_variant["naive"], by_variant["chunked"]
            print(f"untrained {fraction:.2f}: memory naive/chunked = "
                  f"{naive['peak_extra_mb'] / chunked['peak_extra_mb']:.2f}x, "
                  f"time chunked/naive = {chunked['time_s'] / naive['time_s']:.2f}x "
                  f"(cpu time {chunked['cpu_time_s'] / naive['cpu_time_s']:.2f}x), "
                  f"loss rel. diff = {abs(chunked['loss'] - naive['loss']) / max(abs(naive['loss']), 1e-12):.1e}")


if __name__ == "__main__":
    main()
