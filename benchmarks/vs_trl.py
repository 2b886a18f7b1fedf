"""Training throughput and loss: our trainer vs TRL's SFTTrainer, same tiny model, same data, same batches.

    .venv/bin/pip install --no-deps trl          # TRL only for this benchmark (--no-deps keeps our pinned stack)
    .venv/bin/python benchmarks/vs_trl.py [--steps 200] [--batch_size 16] [--learning_rate 2e-3] \
        [--rows_per_task 2000] [--trl_mode padding_free|bfd] [--threads N] [--keep] \
        [--hidden_size H --num_layers L --vocab_size V] [--turns N] [--max_seq_length T] [--ours default|chunked|both]

One process on CPU, fp32, both sides one after the other (never at the same time). The script builds the embedded
tiny Llama once, writes one JSONL of `messages` rows from the synthetic tasks (spelling, letter_count, arithmetic)
and trains on it twice:

- ours: `python -m open_instruct.finetune` (padding-free by default: one row of B examples per step, positions
  restarting at 0 for each, attention `packed_sdpa`: causal SDPA per example), read back from summary.json /
  metrics.jsonl;
- TRL: SFTTrainer in a subprocess of this script, with the same tokenizer (tulu template plus `{% generation %}`
  markers, which assistant_only_loss needs, so it trains the same assistant tokens as ours) and the same weights.

Default TRL mode (`padding_free`): padding_free=True without packing and per_device_train_batch_size=B, which is one
packed row of exactly the B examples of the step, i.e. our semantics. TRL is also fed the examples in our batch order
(our BatchPlan for seed 0, read sequentially), so step n of both runs sees the same 16 examples and the loss curves
can be compared step by step. `--trl_mode bfd` uses TRL's packing (packing=True, packing_strategy="bfd",
per_device_train_batch_size=1, max_length chosen to hold about B examples), in TRL's own order.

Timed: the training loop only (ours: summary.json `train_seconds`; TRL: on_train_begin to on_train_end) and the
whole subprocess (start-up, data preparation, model load, training, final save), in wall-clock and CPU seconds.
Effective tokens/s counts non-pad tokens (padding-free: every token of the row). The timings assume an otherwise idle
machine; the report prints the load average before and after so a busy machine shows, and the median step time,
which a few slow steps do not move. On an oversubscribed machine both runs slow down a lot (torch's threads wait
on each other); `--threads 1` makes that milder.

Compute-bound sizes: `--hidden_size/--num_layers/--vocab_size` build a bigger Llama of the same architecture (head
dim 64, half as many key-value heads, MLP 3x hidden, untied output layer) instead of the tiny one; the byte-level
tokenizer still uses only its ~270 ids, the others are never seen. That is a fair comparison of speed: the output
layer's matmuls and the softmax cost the same for every row of the vocabulary, whichever ids occur. `--turns N`
makes each conversation N user/assistant exchanges (N synthetic rows, tasks interleaved), so examples are about N
times longer; the packed row of a step is `--batch_size` such examples (e.g. --turns 10 --batch_size 4: rows of
about 1.6k tokens). `--ours chunked` runs ours with --use_liger_kernel, which on CPU is our chunked loss: only the
trained positions go through the output layer (open_instruct/loss.py); `--ours both` runs ours both ways, so the
report says what a user gets with the default and with the flag.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("spelling", "letter_count", "arithmetic")
MAX_SEQ_LENGTH = 256
SEED = 0

# The tiny model's tulu template with TRL's `{% generation %}` markers around what our masks train: the assistant
# content and its eos. It renders exactly the same text as open_instruct.chat_templates.TULU.


# ----------------------------------------------------------------------------------------------------------------
# Set-up shared by both sides
# ----------------------------------------------------------------------------------------------------------------
def write_data(path: Path, rows_per_task: int, turns: int = 1) -> int:
    """rows_per_task rows of each task, one after the other; with turns > 1, conversations of `turns` exchanges,
    each taken from the tasks in turn (round robin), so rows_per_task * len(TASKS) // turns conversations."""
    from open_instruct.synthetic import load_task

    per_task = []
    for task in TASKS:
        task_rows = load_task(task, "train")
        if len(task_rows) < rows_per_task:
            sys.exit(f"synthetic:{task} has only {len(task_rows)} train rows; lower --rows_per_task.")
        per_task.append(task_rows[:rows_per_task])
    if turns == 1:
        rows = [row for task_rows in per_task for row in task_rows]
    else:
        exchanges = [row["messages"] for group in zip(*per_task) for row in group]
        rows = [{"messages": [m for messages in exchanges[i : i + turns] for m in messages]}
                for i in range(0, len(exchanges) - turns + 1, turns)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def model_config(args) -> dict | None:
    """Overrides of the tiny Llama config for --hidden_size/--num_layers/--vocab_size (None: the tiny model)."""
    if args.hidden_size is None and args.num_layers is None and args.vocab_size is None:
        return None
    from open_instruct.tiny_model import default_config_path

    config = json.loads(default_config_path().read_text())
    if args.hidden_size is not None:
        heads = max(1, args.hidden_size // 64)
        config.update(hidden_size=args.hidden_size, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      head_dim=args.hidden_size // heads, intermediate_size=3 * args.hidden_size)
    if args.num_layers is not None:
        config["num_hidden_layers"] = args.num_layers
    if args.vocab_size is not None:
        config["vocab_size"] = args.vocab_size
    config["max_position_embeddings"] = max(config["max_position_embeddings"], args.max_seq_length)
    return config


def describe_model(config: dict | None, parameters: int) -> str:
    if config is None:
        return f"tiny Llama (open_instruct/assets/tiny_llama.json, {parameters / 1e6:.2f}M parameters)"
    return (f"Llama hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
            f"{config['num_attention_heads']} heads ({config['num_key_value_heads']} key-value), MLP "
            f"{config['intermediate_size']}, vocabulary {config['vocab_size']} (untied output layer; the byte-level "
            f"tokenizer uses ~270 ids), {parameters / 1e6:.1f}M parameters, random init")


def child_env(work: Path, threads: int | None) -> dict:
    # Keep every cache in the temp dir and never touch the network.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               HF_DATASETS_CACHE=str(work / "hf-cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], log: Path, cwd: Path, env: dict, what: str) -> tuple[float, float]:
    """Run to completion; returns (wall seconds, CPU seconds of the process tree: user + system)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"{what} failed (exit {result.returncode}); last lines of {log}:\n{log.read_text()[-4000:]}")
    return wall, (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)


# ----------------------------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------------------------
def ours_command(args, model_dir: Path, data: Path, out: Path, cache: Path, chunked: bool = False) -> list[str]:
    return [sys.executable, "-m", "open_instruct.finetune", "--model_name_or_path", str(model_dir),
            "--dataset_mixer_list", str(data), "1.0", "--per_device_train_batch_size", str(args.batch_size),
            "--gradient_accumulation_steps", "1", "--max_train_steps", str(args.steps),
            "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "linear", "--warmup_ratio", "0.0",
            "--seed", str(SEED), "--max_seq_length", str(args.max_seq_length), "--output_dir", str(out),
            "--dataset_local_cache_dir", str(cache), "--logging_steps", "1"] + (["--use_liger_kernel"] if chunked else [])


def run_ours(args, model_dir: Path, data: Path, work: Path, chunked: bool = False) -> dict:
    name = "ours-chunked" if chunked else "ours"
    out = work / name
    cmd = ours_command(args, model_dir, data, out, work / "cache", chunked)
    wall, cpu = run_logged(cmd, work / f"{name}.log", REPO, child_env(work, args.threads), f"our trainer ({name})")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stats = json.loads((out / "dataset_stats.json").read_text())
    setup = re.search(r"attention (\S+), padding-free (\S+)\.", (work / f"{name}.log").read_text())
    tokens = per_step([r["total_tokens"] for r in records])
    trained = per_step([r["trained_tokens"] for r in records])
    # Seconds since the loop started, at each step's log: tokens so far / tokens per second so far.
    elapsed = [r["total_tokens"] / r["per_device_tps"] for r in records]
    return {"wall": wall, "cpu": cpu, "train_seconds": summary["train_seconds"],
            "total_tokens": summary["total_tokens"], "losses": [r["train_loss"] for r in records],
            "step_seconds": per_step(elapsed), "tokens": tokens, "trained": trained,
            "examples": [args.batch_size] * len(records), "stats": stats, "command": cmd, "name": name,
            "attention": setup.group(1) if setup else "?", "padding_free": setup.group(2) if setup else "?"}


def per_step(cumulative: list) -> list:
    """Per-step values from running totals."""
    return [b - a for a, b in zip([0] + cumulative[:-1], cumulative)]


def our_batch_order(num_examples: int, batch_size: int, steps: int) -> list[int]:
    """The mixture indices our trainer uses, step after step (our mixture of one file at 1.0 keeps the file order)."""
    from open_instruct.batching import BatchPlan

    plan = BatchPlan(num_examples, batch_size, SEED)
    return [int(i) for step in range(steps) for i in plan.global_batch(step)]


# ----------------------------------------------------------------------------------------------------------------
# TRL (runs in a subprocess: `vs_trl.py --_trl_worker config.json`)
# ----------------------------------------------------------------------------------------------------------------
def trl_worker(config_path: Path) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(REPO))
    from open_instruct.chat_templates import TULU_GENERATION

    cfg = json.loads(config_path.read_text())
    work = Path(cfg["work"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    tokenizer.chat_template = TULU_GENERATION
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    dataset = datasets.load_dataset("json", data_files=cfg["data"], split="train", cache_dir=str(work / "hf-cache"))
    if cfg["order"] is not None:
        dataset = dataset.select(cfg["order"])  # our batches, read in order by TRL's sequential sampler

    common = dict(
        output_dir=str(work / "trl"), max_steps=cfg["steps"], gradient_accumulation_steps=1,
        learning_rate=cfg["learning_rate"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping, like ours by default (--clip_grad_norm -1)
        logging_steps=1, report_to=[], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        seed=SEED, save_strategy="no", assistant_only_loss=True, loss_type="nll", dataset_num_proc=None,
    )
    if cfg["mode"] == "padding_free":
        # TRL refuses a max_length without packing in padding-free mode (it would not be enforced); no row here
        # comes close to our 256-token limit, so None truncates nothing (checked by comparing token counts).
        config = SFTConfig(**common, padding_free=True, packing=False, max_length=None,
                           per_device_train_batch_size=cfg["batch_size"], train_sampling_strategy="sequential")
    else:
        config = SFTConfig(**common, packing=True, packing_strategy="bfd", padding_free=True,
                           max_length=cfg["packed_length"], per_device_train_batch_size=1)

    class Timer(TrainerCallback):
        start = end = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.step_ends: list[float] = []
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter() - self.start)

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    timer = Timer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    counts = {"tokens": [], "trained": [], "examples": []}
    collate = trainer.data_collator

    def counting_collator(features):
        # TRL refuses a custom collator with padding_free, so wrap its own one after construction to count what
        # every batch holds: non-pad tokens, trained labels (first token of each example already -100), examples.
        batch = collate(features)
        mask = batch.get("attention_mask")
        counts["tokens"].append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        counts["trained"].append(int((batch["labels"] != -100).sum()))
        counts["examples"].append(int((batch["position_ids"] == 0).sum()) if "position_ids" in batch
                                  else batch["input_ids"].shape[0])
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    trainer.save_model(str(work / "trl" / "final"))  # like ours, which saves the final model
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "train_seconds": timer.end - timer.start,
        "step_seconds": per_step(timer.step_ends),
        "losses": losses,
        **{key: values[: cfg["steps"]] for key, values in counts.items()},
        "optim": str(getattr(config.optim, "value", config.optim)),
        "average_tokens_across_devices": config.average_tokens_across_devices,
        "loss_type": config.loss_type,
        "threads": torch.get_num_threads(),
    }
    (work / "trl_result.json").write_text(json.dumps(result))


def run_trl(args, model_dir: Path, data: Path, work: Path, order: list[int] | None, packed_length: int | None) -> dict:
    cfg = {"work": str(work), "model_dir": str(model_dir), "data": str(data), "steps": args.steps,
           "batch_size": args.batch_size, "learning_rate": args.learning_rate, "mode": args.trl_mode,
           "order": order, "packed_length": packed_length}
    config_path = work / "trl_config.json"
    config_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_trl_worker", str(config_path)]
    wall, cpu = run_logged(cmd, work / "trl.log", work, child_env(work, args.threads), "TRL")
    result = json.loads((work / "trl_result.json").read_text())
    result["wall"], result["cpu"] = wall, cpu
    result["total_tokens"] = sum(result["tokens"])
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def curve_steps(steps: int) -> list[int]:
    marks = {1, steps} | {max(1, round(steps * k / 10)) for k in range(1, 10)}
    return sorted(marks)


def describe(args, runs: list[dict], trl: dict, packed_length: int | None, mean_len: float) -> list[str]:
    ours = runs[0]
    tmp = str(Path(ours["command"][4]).parent)
    lines = [
        f"{ours['name']}: python " + " ".join(ours["command"][1:]).replace(tmp, "<tmp>"),
        f"      padding-free {ours['padding_free']} (one row of the step's B examples, positions restarting at 0), "
        f"attention {ours['attention']} (as its log says), torch AdamW (not fused); loss = sum over the global "
        "batch's trained tokens / their count",
    ]
    if any(run["name"] == "ours-chunked" for run in runs):
        lines.append("ours-chunked: the same with --use_liger_kernel; on CPU our chunked loss (open_instruct/loss.py): "
                     "only the trained positions go through the output layer, 1,024 rows at a time.")
    shared = (f"assistant_only_loss=True, loss_type='nll', bf16=False, gradient_checkpointing=False, "
              f"max_grad_norm=0, optim='{trl['optim']}' (TRL's default)")
    if args.trl_mode == "padding_free":
        lines += [
            f"TRL:  SFTConfig(padding_free=True, packing=False, per_device_train_batch_size={args.batch_size}, "
            f"max_length=None, train_sampling_strategy='sequential', {shared})",
            "      attention sdpa (transformers' block-diagonal causal mask over the packed row; TRL's CPU option).",
            "      why: TRL accepts padding_free without packing (on CPU, with SDPA): one step is then one packed row "
            f"of exactly {args.batch_size} examples, our semantics. TRL requires max_length=None there (no row comes "
            f"near {args.max_seq_length} tokens, so neither side truncates). The dataset is handed to TRL in our batch order and read "
            "sequentially, so both trainers see the same examples at every step.",
        ]
    else:
        lines += [
            f"TRL:  SFTConfig(packing=True, packing_strategy='bfd', padding_free=True, per_device_train_batch_size=1, "
            f"max_length={packed_length}, {shared})",
            "      attention sdpa (transformers' block-diagonal causal mask over the packed row; TRL's CPU option).",
            "      why: TRL's packing counts packed rows, not examples; max_length = "
            f"{args.batch_size} x {mean_len:.1f} mean tokens holds about {args.batch_size} examples per row. TRL's own "
            "order (bfd groups examples by length), so its batches differ from ours and per-step losses differ by "
            "batch noise.",
        ]
    lines.append(
        f"      TRL loss: loss_type={trl['loss_type']!r} divides the token-loss sum by num_items_in_batch, the trained "
        f"tokens of the whole accumulation batch (average_tokens_across_devices="
        f"{trl['average_tokens_across_devices']}): the same token-level mean over the global batch as ours. "
        "(TRL also computes the gradient norm and entropy/accuracy metrics every step, as part of its loop.)"
    )
    return lines


def report(args, rows: int, runs: list[dict], trl: dict, packed_length: int | None, model: str) -> None:
    import torch
    import transformers
    import trl as trl_package

    steps = args.steps
    ours = runs[0]
    mean_len = ours["total_tokens"] / (steps * args.batch_size)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"(threads per run: {trl['threads']}), transformers {transformers.__version__}, "
          f"TRL {trl_package.__version__}; one process each, CPU, fp32, run one after the other")
    print(f"load average (1 min) before / after the runs: {args.load_before:.2f} / {os.getloadavg()[0]:.2f} "
          "(other work on the machine skews the timings)")
    turns = f", {args.turns} exchanges per conversation" if args.turns > 1 else ""
    print(f"data: {rows} rows ({args.rows_per_task} each of {', '.join(TASKS)}{turns}), {model}; "
          f"{mean_len:.1f} tokens/example, {ours['total_tokens'] / steps:.0f} tokens/row on average, "
          f"{sum(ours['trained']) / ours['total_tokens']:.0%} of them trained")
    print(f"common: {steps} steps, global batch {args.batch_size} examples (1 process x 1 accumulation step), "
          f"lr {args.learning_rate:g} linear to 0, no warmup, weight decay 0, no clipping, seed {SEED}, "
          "logging every step")
    print()
    print("\n".join(describe(args, runs, trl, packed_length, mean_len)))
    print()

    sides = [*runs, trl]
    tps = [side["total_tokens"] / side["train_seconds"] for side in sides]
    medians = [statistics.median(side["step_seconds"]) for side in sides]
    trl_ex = sum(trl["examples"]) / max(len(trl["examples"]), 1)
    table = [
        ("steps", *(f"{len(side['losses'])}" for side in sides)),
        ("examples per step", *(f"{sum(r['examples']) / len(r['examples']):.1f}" for r in runs),
         f"{trl_ex:.1f} (min {min(trl['examples'])}, max {max(trl['examples'])})"),
        ("tokens (non-pad)", *(f"{side['total_tokens']}" for side in sides)),
        ("trained tokens", *(f"{sum(side['trained'])}" for side in sides)),
        ("training loop s", *(f"{side['train_seconds']:.2f}" for side in sides)),
        ("effective tokens/s", *(f"{value:.0f}" for value in tps)),
        ("median step s", *(f"{value:.3f}" for value in medians)),
        ("slowest step s", *(f"{max(side['step_seconds']):.2f}" for side in sides)),
        ("whole process s", *(f"{side['wall']:.1f}" for side in sides)),
        ("whole process CPU s", *(f"{side['cpu']:.1f}" for side in sides)),
    ]
    print(f"{'':<20}" + "".join(f"{run['name']:>14}" for run in runs) + "   TRL")
    for name, *values in table:
        print(f"{name:<20}" + "".join(f"{value:>14}" for value in values[:-1]) + f"   {values[-1]}")
    for run, run_tps, median in zip(runs, tps, medians):
        print(f"effective tokens/s {run['name']} / TRL: {run_tps / tps[-1]:.2f}x   (median step time TRL / "
              f"{run['name']}: {medians[-1] / median:.2f}x, less sensitive to bursts of other load; whole process "
              f"wall TRL / {run['name']}: {trl['wall'] / run['wall']:.2f}x)")
    if args.trl_mode == "padding_free":
        same_tokens = sum(a == b for a, b in zip(ours["tokens"], trl["tokens"]))
        same_trained = sum(a == b for a, b in zip(ours["trained"], trl["trained"]))
        print(f"same batches: per-step token counts equal on {same_tokens}/{steps} steps, trained-token counts on "
              f"{same_trained}/{steps}")
    print()

    n = min(len(side["losses"]) for side in sides)
    print(f"{'step':>6}" + "".join(f"{run['name']:>14}" for run in runs) + f"{'TRL':>10}"
          + "".join(f"{'diff' if len(runs) == 1 else run['name'][5:] or 'default':>11}" for run in runs))
    for step in curve_steps(n):
        values = [run["losses"][step - 1] for run in runs]
        b = trl["losses"][step - 1]
        print(f"{step:>6}" + "".join(f"{a:>14.4f}" for a in values) + f"{b:>10.4f}"
              + "".join(f"{a - b:>+11.2e}" for a in values))
    tail = max(1, n // 5)
    tail_trl = sum(trl["losses"][n - tail:n]) / tail
    for run in runs:
        diffs = [abs(a - b) for a, b in zip(run["losses"][:n], trl["losses"][:n])]
        tail_ours = sum(run["losses"][n - tail:n]) / tail
        print(f"{run['name']}: mean |ours - TRL| over the last {tail} steps: {sum(diffs[n - tail:]) / tail:.2e} "
              f"(mean loss there: ours {tail_ours:.4f}, TRL {tail_trl:.4f}); max over all steps {max(diffs):.2e}, "
              f"step 1 {diffs[0]:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16, help="examples per optimizer step, both trainers")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--rows_per_task", type=int, default=2000)
    parser.add_argument("--trl_mode", choices=("padding_free", "bfd"), default="padding_free",
                        help="padding_free: B examples per step in our order (exact match); bfd: TRL's packing")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both runs (default: torch's own choice, one per core)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, both run dirs)")
    parser.add_argument("--hidden_size", type=int, default=None,
                        help="a bigger Llama: hidden size (head dim 64, MLP 3x); default the tiny model's 128")
    parser.add_argument("--num_layers", type=int, default=None, help="its layers (default the tiny model's 4)")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="its output layer's rows (default the tiny model's 272; ids beyond the tokenizer's unused)")
    parser.add_argument("--max_seq_length", type=int, default=MAX_SEQ_LENGTH,
                        help="our --max_seq_length (no example may exceed it: both sides must see the same tokens)")
    parser.add_argument("--turns", type=int, default=1,
                        help="user/assistant exchanges per conversation (longer examples; default 1)")
    parser.add_argument("--ours", choices=("default", "chunked", "both"), default="default",
                        help="ours as is, with --use_liger_kernel (the chunked loss on CPU), or both")
    parser.add_argument("--_trl_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._trl_worker:
        trl_worker(Path(args._trl_worker))
        return

    sys.path.insert(0, str(REPO))
    from safetensors import safe_open

    from open_instruct.tiny_model import build_tiny_model

    args.load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    try:
        config = model_config(args)
        config_path = None
        if config is not None:
            config_path = work / "model_config.json"
            config_path.write_text(json.dumps(config))
        model_dir = build_tiny_model(work / "tiny-llama", config_path=config_path, seed=SEED)
        with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
            parameters = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
        data = work / "rows.jsonl"
        rows = write_data(data, args.rows_per_task, args.turns)
        runs = [run_ours(args, model_dir, data, work, chunked) for chunked in
                {"default": [False], "chunked": [True], "both": [False, True]}[args.ours]]
        ours = runs[0]
        kept = sum(s["kept_rows"] for s in ours["stats"])
        truncated = sum(sum(s["truncated"].values()) for s in ours["stats"])
        order = packed_length = None
        if args.trl_mode == "padding_free":
            if kept != rows or truncated:
                sys.exit(f"our mixture kept {kept} of {rows} rows ({truncated} truncated); cannot reproduce its "
                         "batches for TRL.")
            order = our_batch_order(rows, args.batch_size, args.steps)
        else:
            packed_length = round(args.batch_size * ours["total_tokens"] / (args.steps * args.batch_size))
        trl = run_trl(args, model_dir, data, work, order, packed_length)
        report(args, rows, runs, trl, packed_length, describe_model(config, parameters))
        if args.keep:
            print(f"\nkept: {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
