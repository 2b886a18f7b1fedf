"""Writes that are never half-done, and one clear error when the disk cannot take them.

The trainer's writes that matter (checkpoints, the final model, the LoRA adapter and merged model, the tokenized
cache, metrics.jsonl and the run records) go through `failed_write`, which turns the libraries' own failures into a
StorageError: OSError (a full disk is ENOSPC), safetensors' SafetensorError (not an OSError), and torch.save's
RuntimeError from its zip writer ("unexpected pos ..." on a full disk). The message names what was being written,
where, the free space there and what is still intact, and the temporary folder of the write is removed first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

# torch.save reports a failed write through its zip writer (caffe2's inline_container) as a RuntimeError.
TORCH_WRITE_FAILURE = ("inline_container", "PytorchStreamWriter", "file write failed")


class StorageError(RuntimeError):
    """A file could not be written; the message names it, the free space and what is intact."""


def is_write_failure(error: BaseException) -> bool:
    """Whether a library's exception is a failed write (full disk, quota, I/O error) rather than a bug."""
    if isinstance(error, OSError):
        return True
    if type(error).__name__ == "SafetensorError":  # safetensors' Rust error type; importing it would cost a load
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in TORCH_WRITE_FAILURE)


def existing_parent(path: str | Path) -> Path:
    """The path itself or its nearest existing parent (the disk a not-yet-created folder will be on)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def size_text(count: float) -> str:
    """Bytes for people: 3.8 MB, 15.20 GB (decimal units, as disk tools and datasheets use)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}" if unit in ("TB", "GB") else f"{count / scale:.1f} {unit}"
    return f"{int(count)} B"


def free_space_problem(path: str | Path, needed: int, what: str) -> str | None:
    """Why `what` (about `needed` bytes) cannot be written under `path`, or None when the disk has room."""
    free = free_bytes(path)
    if free >= needed:
        return None
    return f"{what} needs about {size_text(needed)} but the disk of {existing_parent(path)} has {size_text(free)} free"


def cause_of(error: BaseException) -> str:
    """The reason of a failed write in a few words (a full disk the same way whichever library reported it)."""
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error) \
            or "os error 28" in str(error):
        return "no space left on device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def write_failure_message(what: str, path: str | Path, error: BaseException | str, intact: str) -> str:
    cause = error if isinstance(error, str) else cause_of(error)
    free = "" if cause.endswith(" free") else f" ({size_text(free_bytes(path))} free on its disk)"
    return (f"Could not write {what} to {path}: {cause}{free}. Nothing partial was kept; {intact}. Free space and "
            "run the same command again.")


@contextlib.contextmanager
def failed_write(what: str, path: str | Path, intact: str | Callable[[], str], cleanup: Path | None = None
                 ) -> Iterator[None]:
    """Turn a failed write inside the block into a StorageError, after removing `cleanup` (the write's temporary
    folder). `intact` says what the user still has (a callable when it must be looked up after the failure)."""
    try:
        yield
    except Exception as error:
        if not is_write_failure(error):
            raise
        if cleanup is not None:
            remove(cleanup)
        raise StorageError(write_failure_message(what, path, error, intact() if callable(intact) else intact)) from None


def write_text(path: str | Path, text: str, what: str, intact: str | Callable[[], str]) -> None:
    """Write a small file whole or not at all (a temporary file beside it, then a rename); a failure is a
    StorageError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with failed_write(what, path, intact, cleanup=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def remove(path: Path) -> None:
    """Delete a file or folder if it is there; a failure to delete is not worth a second error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def move_files_into(tmp: Path, output: Path) -> None:
    """Move a complete temporary folder's files next to the run's logs, then remove it."""
    for file in tmp.iterdir():
        os.replace(file, output / file.name)
    tmp.rmdir()


def replace_folder(tmp: Path, final: Path) -> None:
    """Put a complete temporary folder in the place of `final` (removing an older `final` first)."""
    remove(final)
    os.replace(tmp, final)
