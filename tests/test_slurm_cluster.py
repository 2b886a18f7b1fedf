"""The local Slurm cluster: a 2-node sbatch job runs one task per node and can find its rendezvous address;
the daemons are gone once the cluster's block exits, also when it exits with an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_cluster import NODES, LocalSlurmCluster

pytestmark = pytest.mark.slurm

# The rendezvous lookup is what generated sbatch scripts use: "node1" resolves nowhere here (no DNS), so the first
# node's address comes from Slurm itself (NodeAddr). No pipefail: `head` may close the pipe before scontrol is done.
TWO_NODE_JOB = """#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1
#SBATCH --time=2
#SBATCH --output={output}
set -eu
srun bash -c 'echo "task $SLURM_NODEID $SLURMD_NODENAME"'
HOST0=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
ADDR0=$(scontrol show node "$HOST0" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
echo "rendezvous $HOST0 $ADDR0"
"""


@pytest.fixture(scope="module")
def two_node_job(slurm_cluster, tmp_path_factory) -> list[list[str]]:
    """Runs the job once (it must complete); returns its output lines, split into words."""
    work = tmp_path_factory.mktemp("two-node-job")
    output = work / "job.out"
    script = work / "job.sh"
    script.write_text(TWO_NODE_JOB.format(output=output))
    job_id = slurm_cluster.submit(script)
    state = slurm_cluster.wait_for_job(job_id, timeout=120)
    text = output.read_text() if output.exists() else "(no output file)"
    assert state == "COMPLETED", f"job {job_id} ended {state}: {slurm_cluster.job_info(job_id)}\n{text}"
    return [line.split() for line in text.splitlines()]


def test_two_node_job_runs_one_task_on_each_node(two_node_job):
    tasks = sorted(tuple(words[1:]) for words in two_node_job if words[0] == "task")
    assert tasks == [("0", "node1"), ("1", "node2")]


def test_job_resolves_first_node_address_from_slurm(two_node_job):
    assert [words[1:] for words in two_node_job if words[0] == "rendezvous"] == [["node1", "127.0.0.1"]]


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def children(pids: set[int]) -> set[int]:
    """Processes whose parent is one of pids (slurmctld forks slurmscriptd)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if ppid in pids:
            found.add(int(stat.parent.name))
    return found


def test_daemons_are_gone_after_the_block_raises(slurm_available, tmp_path):
    """A cluster of its own: free ports and a private munged let it run beside the session's."""
    with pytest.raises(RuntimeError, match="test failure"):
        with LocalSlurmCluster(tmp_path) as cluster:
            pids = set(cluster.pids().values())
            assert len(pids) == 2 + len(NODES)  # munged, slurmctld, one slurmd per node
            started = pids | children(pids)
            socket_dir = cluster.socket_dir
            assert all(alive(pid) for pid in started)
            raise RuntimeError("test failure")
    assert not [pid for pid in started if alive(pid)]
    assert cluster.pids() == {} and not socket_dir.exists()
