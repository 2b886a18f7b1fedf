"""Run report: plots of metrics.jsonl and a report.md of a training run directory.

    python -m open_instruct.report OUTPUT_DIR              # writes OUTPUT_DIR/report/{report.md,*.png}
    python -m open_instruct.report OUTPUT_DIR --out DIR    # writes DIR/{report.md,*.png}

Reads what open_instruct/finetune.py leaves in OUTPUT_DIR: metrics.jsonl (required), summary.json,
dataset_stats.json, run_config.yaml and environment.json (each optional). Every metric is optional too: a plot whose
fields were never logged (or are only NaN/inf) is skipped and report.md says so. The report is built in a temporary
folder next to the target and swapped in when complete, so a crash never leaves a half-written report.
The trainer calls `write_run_report(output_dir)`, which logs a warning instead of raising.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

logger = logging.getLogger("open_instruct.report")

FIGURE_WIDTH, PANEL_HEIGHT, DPI = 7.0, 4.0, 110
MANY_POINTS = 40  # series longer than this are drawn without markers (they would hide the line)
SMOOTHED = {"train_loss", "grad_norm"}  # noisy per-step values: drawn faintly with an EMA on top when long
DASHED = {"per_device_tps_including_padding"}  # equals the padding-free line in padding-free runs: keep both visible

LABELS = {
    "train_loss": "train",
    "eval_loss": "eval",
    "grad_norm": "gradient norm",
    "learning_rate": "learning rate",
    "per_device_tps": "per device, padding excluded",
    "per_device_tps_including_padding": "per device, padding included",
    "trained_tokens_per_sec": "trained tokens, all devices",
    "mfu": "MFU",
    "tflops": "model TFLOP/s per device",
    "padding_fraction": "padding (share of computed positions)",
    "dataloader_wait_fraction": "data-loader wait (share of wall time)",
    "eval_bits_per_byte": "eval bits per byte",
    "eval/centered_accuracy": "centered accuracy",
    "peak_memory_gb": "peak memory (largest process)",
}


class ReportError(Exception):
    """The run directory cannot be reported on; the message names the file (and line)."""


@dataclass
class Run:
    output_dir: Path
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    stats: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # optional files missing or unreadable, a cut-off last metrics line


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def load_run(output_dir: str | Path) -> Run:
    """Reads a run directory. Only metrics.jsonl is required; the other files become notes when missing or bad."""
    output = Path(output_dir)
    if not output.is_dir():
        raise ReportError(f"{output} is not a directory")
    rows, note = read_metrics(output / "metrics.jsonl")
    run = Run(output_dir=output, rows=rows, notes=[note] if note else [])
    run.summary = _optional(run, "summary.json", dict)
    run.stats = _optional(run, "dataset_stats.json", list)
    run.config = _optional(run, "run_config.yaml", dict)
    run.environment = _optional(run, "environment.json", dict)
    return run


def read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The records, and a note when the last line was cut off: a running trainer may be writing it (every record
    ends with a newline, so only an unfinished last line lacks one). A bad line anywhere else is an error."""
    if not path.is_file():
        raise ReportError(f"{path.parent} has no metrics.jsonl (is it a training run's --output_dir?)")
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # accepts NaN and Infinity, which json.dumps writes for a diverged loss
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                return rows, f"`metrics.jsonl`: the unfinished last line (line {number}, being written) was left out."
            raise ReportError(f"{path}: line {number} is not valid JSON ({exc.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}: line {number} is not a JSON object: {line[:80]!r}")
        rows.append(row)
    return rows, None


