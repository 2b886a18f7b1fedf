"""Decisions every rank must take together, so that no rank waits forever in a collective the others never reach.

A failure or a stop request seen by one rank (a full disk on the main process, a signal that reached one node) is
shared with `any_rank`, a sum all-reduce that every rank calls at the same point of the run; each rank then acts on
the same answer. `main_process_work` runs work that only the main process does (writing a file) and raises on every
rank when it failed there.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

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


def end_run(accelerator) -> None:
    """The end of a run: the trackers finish, then every rank waits for the others. The process group itself is left
    for the process's exit (`exit_process`), which skips its teardown; so this replaces accelerate's end_training(),
    which destroys the group.

    Tearing gloo's process group down in a finished run failed two ways under load, each seen in our multi-process
    tests: a rank aborting at interpreter exit ("terminate called without an active exception") and a deadlock, where
    the main thread joined a gloo worker thread while holding the GIL that the worker needed to free a finished
    collective's tensor (the group's C++ destructor runs wherever its last reference is dropped: once the group is
    destroyed, that is when the DDP model is freed at the end of `train`).
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. One that took part in a process group exits at once (os._exit), after flushing
    what it wrote, so that no destructor tears the communication threads down (see end_run); the
    run's files, lock and trackers are finished before this is called."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
