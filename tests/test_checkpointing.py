"""Checkpoints: which one resumes, whether it belongs to this run, crash-safe saves, and exact resume after a kill.

The kill tests run the real trainer through tests/fault_injection.py, which SIGKILLs it (or fails its write) at a
chosen checkpoint; the rerun is the same command, as a user (or a scheduler's requeue) would issue it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import REPO, clean_env, finetune, read_metrics, run, train_args, with_cache_dir  # noqa: F401
from open_instruct.checkpointing import (
    COMPLETED_MARKER,
    TRAINER_STATE,
    CheckpointError,
    check_resumable,
    checkpoint_to_resume,
    complete_checkpoints,
    prune_checkpoints,
    remove_unfinished_saves,
    resume_problems,
)
from open_instruct.chat_templates import end_of_turn_token_ids
from open_instruct.metrics import RunCounters, lines_up_to

ZERO3 = "configs/ds_configs/stage3_no_offloading_accelerate.conf"


# ----------------------------------------------------------------------------------------------------------------
# Unit: finding, choosing and checking checkpoints
# ----------------------------------------------------------------------------------------------------------------
def make_checkpoint(output: Path, step: int, complete: bool = True, identity: dict | None = None) -> Path:
    path = output / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETED_MARKER).write_text(json.dumps({"step": step}))
        (path / TRAINER_STATE).write_text(json.dumps({"step": step, "identity": identity or identity_of()}))
    return path


def identity_of(seed=1, lr=1e-3, batch="8 examples", fingerprint="abc", processes=1, zero=None) -> dict:
    return {"settings": {"seed": seed, "model_name_or_path": "m"}, "optimization": {"learning_rate": lr},
            "data_fingerprint": fingerprint, "global_batch": batch, "num_processes": processes, "zero_stage": zero}


def test_newest_complete_checkpoint_is_by_step_number_and_skips_unfinished_ones(tmp_path):
    for step in (9, 10):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 11, complete=False)
    (tmp_path / "checkpoints" / "step_12.tmp").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_9", "step_10"]
    assert checkpoint_to_resume("auto", tmp_path).name == "step_10"


def test_auto_without_checkpoints_starts_fresh(tmp_path):
    assert checkpoint_to_resume("auto", tmp_path) is None


def test_none_refuses_an_output_dir_with_checkpoints(tmp_path):
    assert checkpoint_to_resume("none", tmp_path) is None
    make_checkpoint(tmp_path, 3)
    with pytest.raises(CheckpointError, match="earlier run.*step_3.*another --output_dir"):
        checkpoint_to_resume("none", tmp_path)


def test_an_explicit_path_must_exist_and_be_complete(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoint_to_resume(str(tmp_path / "missing"), tmp_path)
    unfinished = make_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpoint_to_resume(str(unfinished), tmp_path)
    done = make_checkpoint(tmp_path / "other", 2)
    assert checkpoint_to_resume(str(done), tmp_path) == done


def test_unfinished_saves_are_removed(tmp_path):
    make_checkpoint(tmp_path, 2)
    (tmp_path / "checkpoints" / "step_4.tmp").mkdir()
    assert [p.name for p in remove_unfinished_saves(tmp_path)] == ["step_4.tmp"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]


def test_a_different_seed_batch_or_data_is_a_different_run():
    saved = identity_of()
    assert resume_problems(saved, identity_of()) == ([], [])
    assert "--seed" in resume_problems(saved, identity_of(seed=2))[0][0]
    assert "global batch" in resume_problems(saved, identity_of(batch="16 examples"))[0][0]
    assert "tokenized data" in resume_problems(saved, identity_of(fingerprint="def"))[0][0]
    different, optimization = resume_problems(saved, identity_of(lr=2e-3))
    assert different == [] and "--learning_rate" in optimization[0]


def test_resuming_a_different_run_is_refused_unless_forced(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 3, identity=identity_of(seed=1))
    with pytest.raises(CheckpointError, match="(?s)different run.*--seed.*--force_resume"):
        check_resumable(checkpoint, identity_of(seed=2), force=False)
    assert check_resumable(checkpoint, identity_of(seed=2), force=True)["step"] == 3
    assert check_resumable(checkpoint, identity_of(lr=5e-3), force=False)["step"] == 3  # reported, not refused


def test_another_process_layout_is_not_another_run(tmp_path):
    """The layout is kept in the checkpoint and resharded on resume (open_instruct/elastic.py, tests/test_elastic.py)."""
    checkpoint = make_checkpoint(tmp_path, 3, identity=identity_of(processes=2, zero=3))
    assert check_resumable(checkpoint, identity_of(processes=4, zero=3), force=False)["identity"]["num_processes"] == 2
    assert check_resumable(checkpoint, identity_of(processes=1, zero=None), force=False)["step"] == 3


def test_pruning_keeps_the_newest_and_skips_checkpoints_in_use(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step_4.universal").mkdir()  # a conversion goes with its checkpoint
    assert prune_checkpoints(tmp_path, None) == []
    busy = tmp_path / "checkpoints" / "step_2"
    removed = prune_checkpoints(tmp_path, 2, in_use=lambda path: path == busy)
    assert [p.name for p in removed] == ["step_4"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_2", "step_6", "step_8"]
    assert not (tmp_path / "checkpoints" / "step_4.universal").exists()


def test_metrics_of_steps_after_the_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    assert [json.loads(line)["step"] for line in lines_up_to(path, 2)] == [1, 2]
    assert lines_up_to(path, 0) == []


def test_resumed_counters_continue_totals_but_not_the_speed():
    counters = RunCounters(num_processes=1)
    counters.restore({"total_tokens": 1000, "total_tokens_including_padding": 1200, "trained_tokens": 600})
    counters.add(50, 60, 30)
    assert counters.state() == {"total_tokens": 1050, "total_tokens_including_padding": 1260, "trained_tokens": 630}
    counters.start_time -= 10.0  # this process has trained for ~10 s
    assert counters.throughput()["per_device_tps"] == pytest.approx(50 / 10.0, rel=0.01)


def test_end_of_turn_tokens_follow_the_chat_template(tiny_model_dir, tmp_path):
    from open_instruct.chat_templates import get_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.eos_token_id]  # the tiny model's template ends with eos
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = get_chat_template("chatml")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token_ids(tokenizer) == [im_end, tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------------------------------
# Integration: kill, fail, resume
# ----------------------------------------------------------------------------------------------------------------
def with_fault(args: list[str], fault: str, step: int, launcher: list[str] | None = None, env: dict | None = None):
    env = clean_env(FAULT=fault, FAULT_STEP=str(step), **(env or {}))
    return run([*(launcher or [sys.executable]), str(REPO / "tests" / "fault_injection.py"), *with_cache_dir(args)],
               env=env, check=False)


def step_metrics(output_dir) -> dict[int, dict]:
    rows = read_metrics(output_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "each step logged exactly once, in order"
    return {r["step"]: {k: r[k] for k in ("train_loss", "grad_norm", "learning_rate", "total_tokens")} for r in rows}


def assert_steps_match(resumed_dir, reference_dir) -> None:
    """Every step logged once, with the reference run's losses, grad norms and LRs within the multi-process
    summation-order tolerance (1e-5 relative) and its exact token counts."""
    resumed, reference = step_metrics(resumed_dir), step_metrics(reference_dir)
    assert resumed.keys() == reference.keys()
    for step in reference:
        for key in ("train_loss", "grad_norm", "learning_rate"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5), (step, key)
        assert resumed[step]["total_tokens"] == reference[step]["total_tokens"]


LORA = ["--use_lora", "--lora_rank", "8", "--lora_alpha", "16"]  # dropout 0.1: the resumed RNG must match as well


@pytest.fixture(scope="module")
def straight_lora_run(tiny_model_dir, tmp_path_factory):
    """The same 6 steps training LoRA adapters."""
    out = tmp_path_factory.mktemp("straight_lora")
    finetune(train_args(tiny_model_dir, out, *LORA))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_killed_run_resumes_bitwise(tiny_model_dir, tmp_path, request, kind):
    straight_run = request.getfixturevalue("straight_run" if kind == "full" else "straight_lora_run")
    weights = "model.safetensors" if kind == "full" else "adapter_model.safetensors"
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, out, "--checkpointing_steps", "3", *(LORA if kind == "lora" else []))
    killed = with_fault(args, "kill_after_save", 3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step_3"] and not (out / weights).exists()
    finetune(args)  # the same command again: --resume_from_checkpoint auto
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step_3")
    assert step_metrics(out) == step_metrics(straight_run)  # bitwise: losses, grad norms, LRs, token counts
    resumed, straight = load_file(out / weights), load_file(straight_run / weights)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


@pytest.mark.integration
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_to_resume(tiny_model_dir, tmp_path, straight_run):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, out, "--checkpointing_steps", "2")
    killed = with_fault(args, "kill_during_save", 4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    unfinished = out / "checkpoints" / "step_4.tmp"
    assert any(unfinished.iterdir()) and not (unfinished / COMPLETED_MARKER).exists()
    assert [p.name for p in complete_checkpoints(out)] == ["step_2"]
    result = finetune(args)
    assert "step_4.tmp: a checkpoint save that never finished" in result.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step_2")
    assert step_metrics(out) == step_metrics(straight_run)
    assert [p.name for p in complete_checkpoints(out)] == ["step_2", "step_4", "step_6"]


@pytest.mark.integration
def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    failed = with_fault(train_args(tiny_model_dir, out, "--checkpointing_steps", "2"), "disk_full", 4)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert re.search(r"Could not write checkpoint step_4 to \S+step_4: no space left on device \([\d.]+ [kMGT]?B free on its "
                     r"disk\)\. Nothing partial was kept; the newest checkpoint \S+step_2 is intact", failed.stderr)
    assert "Traceback" not in failed.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]


@pytest.mark.integration
def test_an_unwritable_output_dir_fails_before_loading_anything(tiny_model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = finetune(train_args(tiny_model_dir, blocker / "run"), check=False)
    assert result.returncode == 2
    assert f"--output_dir {blocker / 'run'} cannot be written" in result.stderr
    assert "parameters" not in result.stderr  # the model was never loaded


@pytest.mark.integration
def test_keep_last_n_checkpoints_and_refusing_another_runs_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    finetune(train_args(tiny_model_dir, out, "--checkpointing_steps", "1", "--keep_last_n_checkpoints", "2"))
    assert [p.name for p in complete_checkpoints(out)] == ["step_5", "step_6"]
    other_seed = train_args(tiny_model_dir, out, "--checkpointing_steps", "1")
    other_seed[other_seed.index("--seed") + 1] = "2"
    refused = finetune(other_seed, check=False)
    assert refused.returncode == 2 and "was written by a different run" in refused.stderr
    assert "--seed: checkpoint 1, now 2" in refused.stderr
    forced = finetune([*other_seed, "--force_resume"])
    assert "Resuming" in forced.stderr and "--seed" in forced.stderr


@pytest.mark.multiprocess
def test_zero3_run_killed_and_resumed_matches_the_straight_run(tiny_model_dir, tmp_path):
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
                "--use_deepspeed", "--deepspeed_config_file", str(REPO / ZERO3)]
    straight, out = tmp_path / "straight", tmp_path / "run"
    run([*launcher, "-m", "open_instruct.finetune", *with_cache_dir(train_args(tiny_model_dir, straight))])
    args = train_args(tiny_model_dir, out, "--checkpointing_steps", "3")
    killed = with_fault(args, "kill_after_save", 3, launcher=launcher)
    assert killed.returncode != 0 and [p.name for p in complete_checkpoints(out)] == ["step_3"]
    run([*launcher, "-m", "open_instruct.finetune", *with_cache_dir(args)])
    assert_steps_match(out, straight)
    assert AutoTokenizer.from_pretrained(out).chat_template  # the final model saved after the resume is complete


@pytest.mark.multiprocess
def test_resuming_with_more_processes_keeps_the_global_batches(tiny_model_dir, tmp_path, straight_run):
    """A 1-process checkpoint continued by 2 DDP processes: --global_batch_size fixes the examples of each step,
    so the loss sequence is the 1-process run's (within the summation-order tolerance of test_distributed.py)."""
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, out, "--checkpointing_steps", "3")
    assert with_fault(args, "kill_after_save", 3).returncode == -9
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "open_instruct.finetune"]
    run([*torchrun, *with_cache_dir(args)], env=clean_env(ACCELERATE_USE_CPU="true"))
    assert_steps_match(out, straight_run)
    environment = json.loads((out / "environment.json").read_text())
    assert environment["num_processes"] == 2 and len(environment["nodes"]) == 2  # one entry per rank


@pytest.mark.integration
def test_final_model_is_sharded_safetensors_that_reload_and_stop_at_the_end_of_turn(tiny_model_dir, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from open_instruct.final_model import save_final_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    save_final_model(Accelerator(cpu=True), model, tokenizer, tmp_path, max_shard_size="200KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    assert reloaded.generation_config.eos_token_id in (tokenizer.eos_token_id, [tokenizer.eos_token_id])
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template
    assert not (tmp_path / ".final_model.tmp").exists()
