"""One run per output directory: OUTPUT_DIR/run.lock names the run that holds it.

Two runs writing into one directory interleave metrics.jsonl and write into each other's checkpoint folders, so a
second run is refused with a message naming the holder (host, pid, start time, Slurm job). The lock is a JSON file
created with O_EXCL (atomic, also on NFS v3+), written by global rank 0 only. A lock whose holder is gone is taken
over with a warning:
- on the same host, when its pid is not running or now belongs to another process (a different start time);
- from the same Slurm job, requeued (Slurm keeps the job id and counts SLURM_RESTART_COUNT up);
- on another host, when its lease expired: the holder touches the file every HEARTBEAT_SECONDS from a background
  thread, and a lock untouched for LEASE_SECONDS belongs to a run that died (a node that went away).
The lock is removed when the run ends, however it ends short of a SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 60.0
LEASE_SECONDS = 600.0


class RunLockError(RuntimeError):
    """Another run holds the output directory; the message names it and what to do."""


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc/PID/stat field 22): tells a pid's reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after the command name, which may hold spaces


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


@dataclass
class Holder:
    """Who holds the lock."""

    host: str
    pid: int
    started: str
    process_start: int | None = None
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def this_process(cls) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(), started=datetime.now().isoformat(timespec="seconds"),
                   process_start=process_start_ticks(os.getpid()), slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                   slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT") or 0))

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}, started {self.started}{job}"


def gone_reason(holder: Holder, me: Holder, age_seconds: float) -> str | None:
    """Why the holder of a lock is no longer running, or None when it may still be."""
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id and \
            holder.slurm_restart_count != me.slurm_restart_count:
        return f"Slurm requeued job {holder.slurm_job_id} (restart {me.slurm_restart_count})"
    if holder.host == me.host:
        if not pid_running(holder.pid):
            return f"pid {holder.pid} is not running"
        if holder.process_start is not None and process_start_ticks(holder.pid) != holder.process_start:
            return f"pid {holder.pid} now belongs to another process"
        return None
    if age_seconds > LEASE_SECONDS:
        return f"its lease expired ({age_seconds / 60:.0f} min without a heartbeat from host {holder.host})"
    return None


class RunLock:
    """The output directory's lock, held by this process from `acquire` to `release`."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.me = Holder.this_process()
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or take it over from a run that is gone; RunLockError when a live run holds it."""
        for _ in range(3):  # another starting run may take a stale lock between our look and our try
            if self._create():
                self._start_heartbeat()
                return self
            holder, age = self._read()
            if holder is None:
                if age < 10.0:  # being written right now by a run that just created it
                    time.sleep(0.5)
                    continue
                reason = "the lock file is unreadable"
            else:
                reason = gone_reason(holder, self.me, age)
                if reason is None:
                    raise RunLockError(
                        f"--output_dir {self.path.parent} is in use by another run ({holder.describe()}). Wait for "
                        f"it to finish or stop it, or use another --output_dir. If that run is gone, delete "
                        f"{self.path}.")
            if self._set_aside(holder.token if holder else None):
                logger.warning("Took over %s from a run that is gone (%s): %s.", self.path,
                               holder.describe() if holder else "unknown holder", reason)
        raise RunLockError(f"Could not take {self.path}: other runs keep taking it. Start one run per --output_dir.")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        holder, _ = self._read()
        if holder is not None and holder.token == self.me.token:
            with contextlib.suppress(OSError):
                self.path.unlink()

    # --- internals ----------------------------------------------------------------------------------------------
    def _create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(asdict(self.me), indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _read(self) -> tuple[Holder | None, float]:
        """The holder (None when the file is missing, empty or damaged) and the lock's age since its last touch."""
        try:
            age = time.time() - self.path.stat().st_mtime
            return Holder(**json.loads(self.path.read_text())), age
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError, TypeError):
            return None, age

    def _set_aside(self, token: str | None) -> bool:
        """Move the dead run's lock (the one with `token`) out of the way. Should another starting run have replaced
        it with its own fresh lock meanwhile, that one is put back and the caller looks again."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text()).get("token")
        except (OSError, ValueError, AttributeError):
            moved = None
        if token is not None and moved != token:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # fails if yet another run holds the path now; that one stays
        with contextlib.suppress(OSError):
            aside.unlink()
        return token is None or moved == token

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop_heartbeat.wait(HEARTBEAT_SECONDS):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._heartbeat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()
