"""Stopping cleanly (open_instruct/preemption.py): a signal, the wall-clock budget or a dead launcher ends the run
between two optimizer steps with a checkpoint, exit status 75, and the same command continues the exact run.

The runs go through tests/fault_injection.py with FAULT=slow_steps, so that a test can signal a run mid-way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, clean_env, finetune, run, train_args, with_cache_dir
from open_instruct.checkpointing import complete_checkpoints
from open_instruct.preemption import (
    EXIT_SECONDS,
    STOPPED_EXIT_CODE,
    RunStopped,
    StopRequests,
    parse_duration,
    parse_slurm_time_left,
    slurm_deadline,
    stop_run,
)
from test_checkpointing import ZERO3, assert_steps_match, step_metrics

pytestmark = pytest.mark.faults
LAUNCHER = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--use_deepspeed",
            "--deepspeed_config_file", str(REPO / ZERO3)]


# ----------------------------------------------------------------------------------------------------------------
# Unit: durations, the deadline, the reserve
# ----------------------------------------------------------------------------------------------------------------
def test_durations_need_a_unit_or_a_clock_form():
    assert parse_duration("90s") == 90 and parse_duration("45m") == 2700 and parse_duration("4h") == 14400
    assert parse_duration("2d") == 172800 and parse_duration("0.5h") == 1800
    assert parse_duration("23:30:00") == 84600 and parse_duration("1-12:00:00") == 129600
    for bad in ("30", "4 hours", "1:30", ""):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_slurm_time_left_forms():
    assert parse_slurm_time_left("59:30") == 3570
    assert parse_slurm_time_left("1:00:00") == 3600
    assert parse_slurm_time_left("2-00:00:10") == 172810
    assert parse_slurm_time_left("UNLIMITED") is None and parse_slurm_time_left("NOT_SET") is None


def test_the_slurm_deadline_comes_from_the_environment_or_squeue(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_deadline(1000.0) is None  # not a Slurm job
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_END_TIME", "5000")
    assert slurm_deadline(1000.0) == 5000.0
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    squeue = tmp_path / "squeue"  # Slurm 22.05 exports no end time: squeue -o %L says how long is left
    squeue.write_text('#!/bin/sh\n[ "$3" = 42 ] && [ "$5" = %L ] && echo "1:00:00"\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm_deadline(1000.0) == 4600.0


def test_the_budget_keeps_two_slow_steps_a_save_and_the_exit_in_hand():
    stops = StopRequests([], max_wall_seconds=100.0, started=0.0, launched_by_agent=False, ask_slurm=False)
    stops.expect_checkpoint_bytes(int(2e9))  # 10 s at the assumed 200 MB/s before a save was timed
    assert stops.reserve_seconds() == pytest.approx(10 + EXIT_SECONDS)
    stops.note_step(3.0)
    stops.note_step(2.0)  # the slowest step counts
    stops.note_save(4.0)  # a timed save replaces the estimate
    assert stops.reserve_seconds() == pytest.approx(2 * 3.0 + 4.0 + EXIT_SECONDS)
    assert stops.local_reason(now=100.0 - 20.0 - 0.1) is None
    reason = stops.local_reason(now=100.0 - 19.0)
    assert reason.startswith("stopped 19 s before --max_wall_time (keeping 20 s")


def test_a_recorded_signal_and_a_lost_parent_are_reasons_to_stop(monkeypatch):
    stops = StopRequests([], launched_by_agent=True, ask_slurm=False)
    assert stops.local_reason() is None
    stops.signal_name = "SIGUSR1"
    assert stops.local_reason() == "stopped by SIGUSR1"
    monkeypatch.setattr(os, "getppid", lambda: 1)  # reparented: the launcher died
    assert stops.local_reason() == f"stopped because the launcher (pid {stops.parent}) is gone"


class FakeCheckpointer:
    """What stop_run needs of a Checkpointer: the last save, a save, the uploader, the accelerator."""

    def __init__(self, last_saved_step: int, last_saved: Path | None):
        self.last_saved_step, self.last_saved, self.saves, self.uploader = last_saved_step, last_saved, [], None
        self.accelerator = SimpleNamespace(trackers=[])

    def save(self, steps_done, first_loss, counters):
        self.saves.append(steps_done)
        return Path(f"/out/checkpoints/step_{steps_done}")


def test_a_stop_saves_only_what_no_checkpoint_holds_yet():
    fresh = FakeCheckpointer(0, None)
    with pytest.raises(RunStopped, match="^stopped by SIGTERM at step 0 of 9; nothing was trained yet, so nothing was "
                                         "saved; rerun the same command to continue.$"):
        stop_run("stopped by SIGTERM", 0, 9, fresh, None, None)
    resumed = FakeCheckpointer(4, Path("/elsewhere/step_4"))  # stopped right after resuming: that checkpoint is it
    with pytest.raises(RunStopped, match="at step 4 of 9; checkpoint /elsewhere/step_4;"):
        stop_run("stopped by SIGTERM", 4, 9, resumed, 1.0, None)
    assert fresh.saves == resumed.saves == []
    with pytest.raises(RunStopped, match="at step 6 of 9; checkpoint /out/checkpoints/step_6;") as stopped:
        stop_run("stopped by SIGTERM", 6, 9, resumed, 1.0, None)
    assert resumed.saves == [6] and stopped.value.exit_code == STOPPED_EXIT_CODE == 75


# ----------------------------------------------------------------------------------------------------------------
# Integration: one process
# ----------------------------------------------------------------------------------------------------------------
def start(args: list[str], seconds: float, launcher: list[str] | None = None, log: Path | None = None,
          **env) -> subprocess.Popen:
    """The trainer with every step `seconds` slower, in its own process group; output to `log`."""
    env = clean_env(FAULT="slow_steps", FAULT_SECONDS=str(seconds), **env)
    handle = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed by the child's exit)
    return subprocess.Popen([*(launcher or [sys.executable]), str(REPO / "tests" / "fault_injection.py"),
                             *with_cache_dir(args)], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def wait_for_step(output: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    metrics, deadline = output / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if line.endswith("}")) >= step:
            return
        assert process.poll() is None, f"the run ended ({process.returncode}) before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(process.pid).children(recursive=True):  # workers of a launcher too
            child.kill()
        process.kill()
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()[-4000:]}") from None
    return log.read_text()


def stopped_step(output: str, reason: str, total: int) -> int:
    match = re.search(rf"{re.escape(reason)} at step (\d+) of {total}; checkpoint (\S+); rerun the same command to "
                      r"continue\.", output)
    assert match, output[-3000:]
    return int(match.group(1))


@pytest.mark.integration
@pytest.mark.parametrize("sig, rerun", [("SIGTERM", True), ("SIGUSR1", False), ("SIGINT", False)])
def test_a_signal_stops_the_run_with_a_checkpoint_and_the_rerun_is_the_straight_run(tiny_model_dir, tmp_path, request,
                                                                                      sig, rerun):
    out, log = tmp_path / "run", tmp_path / "log"
    args = train_args(tiny_model_dir, out)  # no --checkpointing_steps: the stop saves one anyway
    process = start(args, 0.4, log=log)
    wait_for_step(out, 2, process)
    process.send_signal(getattr(signal, sig))
    output = finish(process, log)
    assert process.returncode == STOPPED_EXIT_CODE, output[-3000:]
    assert f"{sig} received: stopping after the current optimizer step" in output
    step = stopped_step(output, f"stopped by {sig}", 6)
    assert 2 <= step < 6 and [p.name for p in complete_checkpoints(out)] == [f"step_{step}"]
    assert not (out / "run.lock").exists() and not (out / "model.safetensors").exists()
    if not rerun:  # how a stopped run continues does not depend on the signal: one rerun is enough
        return
    straight = request.getfixturevalue("straight_run")
    finetune(args)  # the same command continues the run
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith(f"step_{step}")
    assert step_metrics(out) == step_metrics(straight)  # bitwise
    resumed, reference = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)


@pytest.mark.integration
def test_a_second_sigint_aborts_at_once_without_a_checkpoint(tiny_model_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    process = start(train_args(tiny_model_dir, out), 3.0, log=log)  # a step takes 3 s: the stop is still pending
    wait_for_step(out, 1, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output = finish(process, log, timeout=20)
    assert process.returncode == 130, output[-3000:]
    assert "SIGINT again: aborting now, without a checkpoint." in output
    assert complete_checkpoints(out) == []


@pytest.mark.integration
def test_stop_signals_chooses_which_signals_stop_cleanly(tiny_model_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    process = start(train_args(tiny_model_dir, out, "--stop_signals", "SIGUSR1"), 0.4, log=log)
    wait_for_step(out, 1, process)
    process.send_signal(signal.SIGTERM)  # not in --stop_signals: Python's default, an immediate end
    finish(process, log, timeout=30)
    assert process.returncode == -signal.SIGTERM and complete_checkpoints(out) == []


@pytest.mark.integration
def test_the_wall_clock_budget_saves_and_stops_before_it_runs_out(tiny_model_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    budget = 40.0
    process = start(train_args(tiny_model_dir, out, "--max_wall_time", f"{budget:.0f}s", "--max_train_steps", "500"),
                    0.5, log=log)
    started = time.time()
    output = finish(process, log, timeout=120)
    assert process.returncode == STOPPED_EXIT_CODE, output[-3000:]
    assert time.time() - started < budget
    match = re.search(r"stopped (\d+) s before --max_wall_time \(keeping (\d+) s to save and exit\) at step (\d+) of "
                      r"500; checkpoint", output)
    assert match, output[-3000:]
    step = int(match.group(3))
    assert step >= 1 and [p.name for p in complete_checkpoints(out)] == [f"step_{step}"]


# ----------------------------------------------------------------------------------------------------------------
# Integration: two processes under ZeRO-3 (accelerate launch)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero3_straight_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_straight")
    run([*LAUNCHER, "-m", "open_instruct.finetune", *with_cache_dir(train_args(tiny_model_dir, out))])
    return out


def workers_of(launcher: subprocess.Popen, count: int = 2, timeout: float = 120) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = [c for c in psutil.Process(launcher.pid).children() if "fault_injection.py" in " ".join(c.cmdline())]
        if len(children) == count:
            return sorted(children, key=lambda c: int(c.environ().get("RANK", "0")))
        time.sleep(0.2)
    raise AssertionError("the launcher did not start its workers")


@pytest.mark.multiprocess
def test_zero3_sigterm_to_the_launcher_stops_both_ranks_and_the_rerun_matches(tiny_model_dir, tmp_path,
                                                                              zero3_straight_run):
    out, log = tmp_path / "run", tmp_path / "log"
    args = train_args(tiny_model_dir, out)
    process = start(args, 0.4, launcher=LAUNCHER, log=log)
    wait_for_step(out, 2, process)
    process.send_signal(signal.SIGTERM)  # what Ctrl-C or kill does to `accelerate launch`; it forwards to workers
    output = finish(process, log)
    step = stopped_step(output, "stopped by SIGTERM", 6)
    assert [p.name for p in complete_checkpoints(out)] == [f"step_{step}"]
    run([*LAUNCHER, "-m", "open_instruct.finetune", *with_cache_dir(args)])
    assert_steps_match(out, zero3_straight_run)


@pytest.mark.multiprocess
def test_a_signal_that_reaches_one_rank_stops_every_rank_at_the_same_step(tiny_model_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    process = start(train_args(tiny_model_dir, out), 0.4, launcher=LAUNCHER, log=log)
    rank0, rank1 = workers_of(process)
    wait_for_step(out, 2, process)
    rank1.send_signal(signal.SIGUSR1)  # as when a signal reaches one node of a job
    output = finish(process, log)
    step = stopped_step(output, "stopped by SIGUSR1 on rank 1", 6)
    assert [p.name for p in complete_checkpoints(out)] == [f"step_{step}"]
    assert not rank0.is_running() and not rank1.is_running()


@pytest.mark.multiprocess
def test_workers_stop_with_a_checkpoint_when_their_launcher_is_killed(tiny_model_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    process = start(train_args(tiny_model_dir, out), 0.4, launcher=LAUNCHER, log=log)
    workers = workers_of(process)
    wait_for_step(out, 2, process)
    process.kill()  # SIGKILL: the launcher cannot pass anything on
    _, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, "orphaned workers kept training"
    output = log.read_text()
    step = stopped_step(output, f"stopped because the launcher (pid {process.pid}) is gone", 6)
    assert [p.name for p in complete_checkpoints(out)] == [f"step_{step}"]
    assert not (out / "run.lock").exists()
