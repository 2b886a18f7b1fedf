"""What a run directory records about how it was made: the resolved config, package versions, the code's commit.

Nothing secret goes in: the config holds flags only (tokens come from the environment, never from flags), and the
environment record lists versions and the commit, not environment variables.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import yaml

from open_instruct.args import FinetuneArgs, args_to_dict
from open_instruct.storage import write_text

PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "datasets", "huggingface_hub", "tokenizers",
            "safetensors", "peft", "liger-kernel", "flash-attn", "wandb")
REPO_DIR = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path = REPO_DIR) -> dict[str, str | bool | None]:
    """The trainer's own commit and whether its tracked files had changes; None outside a git checkout."""
    def git(*command) -> str:
        return subprocess.run(["git", "-C", str(repo), *command], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain",
                                                                                     "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}


def node_name() -> str:
    """This process's machine: Slurm's node name inside a Slurm job (several "nodes" may share one host), else the
    host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def write_run_record(output: Path, args: FinetuneArgs, num_processes: int, nodes: list[str] | None = None,
                     intact: str = "nothing was trained yet") -> None:
    """run_config.yaml (every flag, resolved) and environment.json (versions, commit, processes and, per global
    rank, the node it ran on). A failed write is a StorageError that says what is `intact`."""
    write_text(output / "run_config.yaml", yaml.safe_dump(args_to_dict(args), sort_keys=False), "run_config.yaml", intact)
    record = {"packages": package_versions(), "git": git_commit(), "num_processes": num_processes,
              "nodes": nodes, "platform": platform.platform()}
    write_text(output / "environment.json", json.dumps(record, indent=2), "environment.json", intact)
