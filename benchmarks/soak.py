"""Soak: the debug model trained for 20,000 optimizer steps with a checkpoint every 1,000 and an evaluation every
2,000; resident memory and step time must stay flat, and no file descriptors or threads may leak.

    .venv/bin/python benchmarks/soak.py [--steps 20000] [--checkpoint_every 1000] [--eval_every 2000] \
        [--work_dir output/soak] [--sample_seconds 2]

The trainer runs as a child process (`python -m open_instruct.finetune`) with the debug recipe's model, data and
flags (scripts/train/debug/finetune.sh: the embedded tiny Llama, 8,000 synthetic examples = 500 steps an epoch, so
20,000 steps pass 40 epoch boundaries too), `--max_train_steps STEPS`, `--keep_last_n_checkpoints 2` (the disk does
not fill) and 20 examples per evaluation task. The work dir is cleared first and receives the tiny model, the
dataset cache, the run (run/), the trainer's output (train.log), soak.json (every sample and the summary) and
rss.png, step_time.png, fds_threads.png.

Every --sample_seconds the child is read from outside through /proc/<pid>: VmRSS, CPU time (stat), the number of
open file descriptors (fd/) and threads (task/), and the newest step in its metrics.jsonl (it logs every
--logging_steps 10). Step time (wall clock, and the child's CPU time next to it) is measured per window between the
samples that first saw consecutive logged steps; windows that may contain a checkpoint save or an evaluation are
left out (their count is printed), so the fit measures the steady state. After a warm-up that includes the first
checkpoint and the first evaluation (their one-time allocations are not leaks), RSS and step time get a
least-squares slope against the step number; a leak is flagged where the slope times the run length exceeds the
thresholds below. File descriptors and threads are compared between the first and the last sample taken outside a
checkpoint or evaluation. Step time measures the machine as much as the trainer: other programs on the cores
slow it down (the printed load average says when), so run it on an idle machine. Exit code: 1 if the trainer
failed, else 0 (leaks are reported, not raised).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The debug recipe's data and flags (scripts/train/debug/finetune.sh), without its before/after evaluation.
DATASET = ["synthetic:spelling", "4000", "synthetic:reverse", "2000", "synthetic:letter_count", "2000"]
RECIPE = ["--learning_rate", "5e-4", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.05",
          "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1", "--max_seq_length", "256",
          "--clip_grad_norm", "1.0", "--seed", "42", "--exp_name", "soak"]
EVAL = ["--eval_dataset_mixer_list", "synthetic:spelling", "1.0", "synthetic:reverse", "1.0", "synthetic:letter_count",
        "1.0", "--eval_tasks", "spelling", "reverse", "letter_count", "--eval_max_examples", "20"]
MARKER = ".soak"  # a work dir holding it (or empty) is ours to clear; anything else is refused

# Leak thresholds, on the fitted growth over the whole run (slope x --steps), relative to the value at the end of the
# warm-up (the median of the first five measurements after it). RSS: 5% of it, but at least 50 MiB, because the
# trainer's RSS moves by tens of MiB from sample to sample without a trend (627-650 MiB within 300 steps of the smoke
# run), and the fraction scales the limit for larger models. Step time: 10%:
# per-step work that grows with the step count (a growing list walked every step) crosses any fixed fraction on a long
# run, while a flat step time's fitted slope stays near zero; 10% leaves room for drift. Wall-clock step time on a
# shared machine follows the other load (50 to 1,000+ ms a step on the 2-core VM), so read it with the load
# average printed next to it and the child's CPU time per step (wall time growing while CPU time does not: the child
# waited for a core; both growing: more work per step, or its threads spinning while they wait).
RSS_GROWTH_FRACTION, RSS_GROWTH_FLOOR_MIB = 0.05, 50.0
STEP_TIME_GROWTH_FRACTION = 0.10


# ----------------------------------------------------------------------------------------------------------------
# Reading the child: /proc and the tail of metrics.jsonl
# ----------------------------------------------------------------------------------------------------------------
def rss_mib(status: str) -> float | None:
    """VmRSS of a /proc/<pid>/status text in MiB (None for a zombie, which has no memory lines)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # reported in kB
    return None


