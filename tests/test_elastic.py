"""Resuming on another process layout (open_instruct/elastic.py): a checkpoint written by one layout continues on
another, and the next steps match a run that never stopped.

Each case trains 6 steps straight on the source layout, checkpointing at step 3. The resumed run's output directory
holds what a run killed right after that save leaves: checkpoints/step_3 and metrics.jsonl up to step 3
(tests/test_checkpointing.py covers the kill itself). The same command is then run on the target layout, and steps
4 to 6 must match the straight run.

Tolerance: 1e-5 relative on losses, gradient norms and learning rates, and exact token counts (as in
tests/test_distributed.py). Both runs are fp32 and see the same examples in every global batch, whatever the layout
(batching.split_global_batch); what differs is the order in which gradient sums are added across ranks and
micro-steps, about 1e-7 relative per step (the largest difference measured over these cases was 2.7e-7, ZeRO-3 to
one plain process and back). Each mutation (tests/fault_injection.py) moves steps 4 to 6 well outside the bound;
measured: a lost first moment 4.5e-2, each rank loading the next rank's partitions 2.2 (220%), DeepSpeed's shared
step counter left unrepaired 1.4e-3, every group with the first group's settings (weight decay 0.1 on norms) 8.8e-5.

LoRA runs without adapter dropout here: dropout masks are drawn by whichever rank holds an example, so another
layout draws other masks by construction; without dropout the computation is the same.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env, read_metrics, run, train_args, with_cache_dir
from open_instruct.elastic import (
    AS_SAVED,
    TO_DEEPSPEED,
    TO_WHOLE_TENSORS,
    ElasticResumeError,
    Layout,
    how_to_resume,
    optimizer_state_order,
    remove_stale_conversions,
)

pytestmark = pytest.mark.multiprocess

ZERO2 = "configs/ds_configs/stage2_no_offloading_accelerate.conf"
ZERO3 = "configs/ds_configs/stage3_no_offloading_accelerate.conf"
LORA = ["--use_lora", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.0"]
LIGER = ["--use_liger_kernel", "--loss_chunk_size", "7"]


# ----------------------------------------------------------------------------------------------------------------
# Unit
# ----------------------------------------------------------------------------------------------------------------
def test_how_each_layout_change_is_resumed():
    zero3_on = lambda n: Layout(n, 3)  # noqa: E731
    assert how_to_resume(zero3_on(2), zero3_on(2)) == AS_SAVED
    assert how_to_resume(Layout(1, None), Layout(4, None)) == AS_SAVED  # whole tensors load anywhere
    assert how_to_resume(zero3_on(2), zero3_on(4)) == TO_DEEPSPEED
    assert how_to_resume(Layout(8, 2), zero3_on(8)) == TO_DEEPSPEED  # another ZeRO stage, same count
    assert how_to_resume(Layout(1, None), zero3_on(2)) == TO_DEEPSPEED
    assert how_to_resume(zero3_on(2), Layout(1, None)) == TO_WHOLE_TENSORS
    with pytest.raises(ElasticResumeError, match="stage 0"):
        how_to_resume(Layout(2, 0), zero3_on(4))
    assert str(zero3_on(64)) == "64 processes with ZeRO-3" and str(Layout(1, None)) == "1 process without DeepSpeed"


def test_the_optimizer_state_order_follows_the_parameter_groups():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    groups = [{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias, model[1].bias]}]
    optimizer = torch.optim.AdamW(groups)
    assert optimizer_state_order(model, optimizer) == ["0.weight", "1.weight", "0.bias", "1.bias"]


def test_a_conversion_killed_midway_is_cleared_at_the_next_start(tmp_path):
    from open_instruct.checkpointing import remove_unfinished_saves

    (tmp_path / "checkpoints" / "step_3.universal.tmp" / "pytorch_model").mkdir(parents=True)
    assert [p.name for p in remove_unfinished_saves(tmp_path)] == ["step_3.universal.tmp"]


def test_conversions_of_older_checkpoints_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_3", "step_3.universal", "step_6.universal", "step_9.universal", "step_12"):
        (root / name).mkdir(parents=True)
    removed = remove_stale_conversions(tmp_path, 9)
    assert sorted(p.name for p in removed) == ["step_3.universal", "step_6.universal", "step_9.universal"]
    assert sorted(p.name for p in root.iterdir()) == ["step_12", "step_3"]


# ----------------------------------------------------------------------------------------------------------------
# Integration: a checkpoint of one layout, resumed on another
# ----------------------------------------------------------------------------------------------------------------
def command(processes: int, ds_config: str | None, script: str | None = None) -> list[str]:
    entry = [str(REPO / "tests" / script)] if script else ["-m", "open_instruct.finetune"]
    if ds_config is None and processes == 1:
        return [sys.executable, *entry]
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(processes)]
    if ds_config:
        launcher += ["--use_deepspeed", "--deepspeed_config_file", str(REPO / ds_config)]
    return [*launcher, *entry]


def train(model_dir, out: Path, processes: int, ds_config: str | None, *extra: str, fault: str | None = None):
    args = train_args(model_dir, out, "--checkpointing_steps", "3", "--weight_decay", "0.1", *extra)
    env = clean_env(FAULT=fault) if fault else None
    return run([*command(processes, ds_config, "fault_injection.py" if fault else None), *with_cache_dir(args)],
               env=env)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """straight(processes, ds_config, *extra): the 6 steps without interruption on that layout (run once each)."""
    runs = {}

    def get(processes: int, ds_config: str | None, *extra: str) -> Path:
        key = (processes, ds_config, extra)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("straight")
            train(tiny_model_dir, runs[key], processes, ds_config, *extra)
        return runs[key]

    return get


def killed_after_step_3(straight_dir: Path, out: Path) -> Path:
    """What a run killed right after saving step 3 leaves in its output directory."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight_dir / "checkpoints" / "step_3", out / "checkpoints" / "step_3")
    lines = (straight_dir / "metrics.jsonl").read_text().splitlines()[:3]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return out


