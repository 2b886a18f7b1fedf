"""The sbatch script of a multi-node training job, and its submission.

One Slurm task per node (`srun --ntasks-per-node=1`); each task runs `accelerate launch`, which starts that node's
processes. The node's rank is `SLURM_NODEID`; the rendezvous host is the first node of the allocation, reached at
the address Slurm itself uses for it (its NodeAddr), so it works where node names do not resolve through DNS.
The job inherits the submitting shell's environment (sbatch's --export=ALL), which is how secrets reach it: by name,
never written into the script.

Surviving the time limit and preemption (see docs/cluster.md):
- `--signal=B:USR1@GRACE`: Slurm sends USR1 to the batch shell GRACE seconds before the time limit (and at
  preemption where the cluster sets preempt_send_user_signal; `scancel --batch --signal=USR1 JOB` does it by hand).
  The batch shell passes it to srun, which passes it to every process of every task. Each task's shell and torch's
  launcher ignore USR1 (`trap '' USR1`, inherited), so only the training processes act on it: they finish the
  optimizer step, save a checkpoint and exit with 75 (open_instruct/preemption.py).
- The batch shell then runs `scontrol requeue` on its own job (`--requeue` allows it): the same job id goes back to
  the queue and its rerun continues from that checkpoint (--resume_from_checkpoint auto, the default).
- `--open-mode=append`: the requeued run appends to the same log files (their names hold the job id).
- SIGTERM (scancel, a preemption without that signal) reaches every process directly; the training stops with a
  checkpoint too, and TORCH_ELASTIC_SHUTDOWN_TIMEOUT gives the workers GRACE seconds before torch's launcher kills
  them. A job cancelled that way is not requeued by the script: scancel means stop.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from open_instruct.launch import Layout, LaunchError, LaunchSpec, ShellVar, node_command, shell_join

# The first node of the allocation and the address Slurm reaches it at (NodeAddr; the name itself if none is set).
# sed, not head: head would close the pipe early, and under pipefail a SIGPIPE to scontrol would fail the job.
RENDEZVOUS = """HOST0=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PROCESS_IP=$(scontrol show node "$HOST0" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')
export MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$HOST0}"""


# USR1 (from --signal=B:USR1@GRACE, or scancel --batch --signal=USR1) goes on to every process of the training step.
STOP_ON_USR1 = """STOP_REQUESTED=0
SRUN_PID=""
stop_training() {
    STOP_REQUESTED=1
    echo "job $SLURM_JOB_ID: USR1: asking the training to save a checkpoint and stop"
    if [ -n "$SRUN_PID" ]; then kill -s USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
trap stop_training USR1"""

# `wait` returns early when a trap runs: wait again until srun itself has ended, and keep its status.
WAIT = """set +e
while :; do
    wait "$SRUN_PID"
    STATUS=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
set -e"""

WAIT_AND_REQUEUE = WAIT + """
if [ "$STOP_REQUESTED" = 1 ] && [ "$STATUS" != 0 ]; then
    echo "job $SLURM_JOB_ID: the training stopped with a checkpoint; requeueing the job to continue from it"
    scontrol requeue "$SLURM_JOB_ID"
fi"""


@dataclass
class SlurmJob:
    """Everything the sbatch script says; None leaves a setting to the cluster's defaults."""

    job_name: str
    log_dir: Path
    workdir: Path
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    grace_seconds: int = 300  # USR1 this long before the time limit; workers' time to save after a SIGTERM
    requeue: bool = True  # after a stop on USR1, put the job back in the queue to continue

    @property
    def stdout_log(self) -> Path:
        return self.log_dir / f"{self.job_name}-%j.out"

    @property
    def stderr_log(self) -> Path:
        return self.log_dir / f"{self.job_name}-%j.err"


def _directives(job: SlurmJob, layout: Layout) -> list[str]:
    whole_nodes = job.gpus_per_node > 0 and job.cpus_per_node is None
    wanted = {
        "job-name": job.job_name, "nodes": layout.num_nodes, "ntasks-per-node": 1,
        "gpus-per-node": job.gpus_per_node or None, "cpus-per-task": job.cpus_per_node,
        # Whole GPU nodes unless CPUs are sized explicitly: one task drives all of a node's GPUs and data workers.
        "exclusive": whole_nodes or None, "mem": 0 if whole_nodes else None, "time": job.time,
        "partition": job.partition, "account": job.account, "qos": job.qos, "chdir": job.workdir,
        "output": job.stdout_log, "error": job.stderr_log, "open-mode": "append", "export": "ALL",
        "signal": f"B:USR1@{job.grace_seconds}", "requeue": job.requeue or None,
    }
    return [f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}"
            for key, value in wanted.items() if value is not None]


def sbatch_script(spec: LaunchSpec, layout: Layout, job: SlurmJob) -> str:
    """A complete sbatch script: directives, environment, secret checks, rendezvous, one srun task per node, and
    the stop-and-requeue handling of USR1 (see the module docstring)."""
    command = node_command(spec, layout, ShellVar("SLURM_NODEID"), ShellVar("MAIN_PROCESS_IP"))
    lines = ["#!/bin/bash", f"# Written by mason.py: {layout.num_nodes} node(s) x {layout.processes_per_node} "
             f"process(es). Submit with: sbatch <this file>", *_directives(job, layout), "set -euo pipefail", ""]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in job.env.items()]
    lines += [f': "${{{name}:?{name} must be set in the environment that submits this job (mason --secret {name})}}"'
              for name in job.secrets]
    lines += [f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={job.grace_seconds}  # workers' time to save after a SIGTERM",
              RENDEZVOUS, 'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES node(s), '
              'rendezvous $HOST0 ($MAIN_PROCESS_IP)"', "", STOP_ON_USR1, ""]
    # Single quotes keep $SLURM_NODEID for the task's own shell: each node fills in its rank there. The task ignores
    # USR1 and execs the launcher, which inherits that; the training processes install their own handler.
    # The one task per node gets every CPU the node has in the job (srun would otherwise bind it to one).
    task = 'trap "" USR1; exec ' + shell_join(command, wrap=True)
    lines.append(f'srun --nodes={layout.num_nodes} --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" '
                 f"--kill-on-bad-exit=1 \\\n  bash -c {shlex.quote(task)} &")
    lines += ["SRUN_PID=$!", WAIT_AND_REQUEUE if job.requeue else WAIT, 'exit "$STATUS"']
    return "\n".join(lines) + "\n"


def submit(script_path: Path, env: dict | None = None) -> str:
    """sbatch the script; returns the job id."""
    if shutil.which("sbatch", path=(env or {}).get("PATH")) is None:
        raise LaunchError("sbatch is not on PATH: run mason where Slurm's client tools are, or use --backend print "
                          "(commands for another scheduler) or --backend local.")
    result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise LaunchError(f"sbatch refused {script_path}: {result.stderr.strip() or result.stdout.strip()}")
    match = re.match(r"\s*(\d+)", result.stdout)
    if not match:
        raise LaunchError(f"sbatch gave no job id: {result.stdout.strip()!r}")
    return match.group(1)
