"""benchmarks/gpu_check.py: the one command a short GPU loan runs. Its CPU dry run goes end to end here, so the script
is never found broken when a GPU appears; the pieces that decide what runs and what is reported are unit-tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402
from benchmarks.gpu_throughput import Row  # noqa: E402


def test_row_spelling_and_its_errors():
    row = Row.parse("zero3+liger+compile@8192")
    assert (row.base, row.levers, row.row_tokens, row.deepspeed) == ("zero3", {"liger", "compile"}, 8192, True)
    for bad in ("zero3+turbo@8192", "ddp@8192", "single+liger", "single@100", "zero3+flce@8192"):
        with pytest.raises(ValueError):
            Row.parse(bad)


def test_every_matrix_row_parses_and_the_matrix_fits_the_issue():
    rows = [Row.parse(spec) for spec in gpu_check.MATRIX]
    assert len(rows) <= 12 and len(set(gpu_check.MATRIX)) == len(rows)
    assert {r.row_tokens for r in rows} >= {4096, 8192, 16384}
    best = rows[0]
    # each lever is switched off (or changed) from the first row by some row
    changes = {gpu_check.lever_changes(best, other) for other in rows[1:]}
    for change in ("compile off", "liger off", "single instead of zero3", "rows of 8192", "rows of 4096", "gc on"):
        assert any(c and change in c for c in changes), change


def test_lever_changes_names_one_or_two_changes_only():
    best = Row.parse("zero3+liger+compile@16384")
    assert gpu_check.lever_changes(best, Row.parse("zero3+liger@16384")) == "compile off"
    assert gpu_check.lever_changes(best, Row.parse("zero3+liger+compile+gc@16384")) == "gc on"
    assert gpu_check.lever_changes(best, Row.parse("single+flce+compile@16384")) is None  # three changes
    assert gpu_check.lever_changes(best, Row.parse("single+liger+compile@8192")) == \
        "single instead of zero3, rows of 8192"


def test_rows_past_the_budget_are_listed_as_not_run_and_missing_needs_as_skipped(tmp_path):
    cli = gpu_check.parse_cli(["--dry_run", "--out", str(tmp_path)])
    log = open(tmp_path / "log", "w")
    records = gpu_check.run_rows(["single+qlora@4096", "single@4096"], tmp_path, cli, gpu_check.Budget(0), {}, log)
    assert records[0] == {"row": "single+qlora@4096", "error": "skipped: needs CUDA"}
    assert records[1] == {"row": "single@4096", "error": "not run: the budget was spent"}


def test_summary_compares_each_row_with_the_first_measured_one():
    records = [{"row": "zero3+liger+compile@16384", "error": "exit 1"},
               {"row": "zero3+liger@16384", "tokens_per_s": 1000.0, "mfu": 0.4, "peak_gb": 50.0, "plan_error_pct": 5.0,
                "host_syncs": 3},
               {"row": "zero3@16384", "tokens_per_s": 800.0, "plan_error_pct": -10.0},
               {"row": "single+liger@16384", "tokens_per_s": 500.0},
               {"row": "single+flce@16384", "tokens_per_s": 600.0}]
    tests = {"status": "passed", "counts": {"passed": 7}, "seconds": 30}
    lines = gpu_check.summary_lines({"device": "NVIDIA H200", "torch": "2.11"}, tests, records)
    text = "\n".join(lines)
    assert "fastest: zero3+liger@16384 1,000 tokens/s, MFU 40.0%, peak 50.0 GB" in text
    assert "liger off" in text and "0.80x tokens/s of zero3+liger@16384" in text
    assert "liger off, flce on" in text and "1.20x tokens/s of single+liger@16384" in text  # its nearest earlier row
    assert "memory plan vs measured peak: -10% to +5%" in text
    assert "not measured: zero3+liger+compile@16384 (exit 1)" in text


@pytest.mark.integration
def test_dry_run_goes_end_to_end_on_cpu_and_writes_its_results(tmp_path):
    """`make gpu-check DRY_RUN=1`'s command: every matrix row either measured on CPU with the tiny model or skipped
    for a named reason (CUDA-only kernels), the gpu tests collected and skipped, the JSON and the markdown written."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry_run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert [r["row"] for r in result["rows"]] == list(gpu_check.MATRIX)
    for record in result["rows"]:
        needs_cuda = bool(Row.parse(record["row"]).levers & {"flce", "qlora"})
        if needs_cuda:
            assert record["error"] == "skipped: needs CUDA"
        else:
            assert record["tokens_per_s"] > 0 and record["plan_gb"] > 0, record
    assert result["tests"]["status"] == "passed" and result["tests"]["counts"].get("skipped", 0) >= 1
    markdown = (out / "gpu_check.md").read_text()
    assert "| row | tokens/s |" in markdown and "zero3+liger+compile@16384" in markdown
    assert "fastest:" in done.stdout and "gpu_check.md" in done.stdout


def test_measured_rows_become_throughput_table_rows_keyed_as_the_time_plan_reads_them():
    from open_instruct.time_plan import nearest_measured

    environment = {"device": "NVIDIA H200", "date": "2026-12-02", "torch": "2.11"}
    records = [{"row": "zero3+liger@16384", "mfu": 0.40, "tokens_per_s": 50000.0, "params": 1_235_814_400},
               {"row": "zero3+liger@8192", "mfu": 0.42, "tokens_per_s": 52000.0, "params": 1_235_814_400},
               {"row": "single@8192", "error": "exit 1"}]
    rows = gpu_check.table_rows(environment, records)
    assert [(r["gpu"], r["config"], r["mfu"]) for r in rows] == [("H200", "zero3+liger", 0.42)]  # the best budget
    assert nearest_measured(rows, "H200", "zero3+liger", 1_500_000_000)["mfu"] == 0.42
    assert gpu_check.table_rows({**environment, "device": "CPU (x86_64, dry run)"}, records) == []