def largest_difference(resumed_dir: Path, reference_dir: Path) -> float:
    """The largest relative difference of loss, gradient norm or learning rate over the steps after the resume
    (every step logged once, in order, with the reference's token counts)."""
    resumed, reference = read_metrics(resumed_dir), read_metrics(reference_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(1, 7))
    worst = 0.0
    for new, old in zip(resumed[3:], reference[3:]):
        assert new["total_tokens"] == old["total_tokens"]
        for key in ("train_loss", "grad_norm", "learning_rate"):
            worst = max(worst, abs(new[key] - old[key]) / abs(old[key]))
    return worst


def resume_on(tiny_model_dir, tmp_path, source: Path, processes: int, ds_config: str | None, *extra: str,
              fault: str | None = None) -> tuple[Path, str]:
    out = killed_after_step_3(source, tmp_path / "resumed")
    result = train(tiny_model_dir, out, processes, ds_config, *extra, fault=fault)
    return out, result.stdout + result.stderr


LAYOUT_CHANGES = {
    # id: (source processes, source config, target processes, target config, flags of both, flags of the target)
    "zero3-2-to-1": (2, ZERO3, 1, ZERO3, [], []),
    "zero3-1-to-2": (1, ZERO3, 2, ZERO3, [], []),
    "zero3-2-to-4": (2, ZERO3, 4, ZERO3, [], []),
    "zero3-2-to-plain-1": (2, ZERO3, 1, None, [], []),
    "plain-1-to-zero3-2": (1, None, 2, ZERO3, [], []),
    "zero2-2-to-zero3-1": (2, ZERO2, 1, ZERO3, [], []),
    "zero3-2-to-zero2-1": (2, ZERO3, 1, ZERO2, [], []),
    "zero3-2-to-1-other-accumulation": (2, ZERO3, 1, ZERO3, [], ["--gradient_accumulation_steps", "4"]),
    "lora-zero3-2-to-plain-1": (2, ZERO3, 1, None, LORA, []),
    "liger-zero3-2-to-1": (2, ZERO3, 1, ZERO3, LIGER, []),
}


@pytest.mark.parametrize("change", LAYOUT_CHANGES)
def test_a_checkpoint_resumes_on_another_layout_as_if_it_never_stopped(tiny_model_dir, tmp_path, straight, change):
    source_processes, source_config, processes, ds_config, both, target_only = LAYOUT_CHANGES[change]
    reference = straight(source_processes, source_config, *both)
    out, log = resume_on(tiny_model_dir, tmp_path, reference, processes, ds_config, *both, *target_only)
    assert largest_difference(out, reference) < 1e-5
    source, target = Layout(source_processes, _stage(source_config)), Layout(processes, _stage(ds_config))
    assert f"Resumed step_3, written by {source}, on {target}" in log
    assert "to a universal checkpoint in" in log
    state = json.loads((out / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert (state["identity"]["num_processes"], state["identity"]["zero_stage"]) == (processes, _stage(ds_config))
    assert not (out / "checkpoints" / "step_3.universal").exists()  # removed once step_6 was saved


def _stage(ds_config: str | None) -> int | None:
    return None if ds_config is None else json.loads((REPO / ds_config).read_text())["zero_optimization"]["stage"]


def test_a_conversion_is_reused_and_a_damaged_one_is_made_again(tiny_model_dir, tmp_path, straight):
    """A run preempted again before its next checkpoint reuses the conversion; a damaged one is never used."""
    reference = straight(2, ZERO3)
    out = killed_after_step_3(reference, tmp_path / "resumed")
    args = ["--max_train_steps", "3"]  # the flag comes last and wins: a run that ends at the resumed step
    first = train(tiny_model_dir, out, 1, ZERO3, *args)
    universal = out / "checkpoints" / "step_3.universal"
    assert "to a universal checkpoint in" in first.stderr and (universal / "COMPLETED").is_file()
    second = train(tiny_model_dir, out, 1, ZERO3, *args)
    assert "Reusing" in second.stderr and "to a universal checkpoint in" not in second.stderr
    moment = next(universal.glob("pytorch_model/zero/*/exp_avg.pt"))
    moment.write_bytes(moment.read_bytes()[:-8] + b"\0" * 8)
    third = train(tiny_model_dir, out, 1, ZERO3, *args)
    assert "is damaged" in third.stderr and "to a universal checkpoint in" in third.stderr


@pytest.mark.parametrize("mutation, processes", [("drop_moment", 1), ("wrong_shard", 2), ("shared_step", 1),
                                                 ("first_group_settings", 1)])
def test_each_mutation_of_the_resharding_is_caught(tiny_model_dir, tmp_path, straight, mutation, processes):
    """The parity bound above is tight enough to see each fault (their measured effects are in the docstring)."""
    source = straight(1 if processes == 2 else 2, ZERO3)
    out, _ = resume_on(tiny_model_dir, tmp_path, source, processes, ZERO3, fault=mutation)
    assert largest_difference(out, source) > 1e-5
