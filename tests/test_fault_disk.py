"""Full disks, on real small disks (a tmpfs per test): the final model's space is checked before training and
before the save; a disk that fills mid-run stops it with a clear error that says what is intact, and leaves no
temporary folder; freeing space and rerunning the same command continues the run exactly.

The disk fills through tests/fault_injection.py (FAULT=fill_disk): a file takes all the free space right after a
chosen step, so every later write of the trainer meets a real ENOSPC from the kernel.
"""

from __future__ import annotations

import re
import sys

import pytest

from conftest import REPO, clean_env, finetune, run, train_args, with_cache_dir
from open_instruct.checkpointing import complete_checkpoints
from open_instruct.storage import StorageError, failed_write, free_space_problem, is_write_failure, size_text
from test_checkpointing import step_metrics

pytestmark = pytest.mark.faults
SIZE = r"[\d.]+ (?:[kMGT]B|B)"


# ----------------------------------------------------------------------------------------------------------------
# Unit
# ----------------------------------------------------------------------------------------------------------------
def test_library_write_failures_are_recognised_and_bugs_are_not():
    class SafetensorError(Exception):  # safetensors' Rust error type has this name and no OSError base
        pass

    assert is_write_failure(OSError(28, "No space left on device"))
    assert is_write_failure(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert is_write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    assert not is_write_failure(RuntimeError("CUDA error: an illegal memory access"))
    assert not is_write_failure(ValueError("bad value"))


def test_a_failed_write_removes_its_temporary_folder_and_says_what_is_intact(tmp_path):
    tmp = tmp_path / ".final_model.tmp"
    tmp.mkdir()
    (tmp / "part").write_text("half")
    with pytest.raises(StorageError, match=rf"Could not write the final model to {tmp_path}: no space left on device "
                                           rf"\({SIZE} free on its disk\)\. Nothing partial was kept; step_2 is fine\."):
        with failed_write("the final model", tmp_path, "step_2 is fine", cleanup=tmp):
            raise OSError(28, "No space left on device")
    assert not tmp.exists()
    with pytest.raises(KeyError), failed_write("x", tmp_path, "y"):  # not a write failure: left alone
        raise KeyError("bug")


def test_free_space_problems_name_the_need_and_the_disk(tmp_path):
    assert free_space_problem(tmp_path, 1, "a checkpoint") is None
    problem = free_space_problem(tmp_path / "not" / "yet", 10**18, "a checkpoint")
    assert re.fullmatch(rf"a checkpoint needs about 1000000.00 TB but the disk of {tmp_path} has {SIZE} free", problem)
    assert size_text(3_800_000) == "3.8 MB" and size_text(15.2e9) == "15.20 GB" and size_text(12) == "12 B"


def test_a_failed_metrics_write_asks_every_rank_to_stop_instead_of_raising_on_one(tmp_path):
    from accelerate import Accelerator

    from open_instruct.metrics import MetricsLogger
    from open_instruct.preemption import StopRequests

    metrics_log = MetricsLogger(Accelerator(cpu=True), tmp_path, with_tracking=False)
    metrics_log.path = tmp_path  # appending to a folder fails like a full disk would: an OSError
    metrics_log.log({"step": 1, "eval_loss": 1.0}, step=1)
    assert metrics_log.failure.startswith(f"{tmp_path} could not be written (Is a directory")
    stops = StopRequests([], launched_by_agent=False, ask_slurm=False)
    stops.request(metrics_log.failure)
    assert stops.local_reason() == f"stopped because {metrics_log.failure}"


# ----------------------------------------------------------------------------------------------------------------
# Integration, on small real disks
# ----------------------------------------------------------------------------------------------------------------
def fill_after(args: list[str], step: int, skip_space_checks: bool = False):
    env = clean_env(FAULT="fill_disk", FAULT_STEP=str(step), FAULT_SKIP_SPACE_CHECKS="1" if skip_space_checks else "0")
    return run([sys.executable, str(REPO / "tests" / "fault_injection.py"), *with_cache_dir(args)], env=env,
               check=False)


def assert_clean_failure(result, out) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert leftovers == [], leftovers


@pytest.mark.integration
def test_a_disk_too_small_for_the_final_model_is_refused_before_training(tiny_model_dir, tmp_path, small_disk):
    out = small_disk("2m") / "run"  # the tiny model's weights alone are 3.6 MB
    result = finetune(train_args(tiny_model_dir, out), check=False)
    assert_clean_failure(result, out)
    assert re.search(rf"error: the final model needs about {SIZE} but the disk of {out} has {SIZE} free\. no "
                     r"checkpoint of this run exists", result.stderr), result.stderr[-2000:]
    assert "step     1" not in result.stdout + result.stderr  # nothing was trained


@pytest.mark.integration
def test_a_disk_that_fills_mid_run_stops_it_and_the_rerun_continues_after_space_is_freed(tiny_model_dir, tmp_path,
                                                                                       small_disk, straight_run):
    out = small_disk("64m") / "run"
    args = train_args(tiny_model_dir, out, "--checkpointing_steps", "2")
    result = fill_after(args, 3)
    assert_clean_failure(result, out)
    # metrics.jsonl's next line may still fit in its last page: the run stops at step 3 (a stop for the failed metrics
    # write) or at the checkpoint of step 4, whichever write meets the full disk first
    assert re.search(rf"error: Could not write checkpoint step_[34] to {out}/checkpoints/step_[34]: a checkpoint needs "
                     rf"about {SIZE} but the disk of {out} has {SIZE} free\. Nothing partial was kept; the newest "
                     rf"checkpoint {out}/checkpoints/step_2 is intact", result.stderr), result.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step_2"]

    (out / "filler").unlink()  # the user frees space and runs the same command again
    finetune(args)
    assert step_metrics(out) == step_metrics(straight_run)


@pytest.mark.integration
def test_a_disk_full_before_the_final_save_is_a_clear_error(tiny_model_dir, tmp_path, small_disk):
    out = small_disk("64m") / "run"
    result = fill_after(train_args(tiny_model_dir, out), 6)  # after the last step
    assert_clean_failure(result, out)
    assert re.search(rf"error: the final model needs about {SIZE} but the disk of {out} has {SIZE} free\. no "
                     r"checkpoint of this run exists", result.stderr), result.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.parametrize("step, every, what, intact, extra", [
    (3, "2", "checkpoint step_[34]", "step_2", []),
    (6, "4", "the final model", "step_4", []),
    (6, "4", "the LoRA adapter", "step_4", ["--use_lora", "--lora_rank", "8"]),
], ids=["checkpoint", "final-model", "lora-adapter"])
def test_writes_that_fail_inside_the_libraries_are_clear_errors_without_leftovers(tiny_model_dir, tmp_path, small_disk,
                                                                                 step, every, what, intact, extra):
    """With the trainer's own space checks skipped, safetensors and torch.save meet the full disk themselves."""
    out = small_disk("64m") / "run"
    result = fill_after(train_args(tiny_model_dir, out, "--checkpointing_steps", every, *extra), step,
                        skip_space_checks=True)
    assert_clean_failure(result, out)
    assert re.search(rf"error: Could not write {what} to \S+: no space left on device \({SIZE} free on its disk\)\. "
                     rf"Nothing partial was kept; the newest checkpoint \S+{intact} is intact", result.stderr), \
        result.stderr[-2000:]