def _optional(run: Run, name: str, kind: type):
    path = run.output_dir / name
    if not path.is_file():
        run.notes.append(f"`{name}` is missing.")
        return kind()
    try:
        value = yaml.safe_load(path.read_text()) if name.endswith(".yaml") else json.loads(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        run.notes.append(f"`{name}` could not be read: {str(exc).splitlines()[0]}")
        return kind()
    if not isinstance(value, kind):
        run.notes.append(f"`{name}` does not hold a JSON {'object' if kind is dict else 'list'}; ignored.")
        return kind()
    return value


# ----------------------------------------------------------------------------------------------------------------
# Series
# ----------------------------------------------------------------------------------------------------------------
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that hold a finite number for `name`, by step. Eval metrics logged only on some
    steps thus appear only at those steps; NaN/inf are left out (report.md counts them) because they break axes."""
    points = [(row["step"], row[name]) for row in rows
              if _number(row.get("step")) and _number(row.get(name)) and math.isfinite(row[name])]
    points.sort(key=lambda point: point[0])  # stable: a resumed run's lines stay in order
    return [step for step, _ in points], [value for _, value in points]


def non_finite_steps(rows: list[dict], name: str) -> list:
    return [row.get("step") for row in rows if isinstance(row.get(name), float) and not math.isfinite(row[name])]


BASELINE = "_majority_baseline"


def baseline_field(name: str) -> str | None:
    """eval/<task>_accuracy -> eval/<task>_majority_baseline (what always giving the most common answer scores);
    None for other fields (the centered accuracy has none)."""
    if name.startswith("eval/") and name.endswith("_accuracy") and name != "eval/centered_accuracy":
        return name[: -len("_accuracy")] + BASELINE
    return None


def eval_fields(rows: list[dict]) -> list[str]:
    """eval_loss, eval_bits_per_byte, eval/<task>_accuracy ...: every field logged by the evaluation, less the
    majority baselines (shown beside their accuracies)."""
    names = dict.fromkeys(name for row in rows for name in row
                          if name.startswith(("eval_", "eval/")) and not name.endswith(BASELINE))
    return sorted(names, key=lambda name: (name.startswith("eval/"), name == "eval/centered_accuracy", name))


def accuracy_fields(rows: list[dict]) -> list[str]:
    """Per-task accuracies, then the centered average last (drawn on top, in black)."""
    return [name for name in eval_fields(rows) if name.startswith("eval/") and name.endswith("_accuracy")]


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    ylabel: str
    fields: tuple[str, ...]
    scale: str = "plain"  # "percent" (values are fractions of 1), "sci" (tiny values), "eng" (k, M suffixes)
    pattern: str = ""  # for a panel whose fields depend on the run (eval tasks): what the skip note asks for
    from_zero: bool = False  # rates and sizes: a zero baseline keeps small wobbles from looking like big swings


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    panels: tuple[Panel, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for panel in self.panels for name in panel.fields)


def plot_specs(rows: list[dict]) -> list[Plot]:
    """Every plot the report knows, whether or not its fields were logged (the eval ones depend on the tasks)."""
    return [
        Plot("loss.png", "Loss", (Panel("cross-entropy per trained token", ("train_loss", "eval_loss")),)),
        Plot("grad_norm.png", "Gradient norm (before clipping)", (Panel("global L2 norm", ("grad_norm",)),)),
        Plot("learning_rate.png", "Learning rate", (Panel("learning rate", ("learning_rate",), "sci"),)),
        Plot("throughput.png", "Throughput (average since training started)",
             (Panel("tokens / s", ("per_device_tps", "per_device_tps_including_padding", "trained_tokens_per_sec"),
                    "eng", from_zero=True),)),
        Plot("mfu.png", "Model FLOPs utilization (average since training started)",
             (Panel("MFU", ("mfu",), "percent", from_zero=True),
              Panel("TFLOP/s per device", ("tflops",), from_zero=True))),
        Plot("padding.png", "Padding and data-loader wait (average since training started)",
             (Panel("share", ("padding_fraction", "dataloader_wait_fraction"), "percent", from_zero=True),)),
        Plot("eval.png", "Evaluation", (Panel("bits per byte", ("eval_bits_per_byte",)),
                                        Panel("accuracy", tuple(accuracy_fields(rows)), "percent",
                                              "eval/<task>_accuracy"))),
        Plot("memory.png", "Peak memory", (Panel("GiB", ("peak_memory_gb",), from_zero=True),)),
    ]


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    if name.startswith("eval/") and name.endswith("_accuracy"):
        return name[len("eval/"):-len("_accuracy")]
    return name


def _ema(values: list[float], span: int) -> list[float]:
    alpha, out = 2 / (span + 1), []
    for value in values:
        out.append(value if not out else alpha * value + (1 - alpha) * out[-1])
    return out


def _draw_series(ax, rows: list[dict], name: str) -> bool:
    steps, values = series(rows, name)
    if not steps:
        return False
    sparse = name.startswith("eval") or len(steps) <= MANY_POINTS  # eval points are few and far between
    style = {"linewidth": 1.5}
    if sparse:
        style.update(marker="o", markersize=4 if name.startswith("eval") else 2.5)
    if name in DASHED:
        style["linestyle"] = "--"
    if name == "eval/centered_accuracy":
        style.update(color="black", linewidth=2.2, zorder=3)
    if name in SMOOTHED and len(steps) > 2 * MANY_POINTS:
        line, = ax.plot(steps, values, alpha=0.3, linewidth=0.8, label=f"{label(name)} (per step)")
        ax.plot(steps, _ema(values, max(5, len(steps) // 25)), color=line.get_color(), linewidth=1.8,
                label=f"{label(name)} (moving average)")
    else:
        line, = ax.plot(steps, values, label=label(name), **style)
        baseline = series(rows, baseline_field(name)) if baseline_field(name) else ([], [])
        if baseline[0]:  # constant per task: a dashed line across the steps evaluated, in the accuracy's colour
            ax.plot(baseline[0], baseline[1], color=line.get_color(), linestyle="--", linewidth=1.0,
                    label=f"{label(name)} majority baseline")
    return True


def _format_axis(ax, scale: str) -> None:
    from matplotlib import ticker

    if scale == "percent":
        ax.yaxis.set_major_formatter(ticker.PercentFormatter(xmax=1))
    elif scale == "sci":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    elif scale == "eng":
        ax.yaxis.set_major_formatter(ticker.EngFormatter(sep=" "))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def figure_for(plot: Plot, rows: list[dict]):
    """The figure of one plot with only the panels that have data, or None when none has (then it is skipped)."""
    from matplotlib.figure import Figure

    panels = [panel for panel in plot.panels if any(series(rows, name)[0] for name in panel.fields)]
    if not panels:
        return None
    fig = Figure(figsize=(FIGURE_WIDTH, PANEL_HEIGHT + 2.5 * (len(panels) - 1)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        for name in panel.fields:
            _draw_series(ax, rows, name)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.35)
        _format_axis(ax, panel.scale)
        if panel.from_zero:  # headroom above the highest point, or a flat line would hide under the frame
            ax.set_ylim(0, ax.dataLim.y1 * 1.1 if ax.dataLim.y1 > 0 else 1.0)
        outside = len(ax.get_legend_handles_labels()[1]) > 5  # (baselines count) a long legend would hide lines
        ax.legend(fontsize="small", **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if outside else {}))
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(plot.title)
    return fig


def plot_run(run: Run, out_dir: str | Path) -> list[Path]:
    """Writes a PNG per plot that has data into out_dir; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in plot_specs(run.rows):
        fig = figure_for(plot, run.rows)
        if fig is None:
            continue
        FigureCanvasAgg(fig)  # render with Agg, no pyplot: no display, no global figure state in the trainer
        fig.savefig(out / plot.name)
        written.append(out / plot.name)
    return written


# ----------------------------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {fmt(item)}" for key, item in value.items()) or "—"
    if isinstance(value, list):
        return " ".join(fmt(item) for item in value) or "—"
    return str(value)


def cell(value) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(cell(item) for item in row) + " |" for row in rows)]


