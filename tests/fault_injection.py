"""Runs the trainer with a fault injected at a checkpoint save, as a crash or a full disk would hit a real run.

    FAULT=kill_after_save FAULT_STEP=3 python tests/fault_injection.py <finetune flags>
    accelerate launch ... tests/fault_injection.py <finetune flags>      (every rank injects the fault)

FAULT:
    kill_after_save   SIGKILL right after checkpoint FAULT_STEP is complete (the process dies mid-run).
    kill_during_save  SIGKILL after every rank wrote its part of checkpoint FAULT_STEP, before it is marked complete.
    disk_full         the write of checkpoint FAULT_STEP fails with ENOSPC (No space left on device).
    slow_steps        every optimizer step takes FAULT_SECONDS longer, so a test can signal a run mid-way.
    fill_disk         after optimizer step FAULT_STEP a file (OUTPUT_DIR/filler) fills the disk of the output
                      directory, so every later write meets a real ENOSPC; with FAULT_SKIP_SPACE_CHECKS=1 the
                      trainer's own free-space checks are skipped, so the libraries' writes fail instead.

Mutations of resuming on another layout (open_instruct/elastic.py), which the parity tests must catch:
    drop_moment       the universal conversion loses Adam's first moment (every exp_avg zeroed).
    wrong_shard       DeepSpeed's universal load gives each rank the next rank's partition of every tensor.
    shared_step       the repair of DeepSpeed's shared step counter is skipped.
    first_group_settings  the repair of the parameter groups' settings is skipped (all take the first group's).
Mutations of sequence parallelism (open_instruct/sequence_parallel.py), which its parity test must catch:
    sp_shift_after_split  every rank shifts its piece's targets once more (open-instruct's #1549 double shift).
    sp_count_per_rank     the step's trained-token count (batching.StepCounts, the loss normalizer) counts the whole
                          row once per rank of its sequence-parallel group, so each token is counted N times.
Nothing here is imported by the trainer: the faults patch it from outside.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

from accelerate import Accelerator

import open_instruct.finetune as finetune

FAULT, STEP = os.environ["FAULT"], int(os.environ.get("FAULT_STEP", "0"))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fill_disk(folder: Path) -> None:
    with (folder / "filler").open("wb", buffering=0) as handle:  # unbuffered: closing it has nothing left to write
        for size in (1 << 20, 4096, 1):  # big blocks first, then whatever is left
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                pass


def after_step(step: int, action) -> None:
    """Run `action` right after optimizer step `step` (counting this process's steps from 1)."""
    train_step, done = finetune.train_step, [0]

    def counted_train_step(*args, **kwargs):
        result = train_step(*args, **kwargs)
        done[0] += 1
        if done[0] == step:
            action()
        return result

    finetune.train_step = counted_train_step


def mutate_elastic_resume() -> None:
    import torch

    import open_instruct.elastic as elastic

    if FAULT == "drop_moment":
        convert = elastic.run_ds_to_universal

        def convert_without_first_moment(source, target):
            convert(source, target)
            for path in Path(target, "zero").glob("*/exp_avg.pt"):
                stored = torch.load(path, weights_only=False)
                tensor = stored["param"] if isinstance(stored, dict) else stored
                torch.save(torch.zeros_like(tensor), path)

        elastic.run_ds_to_universal = convert_without_first_moment
    elif FAULT == "wrong_shard":
        import deepspeed.comm as dist
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        load, get_rank = DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state, dist.get_rank

        def load_next_ranks_partition(self, *args, **kwargs):
            dist.get_rank = lambda group=None: (get_rank(group=group) + 1) % dist.get_world_size(group=group)
            try:
                return load(self, *args, **kwargs)
            finally:
                dist.get_rank = get_rank

        DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state = load_next_ranks_partition
    elif FAULT == "shared_step":
        elastic.separate_step_counters = lambda engine: None
    else:
        assert FAULT == "first_group_settings", FAULT
        elastic.restore_group_settings = lambda optimizer, universal: None


def mutate_sequence_parallel() -> None:
    import dataclasses

    import torch

    if FAULT == "sp_count_per_rank":
        of = finetune.StepCounts.of

        def counted_per_rank(cls, split, lengths, trained_lengths, padding_free, rank, sequence_parallel=1):
            counts = of(split, lengths, trained_lengths, padding_free, rank, sequence_parallel)
            return dataclasses.replace(counts, trained=counts.trained * sequence_parallel)

        finetune.StepCounts.of = classmethod(counted_per_rank)
        return
    shard_row = finetune.shard_row

    def mutated_shard_row(batch, parts, index, pad_token_id):
        piece = shard_row(batch, parts, index, pad_token_id)
        assert FAULT == "sp_shift_after_split", FAULT
        targets = piece["target_ids"]
        piece["target_ids"] = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], -100)], dim=1)
        piece["num_trained_tokens"] = int((piece["target_ids"] != -100).sum())
        return piece

    finetune.shard_row = mutated_shard_row


def inject() -> None:
    if FAULT in ("sp_shift_after_split", "sp_count_per_rank"):
        mutate_sequence_parallel()
        return
    if FAULT in ("drop_moment", "wrong_shard", "shared_step", "first_group_settings"):
        mutate_elastic_resume()
        return
    if FAULT == "fill_disk":
        output = Path(sys.argv[sys.argv.index("--output_dir") + 1])
        after_step(STEP, lambda: fill_disk(output))
        if os.environ.get("FAULT_SKIP_SPACE_CHECKS") == "1":
            import open_instruct.checkpointing as checkpointing
            import open_instruct.final_model as final_model

            checkpointing.free_space_problem = final_model.free_space_problem = lambda *args: None
        return
    if FAULT == "slow_steps":
        train_step, seconds = finetune.train_step, float(os.environ["FAULT_SECONDS"])

        def slow_train_step(*args, **kwargs):
            result = train_step(*args, **kwargs)
            time.sleep(seconds)
            return result

        finetune.train_step = slow_train_step
        return
    if FAULT == "kill_after_save":
        save = finetune.Checkpointer.save

        def save_then_die(self, steps_done, *args, **kwargs):
            path = save(self, steps_done, *args, **kwargs)
            if steps_done == STEP:
                die()
            return path

        finetune.Checkpointer.save = save_then_die
        return
    save_state = Accelerator.save_state

    def faulty_save_state(self, output_dir=None, **kwargs):
        if not str(output_dir).endswith(f"step_{STEP}.tmp"):
            return save_state(self, output_dir, **kwargs)
        if FAULT == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device", str(output_dir))
        result = save_state(self, output_dir, **kwargs)
        self.wait_for_everyone()  # every rank's part is on disk: the save is as far along as it gets unmarked
        die()
        return result

    assert FAULT in ("kill_during_save", "disk_full"), FAULT
    Accelerator.save_state = faulty_save_state


if __name__ == "__main__":
    inject()
    finetune.cli()
