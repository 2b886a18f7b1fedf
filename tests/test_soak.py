"""benchmarks/soak.py: its pure parts on literal inputs, and a short soak of the real trainer end to end."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO, run

SCRIPT = REPO / "benchmarks" / "soak.py"
spec = importlib.util.spec_from_file_location("soak", SCRIPT)
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)

STATUS = "Name:\tpython\nVmPeak:\t  900000 kB\nVmRSS:\t  655360 kB\nThreads:\t5\n"
STAT = "4242 (py thon) (x)) R 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 5 0 100 0 0\n"


def test_rss_mib_reads_vmrss_in_mib():
    assert soak.rss_mib(STATUS) == 640.0
    assert soak.rss_mib("Name:\tpython\nState:\tZ (zombie)\n") is None


def test_cpu_seconds_counts_fields_after_the_command_name():
    assert soak.cpu_seconds(STAT, 100) == 3.0  # utime 250 + stime 50 ticks, despite ") " inside the name


def test_newest_step_skips_a_half_written_last_line_and_a_cut_first_line():
    tail = 'ss": 1.0}\n{"step": 50, "train_loss": 2.0}\n{"step": 100, "eval_loss": 1.5}\n{"step": 15'
    assert soak.newest_step(tail) == 100
    assert soak.newest_step('{"step": 50}\n{"step": 100, "train_l') == 50
    assert soak.newest_step('{"step": 5') is None
    assert soak.newest_step("") is None


def test_event_marks_are_the_logged_steps_before_each_checkpoint_and_evaluation():
    # checkpoints after 100 and 200, evaluations before training (0), after 150 (logged last at 140) and the end (230)
    assert soak.event_marks(230, 100, 150, 20) == {0, 100, 140, 200, 230}


def test_is_quiet():
    assert soak.is_quiet(60, {0, 100})
    assert not soak.is_quiet(100, {0, 100})
    assert not soak.is_quiet(None, {0, 100})


def sample(seconds: float, step: int | None, cpu: float = 0.0) -> dict:
    return {"seconds": seconds, "step": step, "cpu_seconds": cpu, "rss_mib": 600.0, "fds": 4, "threads": 5,
            "load_1m": 2.0}


def test_step_windows_run_between_first_sightings_and_leave_out_events():
    samples = [sample(0, None), sample(1, 0), sample(2, 50, 1.0), sample(3, 50, 2.0), sample(4, 100, 3.0),
               sample(6, 200, 7.0)]
    windows = soak.step_windows(samples, marks={0, 200})
    assert windows == [
        {"first_step": 0, "last_step": 50, "seconds": 1, "ms_per_step": 20.0, "cpu_ms_per_step": 20.0, "quiet": False},
        {"first_step": 50, "last_step": 100, "seconds": 2, "ms_per_step": 40.0, "cpu_ms_per_step": 40.0, "quiet": True},
        {"first_step": 100, "last_step": 200, "seconds": 2, "ms_per_step": 20.0, "cpu_ms_per_step": 40.0,
         "quiet": False},
    ]


def test_fit_line_is_least_squares():
    slope, intercept = soak.fit_line([0, 1, 2, 3], [1, 3, 5, 7.4])
    assert slope == pytest.approx(2.12)
    assert intercept == pytest.approx(0.92)
    assert soak.fit_line([5], [1]) is None
    assert soak.fit_line([5, 5], [1, 2]) is None


def test_edge_medians():
    assert soak.edge_medians([9, 1, 2, 3, 4, 5, 6, 7, 8, 0], count=3) == (2, 7)
    assert soak.edge_medians([1, 2, 3, 4], count=4) == (2.5, 2.5)


def test_trend_flags_growth_over_the_run_above_the_limit():
    flat = soak.trend([(1000, 600.0), (2000, 601.0), (3000, 600.0), (4000, 601.0)], 20000, 0.05, 50.0)
    assert flat["leak"] is False and flat["limit"] == 50.0
    # 10 MiB per 1,000 steps: 200 MiB over 20,000 steps, above 5% of ~600 MiB and above 50 MiB
    leaking = soak.trend([(1000, 600.0), (2000, 610.0), (3000, 620.0), (4000, 630.0)], 20000, 0.05, 50.0)
    assert leaking["slope_per_1000_steps"] == pytest.approx(10.0)
    assert leaking["growth_over_run"] == pytest.approx(200.0)
    assert leaking["leak"] is True
    assert soak.trend([(1000, 600.0)], 20000, 0.05)["leak"] is None
    # step time: 10% of the start (median of the first five, 100 ms), no floor
    slower = soak.trend([(step, 100.0 + step / 1000) for step in range(1000, 9000, 1000)], 20000, 0.10)
    assert slower["start"] == 103.0 and slower["limit"] == pytest.approx(10.3)
    assert slower["growth_over_run"] == pytest.approx(20.0) and slower["leak"] is True


def test_count_trend_flags_a_count_that_ends_higher():
    samples = [dict(sample(i, 100 * i), fds=fds) for i, fds in enumerate([4, 6, 4, 4])]
    assert soak.count_trend(samples, "fds") == {"after_warmup": 4, "end": 4, "max": 6, "leak": False}
    assert soak.count_trend(samples + [dict(sample(9, 900), fds=5)], "fds")["leak"] is True
    assert soak.count_trend([], "fds")["leak"] is None


def test_summarize_fits_after_the_warm_up_and_leaves_out_events():
    # logged every 10 steps, seen once each, 0.5 s apart; checkpoints every 100, evaluations every 200, warm-up 200
    samples = [dict(sample(step / 20, step, cpu=step / 10), rss_mib=600.0 + step / 10, threads=6 if step == 390 else 5)
               for step in range(0, 410, 10)]
    marks = soak.event_marks(400, 100, 200, 10)
    summary = soak.summarize(samples, soak.step_windows(samples, marks), marks, warmup=200, steps=400)
    step_time = summary["step_time_ms"]
    assert (step_time["points"], step_time["windows_left_out"], step_time["windows_in_warmup"]) == (16, 8, 16)
    assert step_time["slope_per_1000_steps"] == pytest.approx(0.0, abs=1e-9) and step_time["start"] == 50.0
    assert summary["cpu_time_ms"]["start"] == 100.0
    rss = summary["rss_mib"]
    assert rss["points"] == 18 and rss["slope_per_1000_steps"] == pytest.approx(100.0) and rss["leak"] is False
    assert rss["max_any_sample"] == 640.0  # 40 MiB over 400 steps: under the 50 MiB floor
    assert summary["threads"] == {"after_warmup": 5, "end": 6, "max": 6, "leak": True, "max_any_sample": 6}
    assert summary["load_average"] == {"start": 2.0, "max": 2.0, "end": 2.0}


def test_prepare_work_dir_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("data")
    with pytest.raises(SystemExit):
        soak.prepare_work_dir(tmp_path)
    assert (tmp_path / "precious.txt").exists()


@pytest.mark.integration
def test_short_soak_runs_the_trainer_and_writes_its_figures(tmp_path):
    work = tmp_path / "soak"
    result = run([sys.executable, str(SCRIPT), "--steps", "300", "--checkpoint_every", "100", "--eval_every", "150",
                  "--sample_seconds", "0.5", "--work_dir", str(work)])
    report = json.loads((work / "soak.json").read_text())
    summary = report["summary"]
    assert summary["exit_code"] == 0 and summary["steps_done"] == 300
    logged = [s for s in report["samples"] if s["step"] is not None]  # the very first sample may precede the exec
    assert logged and all(s["rss_mib"] > 0 and s["threads"] > 0 for s in logged)
    assert summary["step_time_ms"]["windows_left_out"] > 0  # checkpoints at 100, 200, 300; evaluations at 0, 150, 300
    for key in ("rss_mib", "step_time_ms", "cpu_time_ms"):
        assert summary[key]["slope_per_1000_steps"] is not None, key
    for key in ("fds", "threads"):
        assert summary[key]["after_warmup"] > 0, key
    assert {"rss.png", "step_time.png", "fds_threads.png"} <= {p.name for p in work.iterdir()}
    assert "command: " in result.stdout and "--steps 300" in result.stdout
    assert len(list((work / "run" / "checkpoints").glob("step_*"))) <= 2  # --keep_last_n_checkpoints 2
