"""Run report: loading, series with gaps and NaN, PNGs, report.md, atomic replacement, the command, and one real run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from open_instruct import report
from open_instruct.report import ReportError, build_report, load_run, main, plot_run, series, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TRAIN_ROWS = [
    {"step": 1, "epoch": 0.25, "learning_rate": 1e-05, "train_loss": 3.2, "total_tokens": 400,
     "total_tokens_including_padding": 500, "trained_tokens": 120, "per_device_tps": 900.0,
     "per_device_tps_including_padding": 1100.0},
    {"step": 2, "epoch": 0.5, "learning_rate": 2e-05, "train_loss": 2.9, "total_tokens": 800,
     "total_tokens_including_padding": 1000, "trained_tokens": 250, "per_device_tps": 950.0,
     "per_device_tps_including_padding": 1150.0},
    {"step": 3, "epoch": 0.75, "learning_rate": 1.5e-05, "train_loss": 2.5, "total_tokens": 1200,
     "total_tokens_including_padding": 1500, "trained_tokens": 370, "per_device_tps": 980.0,
     "per_device_tps_including_padding": 1190.0},
    {"step": 4, "epoch": 1.0, "learning_rate": 1e-05, "train_loss": 2.2, "total_tokens": 1600,
     "total_tokens_including_padding": 2000, "trained_tokens": 500, "per_device_tps": 990.0,
     "per_device_tps_including_padding": 1200.0},
]
TELEMETRY = {"grad_norm": 1.5, "mfu": 0.31, "tflops": 96.0, "padding_fraction": 0.2, "trained_tokens_per_sec": 310.0,
             "dataloader_wait_fraction": 0.02, "peak_memory_gb": 12.5}
# evaluated before training (step 0) and at step 4 only: a series with a gap
EVAL_ROWS = [
    {"step": 0, "eval_loss": 3.5, "eval_bits_per_byte": 1.4, "eval/arc_accuracy": 0.3, "eval/gsm8k_accuracy": 0.1,
     "eval/arc_majority_baseline": 0.35, "eval/gsm8k_majority_baseline": 0.02, "eval/centered_accuracy": 0.05},
    {"step": 4, "eval_loss": 2.4, "eval_bits_per_byte": 1.0, "eval/arc_accuracy": 0.4, "eval/gsm8k_accuracy": 0.2,
     "eval/arc_majority_baseline": 0.35, "eval/gsm8k_majority_baseline": 0.02, "eval/centered_accuracy": 0.15},
]
SUMMARY = {"steps": 4, "resumed_from": None, "train_seconds": 2.5, "first_train_loss": 3.2, "last_train_loss": 2.2,
           "total_tokens": 1600, "trained_tokens": 500, "per_device_tps": 990.0}
STATS = [
    {"name": "synthetic:spelling", "split": "train", "format": "messages", "source_rows": 7151, "sampled_rows": 96,
     "kept_rows": 96, "tokens": 3400, "trained_tokens": 950, "truncated": {}, "dropped": {}},
    {"name": "data/chats.jsonl", "split": "train", "format": "messages", "source_rows": 40, "sampled_rows": 32,
     "kept_rows": 31, "tokens": 2100, "trained_tokens": 800, "truncated": {"whole_turns": 2},
     "dropped": {"no trained tokens": 1}},
]
RUN_CONFIG = """\
model_name_or_path: org/base-model
model_revision: null
dataset_mixer_list:
- synthetic:spelling
- '96'
- data/chats.jsonl
- '32'
dataset_mixer_list_splits:
- train
dataset_mixer_file: null
max_seq_length: 2048
truncation: whole_turns
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
global_batch_size: null
global_batch_tokens: null
max_tokens_per_micro_batch: null
loss_reduction: mean
learning_rate: 2.0e-05
lr_scheduler_type: linear
warmup_ratio: 0.03
final_lr_ratio: 0.0
num_train_epochs: 1
max_train_steps: 4
seed: 7
padding_free: true
exp_name: tiny-sft
"""
ENVIRONMENT = {"git": {"commit": "0123456789abcdef", "uncommitted_changes": True}, "num_processes": 2,
               "nodes": ["node1", "node1"]}
ALL_PLOTS = {"loss.png", "grad_norm.png", "learning_rate.png", "throughput.png", "mfu.png", "padding.png", "eval.png",
             "memory.png"}


def write_run(directory: Path, rows: list[dict], *, summary=SUMMARY, stats=STATS, config=RUN_CONFIG,
              environment=ENVIRONMENT) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, value in (("summary.json", summary), ("dataset_stats.json", stats), ("environment.json", environment)):
        if value is not None:
            (directory / name).write_text(json.dumps(value))
    if config is not None:
        (directory / "run_config.yaml").write_text(config)
    return directory


def full_rows() -> list[dict]:
    return [EVAL_ROWS[0], *({**row, **TELEMETRY} for row in TRAIN_ROWS), EVAL_ROWS[1]]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    """One report of a run that logged every field (rendering 8 PNGs takes a second)."""
    return build_report(write_run(tmp_path_factory.mktemp("full"), full_rows()))


def test_every_plot_is_a_real_png_of_the_intended_size(full_report):
    from matplotlib.image import imread

    pngs = {path.name: path for path in full_report.parent.glob("*.png")}
    assert set(pngs) == ALL_PLOTS
    for name, path in pngs.items():
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
        height, width = imread(path).shape[:2]
        assert width == 770, name  # 7 in x 110 dpi
        assert height == (440 if name not in ("mfu.png", "eval.png") else 715), name  # two panels: 6.5 in


def test_report_md_has_config_mixture_metrics_eval_and_links_every_png(full_report):
    text = full_report.read_text()
    assert text.startswith("# Run report: tiny-sft\n")
    assert "| model | org/base-model |" in text
    assert "| mixture | synthetic:spelling 96, data/chats.jsonl 32 |" in text
    assert "| global batch | 4 per device x 2 accumulation x 2 processes = 16 examples |" in text
    assert "| schedule | linear, warmup ratio 0.03, final LR ratio 0 |" in text
    assert "| training length | 4 steps (--max_train_steps) |" in text
    assert "| loss_reduction | mean |" in text and "| padding_free | true |" in text and "| seed | 7 |" in text
    assert "[run_config.yaml](../run_config.yaml)" in text
    assert "| synthetic:spelling | train | 7,151 | 96 | 96 | 3,400 | 950 | — | — |" in text
    assert "| data/chats.jsonl | train | 40 | 32 | 31 | 2,100 | 800 | whole_turns: 2 | no trained tokens: 1 |" in text
    assert "| **total** |  | 7,191 | 128 | 127 | 5,500 | 1,750 |  |  |" in text
    assert "| `last_train_loss` | 2.2 |" in text and "| `total_tokens` | 1,600 |" in text
    assert "| metric | first | last | change | majority baseline |" in text
    assert "| `eval_loss` | 3.5 (step 0) | 2.4 (step 4) | -1.1 | — |" in text
    assert "| `eval/arc_accuracy` | 0.3 (step 0) | 0.4 (step 4) | +0.1 | 0.35 |" in text
    assert "| `eval/gsm8k_accuracy` | 0.1 (step 0) | 0.2 (step 4) | +0.1 | 0.02 |" in text
    assert "| `eval/centered_accuracy` | 0.05 (step 0) | 0.15 (step 4) | +0.1 | — |" in text
    assert "`eval/arc_majority_baseline` |" not in text  # a column, not rows of its own
    assert "commit `0123456789ab` with uncommitted changes" in text and "2 on node1" in text
    for name in ALL_PLOTS:
        assert f"]({name})" in text, name
    assert "## Notes" not in text  # nothing was missing


def test_absent_fields_skip_their_plots_with_a_note(tmp_path):
    out = build_report(write_run(tmp_path / "run", TRAIN_ROWS))
    assert {path.name for path in out.parent.glob("*.png")} == {"loss.png", "learning_rate.png", "throughput.png"}
    text = out.read_text()
    assert "- mfu.png skipped: no finite value of `mfu`, `tflops` in metrics.jsonl." in text
    assert "- padding.png skipped: no finite value of `padding_fraction`, `dataloader_wait_fraction`" in text
    assert "- memory.png skipped: no finite value of `peak_memory_gb`" in text
    assert "- grad_norm.png skipped" in text
    assert "- eval.png skipped: no finite value of `eval_bits_per_byte`, `eval/<task>_accuracy`" in text
    assert "No eval metrics in metrics.jsonl." in text
    assert "](mfu.png)" not in text


def test_eval_series_with_gaps_are_plotted_only_where_they_exist():
    rows = full_rows()
    assert series(rows, "eval_loss") == ([0, 4], [3.5, 2.4])
    assert series(rows, "train_loss") == ([1, 2, 3, 4], [3.2, 2.9, 2.5, 2.2])
    plots = {plot.name: plot for plot in report.plot_specs(rows)}
    loss = report.figure_for(plots["loss.png"], rows)
    lines = {line.get_label(): list(line.get_xdata()) for line in loss.axes[0].get_lines()}
    assert lines == {"train": [1, 2, 3, 4], "eval": [0, 4]}
    accuracy_axes = report.figure_for(plots["eval.png"], rows).axes[1]
    drawn = {line.get_label(): line for line in accuracy_axes.get_lines()}
    assert {name: list(line.get_xdata()) for name, line in drawn.items()} == {
        "arc": [0, 4], "arc majority baseline": [0, 4], "gsm8k": [0, 4], "gsm8k majority baseline": [0, 4],
        "centered accuracy": [0, 4]}
    for task, baseline in (("arc", 0.35), ("gsm8k", 0.02)):  # dashed, in the task's colour, at its baseline
        line = drawn[f"{task} majority baseline"]
        assert line.get_linestyle() == "--" and line.get_color() == drawn[task].get_color()
        assert list(line.get_ydata()) == [baseline, baseline]


def test_nan_and_non_numbers_are_left_out_and_noted(tmp_path):
    rows = [{**TRAIN_ROWS[0]}, {**TRAIN_ROWS[1], "train_loss": float("nan")}, {**TRAIN_ROWS[2], "train_loss": None},
            {**TRAIN_ROWS[3], "train_loss": float("inf"), "mfu": float("nan")}]
    assert series(rows, "train_loss") == ([1], [3.2])
    out = build_report(write_run(tmp_path / "run", rows))
    text = out.read_text()
    assert "`train_loss` is NaN or infinite at 2 logged step(s) (first: step 2)" in text
    assert "`mfu` is NaN or infinite at 1 logged step(s)" in text and "- mfu.png skipped" in text
    assert (out.parent / "loss.png").read_bytes().startswith(PNG_SIGNATURE)


def test_an_empty_metrics_file_and_missing_optional_files_still_give_a_report(tmp_path):
    out = build_report(write_run(tmp_path / "run", [], summary=None, stats=None, config=None, environment=None))
    text = out.read_text()
    assert list(out.parent.glob("*.png")) == []
    for note in ("`summary.json` is missing.", "`dataset_stats.json` is missing.", "`run_config.yaml` is missing.",
                 "metrics.jsonl has no lines: nothing to plot.", "- loss.png skipped"):
        assert note in text, note
    assert text.startswith("# Run report: run\n")


def test_an_unreadable_optional_file_is_a_note_not_an_error(tmp_path):
    run_dir = write_run(tmp_path / "run", TRAIN_ROWS)
    (run_dir / "summary.json").write_text("{not json")
    (run_dir / "dataset_stats.json").write_text('{"a": 1}')
    text = build_report(run_dir).read_text()
    assert "`summary.json` could not be read:" in text
    assert "`dataset_stats.json` does not hold a JSON list; ignored." in text
    assert "No summary.json; the last line of metrics.jsonl:" in text and "| `train_loss` | 2.2 |" in text


def test_a_malformed_metrics_line_is_an_error_naming_file_and_line(tmp_path):
    run_dir = write_run(tmp_path / "run", TRAIN_ROWS[:2])
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "train_loss": \n')
    with pytest.raises(ReportError, match=r"metrics\.jsonl: line 3 is not valid JSON"):
        load_run(run_dir)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ReportError, match=r"metrics\.jsonl: line 2 is not a JSON object"):
        load_run(run_dir)


def test_a_line_still_being_written_is_left_out_with_a_note(tmp_path):
    """A running trainer's last record may be half-written (no newline yet): the report uses the rest."""
    run_dir = write_run(tmp_path / "run", TRAIN_ROWS[:2])
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "train_lo')
    run = load_run(run_dir)
    assert [row["step"] for row in run.rows] == [row["step"] for row in TRAIN_ROWS[:2]]
    assert any("unfinished last line (line 3" in note for note in run.notes)


