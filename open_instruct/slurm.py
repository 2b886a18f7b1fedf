"""The sbatch script of a multi-node training job, and its submission.

One Slurm task per node (`srun --ntasks-per-node=1`); each task runs `accelerate launch`, which starts that node's
processes. The node's rank is `SLURM_NODEID`; the rendezvous host is the first node of the allocation, reached at
the address Slurm itself uses for it (its NodeAddr), so it works where node names do not resolve through DNS.
The job inherits the submitting shell's environment (sbatch's --export=ALL), which is how secrets reach it: by name,
never written into the script.
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
        "output": job.stdout_log, "error": job.stderr_log, "export": "ALL",
    }
    return [f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}"
            for key, value in wanted.items() if value is not None]


def sbatch_script(spec: LaunchSpec, layout: Layout, job: SlurmJob) -> str:
    """A complete sbatch script: directives, environment, secret checks, rendezvous, one srun task per node."""
    command = node_command(spec, layout, ShellVar("SLURM_NODEID"), ShellVar("MAIN_PROCESS_IP"))
    lines = ["#!/bin/bash", f"# Written by mason.py: {layout.num_nodes} node(s) x {layout.processes_per_node} "
             f"process(es). Submit with: sbatch <this file>", *_directives(job, layout), "set -euo pipefail", ""]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in job.env.items()]
    lines += [f': "${{{name}:?{name} must be set in the environment that submits this job (mason --secret {name})}}"'
              for name in job.secrets]
    lines += [RENDEZVOUS,
              'echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES node(s), rendezvous $HOST0 ($MAIN_PROCESS_IP)"', ""]
    # Single quotes keep $SLURM_NODEID for the task's own shell: each node fills in its rank there.
    # The one task per node gets every CPU the node has in the job (srun would otherwise bind it to one).
    task = shell_join(command, wrap=True)
    lines.append(f'srun --nodes={layout.num_nodes} --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" '
                 f"--kill-on-bad-exit=1 \\\n  bash -c {shlex.quote(task)}")
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
