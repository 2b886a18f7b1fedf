"""Decisions every rank must take together, so that no rank waits forever in a collective the others never reach.

A failure or a stop request seen by one rank (a full disk on the main process, a signal that reached one node) is
shared with `any_rank`, a sum all-reduce that every rank calls at the same point of the run; each rank then acts on
the same answer. `main_process_work` runs work that only the main process does (writing a file) and raises on every
rank when it failed there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def any_rank(accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any rank. Every rank must call it at the same point (it is a collective)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item())


def main_process_work(accelerator, work: Callable[[], T], errors: tuple[type[BaseException], ...],
                      elsewhere: Callable[[], BaseException]) -> T | None:
    """Run `work` on the main process; an error of a type in `errors` there is raised on the main process, and
    `elsewhere()` on every other rank, so all ranks stop together. Every rank must call it."""
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except errors as error:
            failure = error
    if any_rank(accelerator, failure is not None):
        raise failure if failure is not None else elsewhere()
    return result


def shut_down_process_group(accelerator) -> None:
    """Destroy the process group before the interpreter exits: left to exit-time destructors, the communication
    threads were seen to abort a ZeRO-3 rank ("terminate called without an active exception") after a complete run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
