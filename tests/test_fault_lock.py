"""One run per output directory (open_instruct/run_lock.py): a second run is refused naming the holder; a lock left
by a run that is gone is taken over with a warning."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, replace

import pytest

from conftest import finetune, read_metrics, train_args
from open_instruct import run_lock
from open_instruct.run_lock import LOCK_NAME, Holder, RunLock, RunLockError, gone_reason
from test_fault_signals import finish, start, wait_for_step

pytestmark = pytest.mark.faults


def write_lock(folder, holder: Holder, age_seconds: float = 0.0):
    path = folder / LOCK_NAME
    path.write_text(json.dumps(asdict(holder)))
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid  # exited and reaped: nothing runs under this pid (until the kernel hands it out again)


def test_a_lock_is_taken_released_and_refused_to_a_second_run(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockError, match=rf"--output_dir {tmp_path} is in use by another run \(host \S+, pid "
                                           rf"{os.getpid()}, started .*\).*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()


def test_a_dead_or_reused_pid_on_this_host_gives_the_lock_up(tmp_path, caplog):
    me = Holder.this_process()
    assert gone_reason(replace(me, pid=dead_pid()), me, 0.0).endswith("is not running")
    reused = replace(me, process_start=(me.process_start or 0) + 1)  # our pid, but another process's start time
    assert gone_reason(reused, me, 0.0) == f"pid {me.pid} now belongs to another process"
    assert gone_reason(me, me, 0.0) is None
    write_lock(tmp_path, replace(me, pid=dead_pid(), token="old"))
    lock = RunLock(tmp_path).acquire()
    assert "Took over" in caplog.text and "is not running" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.me.token
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # the stale one is not kept
    lock.release()


def test_another_hosts_lock_holds_until_its_lease_expires(tmp_path):
    me = Holder.this_process()
    other = replace(me, host="node-elsewhere", pid=1)
    assert gone_reason(other, me, run_lock.LEASE_SECONDS - 1) is None
    assert "lease expired" in gone_reason(other, me, run_lock.LEASE_SECONDS + 1)
    write_lock(tmp_path, other, age_seconds=60)
    with pytest.raises(RunLockError, match="host node-elsewhere, pid 1"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, other, age_seconds=run_lock.LEASE_SECONDS + 60)
    RunLock(tmp_path).acquire().release()


def test_a_requeued_slurm_job_takes_over_its_own_lock_on_another_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    me = Holder.this_process()
    before_requeue = replace(me, host="node-elsewhere", pid=1, slurm_restart_count=0)
    assert gone_reason(before_requeue, me, 0.0) == "Slurm requeued job 77 (restart 1)"
    other_job = replace(before_requeue, slurm_job_id="78")
    assert gone_reason(other_job, me, 0.0) is None


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = RunLock(tmp_path).acquire()
    stale = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (stale, stale))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5
    lock.release()


def test_releasing_leaves_a_lock_that_another_run_took_over(tmp_path):
    lock = RunLock(tmp_path).acquire()
    taker = Holder.this_process()
    write_lock(tmp_path, taker)  # e.g. after a lease expired during a long network outage
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == taker.token


@pytest.mark.integration
def test_a_second_run_into_a_running_runs_directory_is_refused(tiny_model_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    args = train_args(tiny_model_dir, out)
    # 3 s per step: the first run must still be training when the second one (imports alone take seconds on a busy
    # 2-core machine) reaches the lock; with 0.5 s the first once finished first under load and the second trained.
    first = start(args, 3.0, log=log)
    wait_for_step(out, 1, first)
    second = finetune(args, check=False)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"error: --output_dir {out} is in use by another run (host " in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert "parameters" not in second.stderr  # refused before the model loaded
    finish(first, log)
    assert first.returncode == 0
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4, 5, 6]  # the first run's lines only, once each
    assert not (out / LOCK_NAME).exists()


@pytest.mark.integration
def test_a_lock_left_by_a_killed_run_is_taken_over(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    write_lock(out, replace(Holder.this_process(), pid=dead_pid(), started="2026-01-01T00:00:00"))
    result = finetune(train_args(tiny_model_dir, out))
    assert "Took over" in result.stderr and "started 2026-01-01T00:00:00" in result.stderr
    assert (out / "model.safetensors").exists() and not (out / LOCK_NAME).exists()
