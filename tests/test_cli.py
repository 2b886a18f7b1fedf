"""The `open-instruct-sft` command: its dispatcher, and the package as `pip install .` (not editable) installs it:
package data, no packaging warnings, the console script and every subcommand's help."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from open_instruct import cli

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("finetune", "prepare", "report", "chat", "mason", "tiny-model"):
        assert f"  {name} " in out


def test_no_command_prints_the_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: open-instruct-sft COMMAND" in capsys.readouterr().out


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown command 'train'" in err and "finetune" in err


def test_commands_name_functions_of_this_package():
    for name, (target, _) in cli.COMMANDS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


@pytest.mark.integration
def test_a_bad_flag_value_through_the_command_is_one_line_and_exit_2(tmp_path):
    """finetune through the dispatcher keeps `python -m open_instruct.finetune`'s contract: a user error is one line
    naming the flag, exit status 2, no traceback."""
    missing = tmp_path / "no-such-model"
    result = subprocess.run([sys.executable, "-m", "open_instruct.cli", "finetune", "--model_name_or_path",
                             str(missing), "--dataset_mixer_list", "synthetic:spelling", "4", "--output_dir",
                             str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"--model_name_or_path {missing}" in error[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def _build_and_install(tmp_path: Path) -> tuple[Path, str]:
    """A wheel built from a copy of the sources (the build writes into its source tree), installed into a folder of
    its own; returns (that folder, the build's output)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "open_instruct", source / "open_instruct", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"),
                            str(source)], capture_output=True, text=True, check=True)
    site = tmp_path / "site"
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True, text=True,
                   check=True)
    return site, built.stdout + built.stderr


@pytest.mark.integration
def test_the_installed_package_works_from_anywhere(tmp_path):
    site, build_log = _build_and_install(tmp_path)
    assert "Warning" not in build_log and "warning:" not in build_log.lower(), build_log[-3000:]
    assert (site / "open_instruct" / "assets" / "tiny_llama.json").is_file()  # package data shipped
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_", "PYTHONPATH"))}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")  # the installed copy first, the venv's dependencies after

    def command(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(site / "bin" / "open-instruct-sft"), *argv], cwd=outside, env=env,
                              capture_output=True, text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import open_instruct; print(open_instruct.__file__)"], cwd=outside,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # not the checkout's editable install
    assert "mason" in command("--help").stdout
    for name in cli.COMMANDS:
        if name == "tiny-model":
            continue
        result = command(name, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, (name, result.stderr[-2000:])
    # The embedded tiny model is built from the asset the package ships, outside any checkout.
    built = command("tiny-model", str(outside / "tiny"))
    assert built.returncode == 0, built.stderr[-2000:]
    assert (outside / "tiny" / "config.json").is_file() and (outside / "tiny" / "tokenizer_config.json").is_file()


def test_without_a_gpu_deepspeed_is_told_the_cpu_instead_of_warning(monkeypatch):
    import open_instruct

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert open_instruct._no_gpu_driver()
    result = subprocess.run([sys.executable, "-c", "import open_instruct, deepspeed"], cwd=REPO, capture_output=True,
                            text=True, env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {
                                "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and "Setting accelerator to CPU" not in result.stdout + result.stderr
