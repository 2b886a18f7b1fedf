"""mason on a real Slurm cluster: the debug recipe submitted as a 2-node job (one CPU process per node, DeepSpeed
ZeRO-3 over gloo) on the local cluster of tests/slurm_cluster.py (slurmctld + slurmd node1 and node2 on loopback)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import clean_env, read_metrics, run
from slurm_cluster import free_ports

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
