"""mason on a real Slurm cluster: the debug recipe submitted as a 2-node job (one CPU process per node, DeepSpeed
ZeRO-3 over gloo) on the local cluster of tests/slurm_cluster.py (slurmctld + slurmd node1 and node2 on loopback)."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import clean_env, read_metrics, run
from slurm_cluster import free_ports
from test_checkpointing import assert_steps_match

pytestmark = pytest.mark.slurm

ZERO3 = "configs/ds_configs/stage3_no_offloading_accelerate.conf"


def test_mason_runs_the_debug_recipe_as_a_two_node_zero3_slurm_job(slurm_cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = {**clean_env(), **slurm_cluster.env}
    env.update(PYTHON=sys.executable, BACKEND="slurm", NUM_NODES="2", NUM_PROCESSES="1", DS_CONFIG=ZERO3, EVAL="0",
               OUTPUT_DIR=str(out), TINY_MODEL_DIR=str(tiny_model_dir),
               MASON_FLAGS=f"--main_process_port {free_ports(1)[0]} --time 00:15:00 --job_name sft-2node")
    submitted = run(["bash", "scripts/train/debug/finetune.sh", "--max_train_steps", "4", "--logging_steps", "1",
                     "--dataset_local_cache_dir", str(tmp_path / "cache")], env=env)
    job_id = re.search(r"Submitted job (\d+)", submitted.stdout).group(1)
    assert f"follow: tail -f {out}/logs/sft-2node-{job_id}.out" in submitted.stdout

    state = slurm_cluster.wait_for_job(job_id, timeout=420)
    stdout_log, stderr_log = (out / "logs" / f"sft-2node-{job_id}.{kind}" for kind in ("out", "err"))
    logs = stdout_log.read_text() + stderr_log.read_text()
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{logs[-6000:]}"

    # Both Slurm nodes joined one process group of 2, rank 0 on the first node.
    assert "2 node(s), rendezvous node1 (127.0.0.1)" in logs
    environment = json.loads((out / "environment.json").read_text())
    assert environment["num_processes"] == 2 and environment["nodes"] == ["node1", "node2"]
    losses = [row["train_loss"] for row in read_metrics(out)]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("spell cat", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def submit_debug_recipe(slurm_cluster, tiny_model_dir, tmp_path, out, job_name: str, steps: int) -> str:
    """The debug recipe as a 2-node ZeRO-3 job through mason; returns the job id."""
    env = {**clean_env(), **slurm_cluster.env}
    env.update(PYTHON=sys.executable, BACKEND="slurm", NUM_NODES="2", NUM_PROCESSES="1", DS_CONFIG=ZERO3, EVAL="0",
               OUTPUT_DIR=str(out), TINY_MODEL_DIR=str(tiny_model_dir),
               MASON_FLAGS=f"--main_process_port {free_ports(1)[0]} --time 00:15:00 --job_name {job_name}")
    submitted = run(["bash", "scripts/train/debug/finetune.sh", "--max_train_steps", str(steps), "--logging_steps", "1",
                     "--dataset_local_cache_dir", str(tmp_path / "cache")], env=env)
    return re.search(r"Submitted job (\d+)", submitted.stdout).group(1)


def job_logs(out, job_name: str, job_id: str) -> str:
    return "".join((out / "logs" / f"{job_name}-{job_id}.{kind}").read_text() for kind in ("out", "err"))


def wait_for_logged_step(out, step: int, timeout: float = 300) -> None:
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and sum(line.endswith("}") for line in metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {metrics} within {timeout} s")


# Slurm stamps launch credentials in whole seconds and refuses one no newer than the revoke sent at the requeue.
CREDENTIAL_CLOCK_SECONDS = 2


def start_requeued_job_now(slurm_cluster, job_id: str, timeout: float = 300) -> None:
    """Slurm holds a requeued job back for a while (Reason=BeginTime, about 2 minutes here): let it start sooner,
    which only shortens the test. Not at once: Slurm's hold is there so that the rerun's launch credential is newer
    than the previous run's revoked one (job_mgr.c, the requeue's begin_time); a rerun released in the same second
    fails to launch and the job ends FAILED with nothing in its logs (seen once in CI)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = slurm_cluster.job_info(job_id)
        if info.get("Restarts") == "1" and info.get("JobState") == "PENDING":  # no longer COMPLETING
            time.sleep(CREDENTIAL_CLOCK_SECONDS)
            slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            return
        if info.get("JobState") in ("RUNNING", "COMPLETED") and info.get("Restarts") == "1":
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} was not requeued within {timeout} s: {slurm_cluster.job_info(job_id)}")


@pytest.mark.faults
def test_a_job_told_to_stop_by_slurm_checkpoints_requeues_and_matches_an_uninterrupted_job(slurm_cluster,
                                                                                          tiny_model_dir, tmp_path):
    """USR1 to the batch shell, as Slurm sends it --grace_seconds before the time limit (scancel --batch does it by
    hand): the training saves a checkpoint and stops, the job requeues itself, and the rerun finishes the run."""
    steps = 30
    straight_out, out = tmp_path / "straight", tmp_path / "run"
    straight_id = submit_debug_recipe(slurm_cluster, tiny_model_dir, tmp_path, straight_out, "sft-straight", steps)
    assert slurm_cluster.wait_for_job(straight_id, timeout=420) == "COMPLETED", job_logs(straight_out, "sft-straight",
                                                                                         straight_id)[-6000:]
    job_id = submit_debug_recipe(slurm_cluster, tiny_model_dir, tmp_path, out, "sft-requeue", steps)
    wait_for_logged_step(out, 3)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    start_requeued_job_now(slurm_cluster, job_id)
    state = slurm_cluster.wait_for_job(job_id, timeout=600)
    logs = job_logs(out, "sft-requeue", job_id)
    assert state == "COMPLETED", (f"job {job_id} ended {state}: {slurm_cluster.job_info(job_id)}\n{logs[-6000:]}\n"
                                  f"{slurm_cluster.log_tails()}")

    assert f"job {job_id}: USR1: asking the training to save a checkpoint and stop" in logs
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+) of 30; checkpoint (\S+); rerun the same command", logs)
    assert stopped and 3 <= int(stopped.group(1)) < steps, logs[-6000:]
    assert "requeueing the job to continue from it" in logs
    assert f"job {job_id} (restart 1): 2 node(s)" in logs  # the requeued run, appended to the same log files
    assert f"Resumed {stopped.group(2)}: continuing at step {int(stopped.group(1)) + 1} of 30" in logs
    assert slurm_cluster.job_info(job_id)["Restarts"] == "1"
    assert_steps_match(out, straight_out)  # every step once, the uninterrupted job's losses within 1e-5
