"""Stopping cleanly: a signal, the end of a wall-clock budget or a dead launcher ends the run between two optimizer
steps with a checkpoint, so the same command continues it exactly.

- Signals (--stop_signals, default SIGTERM SIGINT SIGUSR1): the handler only records the request. Before each
  optimizer step every rank asks `StopRequests.agreed_reason`, one all-reduce, so all ranks stop before the same
  step even when the signal reached one node only, and none waits in a collective the others left. A second SIGINT
  aborts at once, without a checkpoint (exit 130).
- Wall-clock budget (--max_wall_time, and inside a Slurm job the job's end time, asked once from squeue): the run
  stops when the time left is less than the slowest step so far twice over, plus the slowest checkpoint save so far
  (before the first one: its size at 200 MB/s), plus 10 s to exit.
- Orphans: torch's elastic agent (accelerate launch, torchrun) starts each worker in a session of its own, so a
  worker outlives a launcher that was SIGKILLed. Each worker asks the kernel for SIGTERM when its parent dies
  (prctl PR_SET_PDEATHSIG, Linux) and also checks its parent between steps; either way it stops as for a signal.

The trainer then exits with STOPPED_EXIT_CODE, 75 (EX_TEMPFAIL in sysexits.h: a temporary failure, try again).
accelerate launch and torchrun report a worker's 75 as a failed child and exit 1 themselves.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import NoReturn

from open_instruct.ranks import any_rank, end_run

logger = logging.getLogger(__name__)

STOPPED_EXIT_CODE = 75
ABORTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl-C
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
SAVE_BYTES_PER_SECOND = 200e6  # a conservative write speed for the first checkpoint, before one was timed
EXIT_SECONDS = 10.0  # destroying the process group, joining threads, the launcher noticing
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RunStopped(Exception):
    """The run stopped early on request, after saving what it needs to continue; the message says how."""

    exit_code = STOPPED_EXIT_CODE


def parse_duration(text: str) -> float:
    """Seconds of a duration written as 90s, 45m, 4h, 2d, HH:MM:SS or D-HH:MM:SS (Slurm's --time form with
    seconds). A bare number is refused: Slurm reads it as minutes, many tools as seconds."""
    text = text.strip()
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text):
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if match := re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", text):
        days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 45m, 4h, 2d, 23:30:00 or 1-12:00:00")


def parse_slurm_time_left(text: str) -> float | None:
    """squeue's %L (time left): [D-][HH:]MM:SS, or UNLIMITED / NOT_SET / INVALID for no limit (None)."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if match is None:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_deadline(now: float) -> float | None:
    """When this Slurm job reaches its time limit (wall-clock seconds since the epoch), or None outside Slurm, without
    a limit or when squeue can't tell."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if end := os.environ.get("SLURM_JOB_END_TIME"):  # Slurm 23.02+ exports it; older versions need squeue
        return float(end) if end.isdigit() else None
    if shutil.which("squeue") is None:
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    left = parse_slurm_time_left(result.stdout) if result.returncode == 0 else None
    return None if left is None else now + left


def exit_on_parent_death() -> bool:
    """Ask the kernel to send SIGTERM when the parent (the launcher) dies; Linux only."""
    if not sys.platform.startswith("linux"):
        return False
    pr_set_pdeathsig = 1
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM) == 0
    except (OSError, AttributeError):
        return False


class StopRequests:
    """What asks the run to stop early: signals, the wall-clock deadline, a dead launcher. Install it once per
    process, from the main thread, before anything slow."""

    def __init__(self, stop_signals=DEFAULT_STOP_SIGNALS, max_wall_seconds: float | None = None,
                 started: float | None = None, launched_by_agent: bool | None = None, ask_slurm: bool = True):
        self.started = time.time() if started is None else started
        self.signal_name: str | None = None
        self.requested: str | None = None  # a stop the trainer asked for itself (e.g. metrics.jsonl can't be written)
        self.stop_signals = tuple(stop_signals)
        deadlines = [self.started + max_wall_seconds] if max_wall_seconds is not None else []
        slurm_end = slurm_deadline(time.time()) if ask_slurm else None
        if slurm_end is not None:
            deadlines.append(slurm_end)
        self.deadline = min(deadlines) if deadlines else None
        self.deadline_source = ("the Slurm job's time limit" if slurm_end is not None and self.deadline == slurm_end
                                else "--max_wall_time")
        if launched_by_agent is None:
            launched_by_agent = "TORCHELASTIC_RUN_ID" in os.environ
        self.parent = os.getppid() if launched_by_agent else None
        self.slowest_step = 0.0
        self.slowest_save: float | None = None
        self.save_estimate = 0.0
        self._previous_handlers: dict[int, object] = {}

    # --- installing ---------------------------------------------------------------------------------------------
    def install(self) -> StopRequests:
        for name in self.stop_signals:
            number = getattr(signal, name)
            self._previous_handlers[number] = signal.signal(number, self._on_signal)
        if self.parent is not None:
            exit_on_parent_death()
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()

    def _on_signal(self, number: int, _frame) -> None:
        name = signal.Signals(number).name
        if self.signal_name is not None:
            if number == signal.SIGINT:  # the second Ctrl-C: the user does not want to wait for the step
                sys.stderr.write(f"\n{name} again: aborting now, without a checkpoint.\n")
                sys.stderr.flush()
                os._exit(ABORTED_EXIT_CODE)
            return  # a repeated SIGTERM (Slurm and the launcher both send one): the stop is already under way
        self.signal_name = name
        sys.stderr.write(f"\n{name} received: stopping after the current optimizer step, with a checkpoint"
                         f"{' (Ctrl-C again aborts now)' if number == signal.SIGINT else ''}.\n")
        sys.stderr.flush()

    def request(self, reason: str) -> None:
        """Stop at the next step boundary for `reason` (the first request is kept)."""
        self.requested = self.requested or reason

    # --- timing the run, for the wall-clock budget ---------------------------------------------------------------
    def note_step(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def note_save(self, seconds: float) -> None:
        self.slowest_save = max(self.slowest_save or 0.0, seconds)

    def expect_checkpoint_bytes(self, size: int) -> None:
        self.save_estimate = size / SAVE_BYTES_PER_SECOND

    def reserve_seconds(self) -> float:
        """Time to keep in hand before the deadline: two of the slowest steps, a checkpoint save and the exit."""
        save = self.slowest_save if self.slowest_save is not None else self.save_estimate
        return 2 * self.slowest_step + save + EXIT_SECONDS

    # --- deciding -----------------------------------------------------------------------------------------------
    def local_reason(self, now: float | None = None) -> str | None:
        """Why this process wants the run to stop, or None."""
        launcher_gone = self.parent is not None and os.getppid() != self.parent
        if launcher_gone:  # checked here, not in the handler: the kernel sends the parent-death signal before the
            # dying launcher has fully exited, so the handler may still see it as the parent
            return f"stopped because the launcher (pid {self.parent}) is gone"
        if self.signal_name is not None:
            return f"stopped by {self.signal_name}"
        if self.requested is not None:
            return f"stopped because {self.requested}"
        now = time.time() if now is None else now
        if self.deadline is not None and self.deadline - now < self.reserve_seconds():
            left = max(0.0, self.deadline - now)
            return f"stopped {left:.0f} s before {self.deadline_source} (keeping {self.reserve_seconds():.0f} s to " \
                   "save and exit)"
        return None

    def agreed_reason(self, accelerator) -> str | None:
        """Whether the run stops now, decided by all ranks together (every rank must call it at the same point):
        the first rank's reason, or None to go on."""
        reason = self.local_reason()
        if not any_rank(accelerator, reason is not None):
            return None
        if accelerator.num_processes == 1:
            return reason
        from accelerate.utils import gather_object

        reasons = gather_object([reason])
        rank, first = next((rank, text) for rank, text in enumerate(reasons) if text is not None)
        return first if rank == 0 else f"{first} on rank {rank}"