def cpu_seconds(stat: str, ticks_per_second: int) -> float:
    """User + system CPU time of a /proc/<pid>/stat text. The command name (field 2) may hold spaces and
    parentheses, so fields are counted after its closing parenthesis: utime and stime are fields 14 and 15."""
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


def newest_step(tail: str) -> int | None:
    """The step of the last complete line of a metrics.jsonl tail. The trainer may be writing the last line (no
    newline yet) and a tail read from mid-file starts mid-line: both are skipped."""
    for line in reversed(tail.split("\n")[:-1]):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def read_tail(path: Path, size: int = 65536) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read().decode(errors="replace")
    except FileNotFoundError:  # the trainer has not started logging yet
        return ""


def sample(pid: int, metrics: Path, seconds: float) -> dict | None:
    """One sample of the child, or None once it has exited (its /proc entry vanishes or it is a zombie)."""
    proc = Path(f"/proc/{pid}")
    try:
        rss = rss_mib((proc / "status").read_text())
        cpu = cpu_seconds((proc / "stat").read_text(), os.sysconf("SC_CLK_TCK"))
        fds, threads = len(os.listdir(proc / "fd")), len(os.listdir(proc / "task"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    if rss is None:
        return None
    return {"seconds": round(seconds, 3), "step": newest_step(read_tail(metrics)), "rss_mib": round(rss, 2),
            "cpu_seconds": cpu, "fds": fds, "threads": threads, "load_1m": os.getloadavg()[0]}


# ----------------------------------------------------------------------------------------------------------------
# Which samples and windows are steady state
# ----------------------------------------------------------------------------------------------------------------
def event_marks(steps: int, checkpoint_every: int, eval_every: int, logging_steps: int) -> set[int]:
    """The logged steps right after which a checkpoint save or an evaluation runs. An event after step k starts
    after the last logged step at or before k (the final step is always logged) and ends before the next one. Step 0
    is the evaluation before training; the final step has the final evaluation, save and report."""
    checkpoints = range(checkpoint_every, steps + 1, checkpoint_every)
    events = {0, steps, *checkpoints, *range(eval_every, steps + 1, eval_every)}
    return {k if k == steps else k - k % logging_steps for k in events}


def is_quiet(step: int | None, marks: set[int]) -> bool:
    """Whether a sample that saw `step` as the newest logged step was taken outside any checkpoint or evaluation
    (None: before the first logged line, while the trainer starts up)."""
    return step is not None and step not in marks


def step_windows(samples: list[dict], marks: set[int]) -> list[dict]:
    """Step time between the samples that first saw consecutive logged steps. A window from first seeing step a to
    first seeing step b may contain an event after any logged step from a to b (both ends included)."""
    firsts = [s for i, s in enumerate(samples)
              if s["step"] is not None and (i == 0 or s["step"] != samples[i - 1]["step"])]
    windows = []
    for start, end in zip(firsts, firsts[1:]):
        steps = end["step"] - start["step"]
        if steps <= 0:
            continue
        seconds, cpu = end["seconds"] - start["seconds"], end["cpu_seconds"] - start["cpu_seconds"]
        windows.append({"first_step": start["step"], "last_step": end["step"], "seconds": round(seconds, 3),
                        "ms_per_step": round(1000 * seconds / steps, 3),
                        "cpu_ms_per_step": round(1000 * cpu / steps, 3),
                        "quiet": not any(start["step"] <= mark <= end["step"] for mark in marks)})
    return windows


def window_middle(window: dict) -> float:
    return (window["first_step"] + window["last_step"]) / 2


# ----------------------------------------------------------------------------------------------------------------
# Trends
# ----------------------------------------------------------------------------------------------------------------
def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of ys against xs; None with fewer than two distinct xs."""
    n = len(xs)
    if n < 2:
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    return slope, mean_y - slope * mean_x


def edge_medians(values: list[float], count: int = 5) -> tuple[float, float]:
    """Medians of the first and of the last `count` values: a start and an end that one noisy window cannot set."""
    return statistics.median(values[:count]), statistics.median(values[-count:])


def trend(points: list[tuple[float, float]], steps: int, fraction: float, floor: float = 0.0) -> dict:
    """Slope per 1,000 steps of (step, value) points measured after the warm-up, start and end (medians of the first
    and last five values) and max; `leak` when the fitted growth over the whole run (slope x steps) exceeds
    `fraction` of the start value, and at least `floor`."""
    fit = fit_line([x for x, _ in points], [y for _, y in points])
    if fit is None:
        return {"points": len(points), "slope_per_1000_steps": None, "leak": None}
    values = [y for _, y in points]
    start, end = edge_medians(values)
    growth, limit = fit[0] * steps, max(fraction * start, floor)
    return {"points": len(points), "slope_per_1000_steps": round(1000 * fit[0], 4), "start": start, "end": end,
            "max": max(values), "growth_over_run": round(growth, 3), "limit": round(limit, 3), "leak": growth > limit}


def count_trend(quiet: list[dict], key: str) -> dict:
    """Open fds or threads: the first and last quiet samples after the warm-up; `leak` when the last is higher."""
    if not quiet:
        return {"after_warmup": None, "end": None, "max": None, "leak": None}
    values = [s[key] for s in quiet]
    return {"after_warmup": values[0], "end": values[-1], "max": max(values), "leak": values[-1] > values[0]}


def summarize(samples: list[dict], windows: list[dict], marks: set[int], warmup: int, steps: int) -> dict:
    measured = [s for s in samples if is_quiet(s["step"], marks) and s["step"] > warmup]
    used = [w for w in windows if w["quiet"] and w["first_step"] >= warmup]
    middles = [window_middle(w) for w in used]
    step_time = trend(list(zip(middles, [w["ms_per_step"] for w in used])), steps, STEP_TIME_GROWTH_FRACTION)
    cpu_time = trend(list(zip(middles, [w["cpu_ms_per_step"] for w in used])), steps, STEP_TIME_GROWTH_FRACTION)
    step_time.update(windows_left_out=sum(not w["quiet"] for w in windows),
                     windows_in_warmup=sum(w["quiet"] and w["first_step"] < warmup for w in windows))
    rss = trend([(s["step"], s["rss_mib"]) for s in measured], steps, RSS_GROWTH_FRACTION, RSS_GROWTH_FLOOR_MIB)
    summary = {"rss_mib": rss, "step_time_ms": step_time, "cpu_time_ms": cpu_time,
               "fds": count_trend(measured, "fds"), "threads": count_trend(measured, "threads")}
    for key in ("rss_mib", "fds", "threads"):  # peaks during saves and evaluations too, from the first logged line on
        summary[key]["max_any_sample"] = max((s[key] for s in samples if s["step"] is not None), default=None)
    loads = [s["load_1m"] for s in samples]
    summary["load_average"] = {"start": loads[0] if loads else None, "max": max(loads, default=None),
                               "end": loads[-1] if loads else None}
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Running the child
# ----------------------------------------------------------------------------------------------------------------
def prepare_work_dir(work_dir: Path) -> None:
    """Clear the work dir, refusing one that this script did not make (a mistyped --work_dir must not erase data)."""
    if work_dir.exists() and any(work_dir.iterdir()) and not (work_dir / MARKER).exists():
        sys.exit(f"{work_dir} is not empty and was not made by soak.py ({MARKER} missing); choose another --work_dir.")
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    (work_dir / MARKER).touch()


def trainer_command(args: argparse.Namespace, model: Path) -> list[str]:
    work = args.work_dir
    return [sys.executable, "-m", "open_instruct.finetune", "--model_name_or_path", str(model),
            "--dataset_mixer_list", *DATASET, *RECIPE, *EVAL, "--max_train_steps", str(args.steps),
            "--eval_every", str(args.eval_every), "--checkpointing_steps", str(args.checkpoint_every),
            "--keep_last_n_checkpoints", "2", "--logging_steps", str(args.logging_steps),
            "--output_dir", str(work / "run"), "--dataset_local_cache_dir", str(work / "cache")]


def child_env() -> dict:
    """No tracker or hub credentials and no accelerate settings from the shell; offline: model and data are local."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "HF_", "ACCELERATE_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_and_sample(command: list[str], work_dir: Path, sample_seconds: float) -> tuple[int, list[dict], float]:
    """Start the trainer, sample it until it exits; returns (exit code, samples, wall seconds)."""
    metrics = work_dir / "run" / "metrics.jsonl"
    samples = []
    with (work_dir / "train.log").open("w") as log:  # a file, not a pipe: a full pipe would stall the trainer
        child = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        start = time.monotonic()
        next_sample = start
        try:
            while child.poll() is None:
                taken = sample(child.pid, metrics, time.monotonic() - start)
                if taken:
                    samples.append(taken)
                next_sample += sample_seconds  # a fixed cadence: the time spent sampling does not stretch it
                time.sleep(max(0.0, next_sample - time.monotonic()))
        except BaseException:  # Ctrl-C or a bug here: no trainer left running unwatched
            child.kill()
            child.wait()
            raise
        return child.wait(), samples, time.monotonic() - start


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def plot(result: dict, work_dir: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samples, windows, warmup = result["samples"], result["windows"], result["config"]["warmup_steps"]
    logged = [s for s in samples if s["step"] is not None]

    def by_step(rows: list[dict], key: str) -> list[tuple[float, float]]:
        return [(row["step"] if "step" in row else window_middle(row), row[key]) for row in rows]

    steady, left_out = [w for w in windows if w["quiet"]], [w for w in windows if not w["quiet"]]
    series = {
        "rss.png": ("RSS (MiB)", [("RSS", by_step(logged, "rss_mib"))]),
        "step_time.png": ("ms per step", [("wall clock", by_step(steady, "ms_per_step")),
                                          ("CPU time", by_step(steady, "cpu_ms_per_step")),
                                          ("wall clock, left out (checkpoint or evaluation)",
                                           by_step(left_out, "ms_per_step"))]),
        "fds_threads.png": ("count", [("open fds", by_step(logged, "fds")), ("threads", by_step(logged, "threads"))]),
    }
    paths = []
    for name, (ylabel, lines) in series.items():
        fig = Figure(figsize=(8, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, points in lines:
            ax.plot([x for x, _ in points], [y for _, y in points], ".", markersize=3, label=label)
        ax.axvline(warmup, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(work_dir / name)
        paths.append(work_dir / name)
    return paths


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "LEAK" if value else "no"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def print_summary(result: dict) -> None:
    config, summary = result["config"], result["summary"]
    rss, step_time = summary["rss_mib"], summary["step_time_ms"]
    print(f"soak: {summary['steps_done']} of {config['steps']} steps, trainer exit code {summary['exit_code']}, "
          f"{summary['wall_seconds']:.0f} s, {len(result['samples'])} samples; checkpoint every "
          f"{config['checkpoint_every']}, eval every {config['eval_every']}, warm-up {config['warmup_steps']} steps")
    print(f"{'':<16}{'after warm-up':>14}{'end':>10}{'max':>10}{'slope/1k steps':>16}{'growth (limit)':>22}  leak")
    rows = (("RSS (MiB)", rss), ("step time (ms)", step_time), ("CPU/step (ms)", summary["cpu_time_ms"]))
    for name, row in rows:
        growth = f"{fmt(row.get('growth_over_run'))} ({fmt(row.get('limit'))})"
        print(f"{name:<16}{fmt(row.get('start')):>14}{fmt(row.get('end')):>10}{fmt(row.get('max')):>10}"
              f"{fmt(row['slope_per_1000_steps'], 3):>16}{growth:>22}  {fmt(row['leak'])}")
    for name in ("fds", "threads"):
        row = summary[name]
        print(f"{name:<16}{fmt(row['after_warmup']):>14}{fmt(row['end']):>10}{fmt(row['max']):>10}"
              f"{'':>16}{'':>22}  {fmt(row['leak'])}")
    print(f"step-time windows: {step_time['points']} fitted, {step_time['windows_left_out']} left out (a checkpoint "
          f"save or an evaluation may fall in them), {step_time['windows_in_warmup']} in the warm-up")
    print(f"max over every sample, saves and evaluations included: RSS {fmt(rss['max_any_sample'])} MiB, "
          f"fds {fmt(summary['fds']['max_any_sample'])}, threads {fmt(summary['threads']['max_any_sample'])}")
    load = summary["load_average"]
    print(f"load average (1 min): {fmt(load['start'], 2)} at the start, {fmt(load['max'], 2)} at most, "
          f"{fmt(load['end'], 2)} at the end, on {os.cpu_count()} cores")
    if load["max"] is not None and load["max"] > os.cpu_count() + 1:  # the trainer's own threads make ~cores
        print("note: other programs competed for the cores; wall-clock step time (and CPU time, through threads that "
              "spin while they wait) follows their load, so the step-time verdicts say little: rerun on an idle "
              "machine")
    print(f"written: {result['config']['work_dir']}/soak.json")
    print(f"command: {result['command']}")
    print(f"trainer: {shlex.join(result['trainer_command'])}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--checkpoint_every", type=int, default=1000)
    parser.add_argument("--eval_every", type=int, default=2000)
    parser.add_argument("--logging_steps", type=int, default=10,
                        help="The trainer's --logging_steps: a sample knows the step only to this many, so it sets the "
                             "resolution of the step-time windows (10 steps take ~0.5 s on 2 idle cores).")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="Steps left out of the trends. Default: max(--checkpoint_every, --eval_every), so the "
                             "first save and evaluation, whose one-time allocations are no leak, are behind it.")
    parser.add_argument("--work_dir", type=Path, default=Path("output/soak"))
    parser.add_argument("--sample_seconds", type=float, default=2.0)
    parser.add_argument("--no_plots", action="store_true")
    args = parser.parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = max(args.checkpoint_every, args.eval_every)
    args.work_dir = args.work_dir.resolve()  # the trainer runs in the repository root, this script anywhere
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_work_dir(args.work_dir)
    model = args.work_dir / "tiny-llama"
    subprocess.run([sys.executable, "-m", "open_instruct.tiny_model", str(model)], cwd=REPO, env=child_env(),
                   check=True, capture_output=True)
    command = trainer_command(args, model)
    exit_code, samples, wall = run_and_sample(command, args.work_dir, args.sample_seconds)
    marks = event_marks(args.steps, args.checkpoint_every, args.eval_every, args.logging_steps)
    windows = step_windows(samples, marks)
    summary = summarize(samples, windows, marks, args.warmup_steps, args.steps)
    steps_done = newest_step(read_tail(args.work_dir / "run" / "metrics.jsonl"))
    summary.update(exit_code=exit_code, wall_seconds=round(wall, 1), steps_done=steps_done)
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    invoked = sys.argv[1:] if argv is None else argv
    result = {"command": shlex.join([sys.executable, "benchmarks/soak.py", *invoked]),
              "trainer_command": command, "config": config, "summary": summary, "samples": samples,
              "windows": windows}
    (args.work_dir / "soak.json").write_text(json.dumps(result, indent=1))
    if not args.no_plots and samples:
        plot(result, args.work_dir)
    print_summary(result)
    if exit_code != 0:
        print(f"the trainer failed (exit code {exit_code}); its output: {args.work_dir / 'train.log'}", file=sys.stderr)
    return 1 if exit_code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