def config_rows(config: dict, environment: dict) -> list[list]:
    """The settings that decide what a run is; run_config.yaml has every flag."""
    c = config.get
    items = c("dataset_mixer_list") if isinstance(c("dataset_mixer_list"), list) else []
    mixture = c("dataset_mixer_file") or _pairs(items) or None
    splits = c("dataset_mixer_list_splits")
    if c("global_batch_tokens") is not None:
        batch = f"{fmt(c('global_batch_tokens'))} tokens per step (--global_batch_tokens)"
    elif c("global_batch_size") is not None:
        batch = f"{fmt(c('global_batch_size'))} examples per step (--global_batch_size)"
    else:
        processes = environment.get("num_processes")
        batch = (f"{c('per_device_train_batch_size', '?')} per device x {c('gradient_accumulation_steps', '?')} "
                 + ("accumulation x the number of processes" if processes is None else
                    f"accumulation x {processes} process{'' if processes == 1 else 'es'}"))
        if all(_number(v) for v in (c("per_device_train_batch_size"), c("gradient_accumulation_steps"), processes)):
            batch += f" = {c('per_device_train_batch_size') * c('gradient_accumulation_steps') * processes} examples"
    schedule = [c("lr_scheduler_type"), f"warmup ratio {fmt(c('warmup_ratio'))}"]
    if c("lr_scheduler_type") in ("linear", "cosine", "wsd"):
        schedule.append(f"final LR ratio {fmt(c('final_lr_ratio'))}")
    if c("lr_scheduler_type") == "wsd":
        schedule.append(f"warmdown ratio {fmt(c('warmdown_ratio'))}")
    length = (f"{fmt(c('max_train_steps'))} steps (--max_train_steps)" if c("max_train_steps")
              else f"{fmt(c('num_train_epochs'))} epochs")
    model = f"{c('model_name_or_path')} @ {c('model_revision')}" if c("model_revision") else c("model_name_or_path")
    rows = [
        ["model", model], ["fine-tune", _fine_tune(config)],
        ["mixture", mixture], ["splits", splits],
        ["max_seq_length", f"{fmt(c('max_seq_length'))} (truncation: {fmt(c('truncation'))})"],
        ["global batch", batch],
        ["learning rate", c("learning_rate")], ["schedule", ", ".join(fmt(part) for part in schedule)],
        ["training length", length], ["loss_reduction", c("loss_reduction")],
        ["padding_free", c("padding_free")], ["seed", c("seed")],
    ]
    if c("max_tokens_per_micro_batch") is not None:
        rows.insert(6, ["max_tokens_per_micro_batch", c("max_tokens_per_micro_batch")])
    return rows