def stop_run(reason: str, steps_done: int, total_steps: int, checkpointer, first_loss: float | None,
             counters) -> NoReturn:
    """Save what the run needs to continue (unless a checkpoint of this step exists), then raise RunStopped on every
    rank: the same command continues the run."""
    if steps_done == 0:
        saved = "nothing was trained yet, so nothing was saved"
    elif checkpointer.last_saved_step == steps_done:
        saved = f"checkpoint {checkpointer.last_saved}"
    else:
        saved = f"checkpoint {checkpointer.save(steps_done, first_loss, counters)}"
    if checkpointer.uploader and (dropped := checkpointer.uploader.drop_queued()):
        logger.warning("%d queued hub upload(s) were cancelled; their files stay on local disk.", dropped)
    end_run(checkpointer.accelerator)
    raise RunStopped(f"{reason} at step {steps_done} of {total_steps}; {saved}; rerun the same command to continue.")


def stop_requests_for(args) -> StopRequests:
    """The trainer's --stop_signals and --max_wall_time; only global rank 0 asks Slurm for the job's end time (the
    ranks agree on stopping anyway, and 64 ranks need not all query the controller)."""
    names = [] if args.stop_signals == ["none"] else args.stop_signals
    budget = parse_duration(args.max_wall_time) if args.max_wall_time else None
    return StopRequests(names, budget, ask_slurm=os.environ.get("RANK", "0") == "0")
