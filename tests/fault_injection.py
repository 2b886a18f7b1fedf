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


def inject() -> None:
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