def _fine_tune(config: dict) -> str:
    """Full, or the LoRA settings (flags missing from an older run_config.yaml take their defaults)."""
    from types import SimpleNamespace

    from open_instruct.args import default_values, describe_fine_tune

    known = default_values()
    return describe_fine_tune(SimpleNamespace(**{**known, **{k: v for k, v in config.items() if k in known}}))


def _pairs(items: list) -> str:
    return ", ".join(f"{name} {amount}" for name, amount in zip(items[::2], items[1::2]))


STAT_COLUMNS = ("name", "split", "source_rows", "sampled_rows", "kept_rows", "tokens", "trained_tokens", "truncated",
                "dropped")


def mixture_rows(stats: list) -> list[list]:
    rows = [[entry.get(key) for key in STAT_COLUMNS] for entry in stats if isinstance(entry, dict)]
    if len(rows) > 1:
        total = [sum(entry.get(key) or 0 for entry in stats if isinstance(entry, dict) and _number(entry.get(key)))
                 for key in STAT_COLUMNS[2:7]]
        rows.append(["**total**", "", *total, "", ""])
    return rows


def eval_rows(rows: list[dict]) -> list[list]:
    """First and last logged value of each eval metric (the first is "before training" when step 0 was evaluated),
    and beside a task's accuracy its majority baseline (the last logged; "—" where none was logged)."""
    table_rows = []
    for name in eval_fields(rows):
        steps, values = series(rows, name)
        if not steps:
            continue
        baseline = series(rows, baseline_field(name))[1] if baseline_field(name) else []
        last_baseline = baseline[-1] if baseline else None
        first = f"{fmt(values[0])} (step {steps[0]})"
        if len(steps) == 1:
            table_rows.append([f"`{name}`", first, "—", "—", last_baseline])
        else:
            table_rows.append([f"`{name}`", first, f"{fmt(values[-1])} (step {steps[-1]})",
                               f"{values[-1] - values[0]:+.4g}", last_baseline])
    return table_rows


def plot_notes(run: Run, plots: list[Path]) -> list[str]:
    """Why each plot that is not in `plots` was skipped."""
    written, notes = {path.name for path in plots}, []
    for plot in plot_specs(run.rows):
        if plot.name in written:
            continue
        wanted = [f"`{name}`" for name in plot.fields] + [f"`{p.pattern}`" for p in plot.panels if p.pattern]
        fields = ", ".join(wanted)
        if any(series(run.rows, name)[0] for name in plot.fields):
            notes.append(f"{plot.name} was not written (see the log).")
        else:
            notes.append(f"{plot.name} skipped: no finite value of {fields} in metrics.jsonl.")
    return notes


def data_notes(run: Run) -> list[str]:
    notes = [] if run.rows else ["metrics.jsonl has no lines: nothing to plot."]
    names = dict.fromkeys(name for row in run.rows for name in row)
    for name in names:
        bad = non_finite_steps(run.rows, name)
        if bad:
            notes.append(f"`{name}` is NaN or infinite at {len(bad)} logged step(s) (first: step {bad[0]}); "
                         "those points are left out of the plots.")
    return notes