def test_a_directory_without_metrics_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ReportError, match="has no metrics.jsonl"):
        load_run(tmp_path)
    with pytest.raises(ReportError, match="is not a directory"):
        load_run(tmp_path / "missing")


def test_the_command_writes_where_it_says_and_exits_2_on_a_bad_directory(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", TRAIN_ROWS)
    assert main([str(run_dir), "--out", str(tmp_path / "elsewhere")]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'elsewhere' / 'report.md'} with 3 plot(s)" in printed
    assert "[run_config.yaml](../run/run_config.yaml)" in (tmp_path / "elsewhere" / "report.md").read_text()
    assert main([str(tmp_path / "nothing-here")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "nothing-here is not a directory" in error


def test_a_failed_rebuild_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path / "run", TRAIN_ROWS)
    first = build_report(run_dir).read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_report", crash)
    with pytest.raises(RuntimeError):
        build_report(run_dir)
    assert (run_dir / "report" / "report.md").read_text() == first
    assert len(list((run_dir / "report").glob("*.png"))) == 3
    assert [path.name for path in run_dir.iterdir() if path.name.startswith(".")] == []  # no staging folder left


def test_rebuilding_replaces_the_old_report(tmp_path):
    run_dir = write_run(tmp_path / "run", TRAIN_ROWS)
    build_report(run_dir)
    (run_dir / "report" / "stale.png").write_bytes(b"old")
    write_run(run_dir, full_rows())
    build_report(run_dir)
    assert {path.name for path in (run_dir / "report").glob("*.png")} == ALL_PLOTS


def test_write_run_report_never_raises(tmp_path, monkeypatch, caplog):
    assert report.write_run_report(tmp_path / "missing") is None
    assert "Run report not written" in caplog.text
    run_dir = write_run(tmp_path / "run", TRAIN_ROWS)
    monkeypatch.setattr(report, "plot_run", lambda *args: 1 / 0)
    assert report.write_run_report(run_dir) is None
    monkeypatch.undo()
    assert report.write_run_report(run_dir) == run_dir / "report" / "report.md"


def test_plot_and_write_work_on_any_folder(tmp_path):
    run = load_run(write_run(tmp_path / "run", full_rows()))
    plots = plot_run(run, tmp_path / "out")
    path = write_report(run, tmp_path / "out", plots)
    assert {plot.name for plot in plots} == ALL_PLOTS and path == tmp_path / "out" / "report.md"


@pytest.mark.integration
def test_a_real_run_gets_a_report(tiny_model_dir, tmp_path):
    from conftest import finetune, run
    from test_train import base_args

    output = tmp_path / "run"
    finetune(base_args(tiny_model_dir, output, 4, "--logging_steps", "1"))
    result = run([sys.executable, "-m", "open_instruct.report", str(output)])
    assert "report.md" in result.stdout
    for name in ("loss.png", "learning_rate.png", "throughput.png"):
        assert (output / "report" / name).read_bytes().startswith(PNG_SIGNATURE), name
    text = (output / "report" / "report.md").read_text()
    assert "| synthetic:spelling | train |" in text and "| seed | 1 |" in text


def test_config_rows_name_the_batch_definition_and_tolerate_missing_flags():
    rows = dict((key, report.cell(value)) for key, value in report.config_rows(
        {"global_batch_tokens": 65536, "num_train_epochs": 2, "lr_scheduler_type": "wsd", "warmup_ratio": 0.1,
         "final_lr_ratio": 0.1, "warmdown_ratio": 0.2, "max_tokens_per_micro_batch": 8192}, {}))
    assert rows["global batch"] == "65,536 tokens per step (--global_batch_tokens)"
    assert rows["schedule"] == "wsd, warmup ratio 0.1, final LR ratio 0.1, warmdown ratio 0.2"
    assert rows["training length"] == "2 epochs" and rows["max_tokens_per_micro_batch"] == "8,192"
    assert rows["model"] == "—" and rows["mixture"] == "—" and rows["fine-tune"] == "full (every weight)"
    lora = dict(report.config_rows({"use_lora": True, "lora_rank": 8, "lora_target_modules": ["q_proj"]}, {}))
    assert lora["fine-tune"] == "LoRA, rank 8, alpha 16, dropout 0.1, on q_proj"
    per_device = dict(report.config_rows({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4}, {}))
    assert per_device["global batch"] == "8 per device x 4 accumulation x the number of processes"
