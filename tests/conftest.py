"""Shared fixtures: the tiny model is built once per session; training runs go through the real entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from slurm_cluster import LocalSlurmCluster, unavailable_reason

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from open_instruct.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def slurm_available() -> None:
    """Skips (with the reason) where a local Slurm cluster cannot start: not root, or Slurm/munge not installed."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(slurm_available, tmp_path_factory) -> Iterator[LocalSlurmCluster]:
    """One local cluster (slurmctld + node1, node2) for the whole session; its daemons stop when the session ends."""
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture
def small_disk(tmp_path) -> Iterator:
    """A factory for real small disks: small_disk("4m") mounts a tmpfs of that size and returns its folder; every
    disk is unmounted after the test. Skips where mounting is not allowed (needs root and CAP_SYS_ADMIN)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def clean_env(**extra) -> dict:
    """The environment for a child run: no tracker or hub credentials leak in from the developer's shell."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "HF_", "ACCELERATE_", "MLFLOW_", "TRACKIO_"))}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    # Children import this checkout's package even when they run a script from tests/ (whose own folder, not the
    # repository, is first on their path) and the environment's editable install points at another checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _tail(output: bytes | str | None, chars: int) -> str:
    text = output.decode(errors="replace") if isinstance(output, bytes) else (output or "")
    return text[-chars:]


def run(cmd: list[str], env: dict | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as hung:  # say where it stopped: pytest's own report cuts the output to a line
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s; last output:\n"
                             f"{_tail(hung.stdout, 4000)}\n{_tail(hung.stderr, 6000)}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


CACHE_DIR = Path(os.environ.get("PYTEST_DATASET_CACHE", "/tmp")) / f"sft-test-dataset-cache-{os.getpid()}"


def with_cache_dir(args: list[str]) -> list[str]:
    """Runs share one session cache (content-keyed, so sharing is safe) instead of writing into the repo."""
    return args if "--dataset_local_cache_dir" in args else [*args, "--dataset_local_cache_dir", str(CACHE_DIR)]


def finetune(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "open_instruct.finetune", *with_cache_dir(args)], env=env, check=check)


def train_args(model_dir, output_dir, *extra) -> list[str]:
    """The 6-step run of the resume and fault tests: two sources, global batch 8 in 2 micro-steps, clipping."""
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
            "--dataset_mixer_list", "synthetic:spelling", "96", "synthetic:arithmetic", "32",
            "--global_batch_size", "8", "--gradient_accumulation_steps", "2", "--learning_rate", "2e-3",
            "--max_train_steps", "6", "--warmup_ratio", "0.2", "--seed", "1", "--clip_grad_norm", "1.0", *extra]


@pytest.fixture(scope="session")
def straight_run(tiny_model_dir, tmp_path_factory):
    """train_args' 6 steps without interruption: what every resumed or stopped single-process run must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    finetune(train_args(tiny_model_dir, out))
    return out


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


def accelerate_launch(num_processes: int, args: list[str], ds_config: str | None = None) -> subprocess.CompletedProcess:
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(num_processes)]
    if ds_config:
        launcher += ["--use_deepspeed", "--deepspeed_config_file", str(REPO / ds_config)]
    return run([*launcher, "-m", "open_instruct.finetune", *with_cache_dir(args)])


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def copy_without_template(model_dir: Path, target: Path) -> Path:
    shutil.copytree(model_dir, target)
    (target / "chat_template.jinja").unlink()
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target