def write_report(run: Run, out_dir: str | Path, plots: list[Path]) -> Path:
    """report.md in out_dir: header, configuration, mixture, final metrics, eval first/last, plots, notes."""
    out = Path(out_dir)
    name = run.config.get("exp_name") or run.output_dir.resolve().name
    evals = eval_rows(run.rows)
    notes = run.notes + data_notes(run) + plot_notes(run, plots)
    lines = [f"# Run report: {name}", "", *_header(run),
             "", "## Configuration", "", *_config_section(run, out),
             "", "## Data mixture", "",
             *(table(list(STAT_COLUMNS), mixture_rows(run.stats)) if run.stats else ["No dataset_stats.json."]),
             "", "## Final metrics", "", *_final_metrics(run),
             "", "## Evaluation", "",
             *(table(["metric", "first", "last", "change", "majority baseline"], evals) if evals
               else ["No eval metrics in metrics.jsonl."]),
             "", "## Plots", "", *_plots_section(run, out, plots)]
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes)]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _relative(path: Path, start: Path) -> str:
    """Links relative to report.md, so the report folder can be moved or viewed anywhere along with the run."""
    return Path(os.path.relpath(path, start)).as_posix()


def _config_section(run: Run, out: Path) -> list[str]:
    if not run.config:
        return ["No run_config.yaml: the configuration is unknown."]
    return [*table(["setting", "value"], config_rows(run.config, run.environment)), "",
            f"Every flag of the run: [run_config.yaml]({_relative(run.output_dir / 'run_config.yaml', out)})."]


def _plots_section(run: Run, out: Path, plots: list[Path]) -> list[str]:
    by_name, lines = {path.name: path for path in plots}, []
    for plot in plot_specs(run.rows):
        if plot.name in by_name:
            lines += [f"### {plot.title}", "", f"![{plot.title}]({_relative(by_name[plot.name], out)})", ""]
    return lines or ["No plots: nothing in metrics.jsonl to draw (see the notes).", ""]


def _header(run: Run) -> list[str]:
    env, summary = run.environment, run.summary
    lines = [f"- **Model:** `{run.config.get('model_name_or_path', 'unknown')}`",
             f"- **Run directory:** `{run.output_dir.resolve()}`"]
    if "steps" in summary:
        seconds = summary.get("train_seconds")
        lines.append(f"- **Steps:** {fmt(summary['steps'])}"
                     + (f" in {fmt(seconds)} s" if _number(seconds) else "")
                     + (f" (resumed from `{summary['resumed_from']}`)" if summary.get("resumed_from") else ""))
    git = env.get("git") if isinstance(env.get("git"), dict) else {}
    if git.get("commit"):
        dirty = " with uncommitted changes" if git.get("uncommitted_changes") else ""
        lines.append(f"- **Code:** commit `{str(git['commit'])[:12]}`{dirty}")
    if "num_processes" in env:
        lines.append(f"- **Processes:** {fmt(env['num_processes'])}"
                     + (f" on {fmt(sorted(set(env['nodes'])))}" if isinstance(env.get("nodes"), list) else ""))
    return lines


def _final_metrics(run: Run) -> list[str]:
    if run.summary:
        return table(["metric", "value"], [[f"`{key}`", value] for key, value in run.summary.items()])
    if run.rows:  # a run that stopped early has no summary.json: its last logged line is the next best thing
        return ["No summary.json; the last line of metrics.jsonl:", "",
                *table(["metric", "value"], [[f"`{key}`", value] for key, value in run.rows[-1].items()])]
    return ["No summary.json and no metrics."]


# ----------------------------------------------------------------------------------------------------------------
# Building it atomically; entry points
# ----------------------------------------------------------------------------------------------------------------
def build_report(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """load + plot + write into a temporary sibling of the target folder, then swap it in. Returns report.md."""
    run = load_run(output_dir)
    target = Path(out) if out is not None else run.output_dir / "report"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the report is as readable as the run
        write_report(run, staging, plot_run(run, staging))
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / "report.md"


def _swap_in(staging: Path, target: Path) -> None:
    """Two renames on one filesystem: at no point does `target` hold a partial report (it may briefly not exist)."""
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def write_run_report(output_dir: str | Path) -> Path | None:
    """For the trainer, at the end of a finished run (main process): the report's path, or None after logging a
    warning. Never raises: a report that fails must not fail the training run that produced it."""
    try:
        path = build_report(output_dir)
    except Exception as exc:  # noqa: BLE001 - anything, including a missing matplotlib
        logger.warning("Run report not written for %s: %s: %s", output_dir, type(exc).__name__, exc)
        return None
    logger.info("Run report: %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m open_instruct.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a training run's --output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="folder for report.md and the PNGs (default: OUTPUT_DIR/report)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.output_dir, args.out)
    except (ReportError, OSError) as exc:  # a bad run directory or an unwritable --out
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plots = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"Wrote {path} with {len(plots)} plot(s): {', '.join(plots) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
