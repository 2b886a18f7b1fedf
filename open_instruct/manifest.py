"""Manifests: the size and SHA-256 of every file of a finished folder (a checkpoint, a tokenized cache), written just
before the folder's COMPLETED marker and checked before the folder is used. A file that went missing, was truncated
or had bytes changed (a failing disk, an interrupted copy, a careless edit) is then named, instead of crashing the run
later with an error about another file, or of training on it silently.

    manifest.json   {"version": 1, "files": {"model.safetensors": {"size": 3432976, "sha256": "9f2c..."}, ...}}
    COMPLETED       {"manifest": "manifest.json", ...}: a folder whose marker names a manifest must have it

Checking compares sizes first (a stat per file: a missing or truncated file costs no reading) and then checksums
(every byte read). Hashing an 8B model's checkpoint (~100 GB of state) takes minutes on one process, so a run with
an accelerator spreads it: each rank hashes a disjoint share of the files, balanced by bytes, and the hashes are
all-gathered, so every rank ends up with the same answer and takes the same branch (none waits on the others).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
COMPLETED_MARKER = "COMPLETED"
_BLOCK = 1 << 20  # 1 MiB reads: large enough to hash at disk speed, small enough to keep memory flat


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative POSIX paths, sorted) with its size; the marker and the manifest excluded."""
    files = (p for p in Path(folder).rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETED_MARKER))
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(files)}


# ----------------------------------------------------------------------------------------------------------------
# Hashing, alone or spread over a run's ranks
# ----------------------------------------------------------------------------------------------------------------
def share_of(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """Rank `rank`'s share of `world` disjoint shares of the files, balanced by bytes: the largest file goes first, each
    to the share with the fewest bytes so far. A function of `sizes` only, so every rank computes the same split."""
    shares: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in sorted(sizes, key=lambda name: (-sizes[name], name)):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += sizes[name]
    return sorted(shares[rank])


def file_hashes(folder: Path, names) -> dict[str, str | None]:
    """SHA-256 of each named file; None for a file that cannot be read (it vanished, or no permission)."""
    hashes: dict[str, str | None] = {}
    for name in names:
        try:
            hashes[name] = sha256_file(Path(folder) / name)
        except OSError:
            hashes[name] = None
    return hashes


def from_main_process(accelerator, compute):
    """`compute()` run on global rank 0 only and its result sent to every rank (`compute()` itself without an
    accelerator): the ranks then decide on the same data even where a shared filesystem shows each node a different
    listing for a moment."""
    if accelerator is None:
        return compute()
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([compute() if accelerator.is_main_process else None])[0]


def spread_hashes(folder: Path, sizes: dict[str, int], accelerator=None) -> dict[str, str | None]:
    """Every file's hash; with an accelerator each rank hashes its share and every rank receives all of them (every
    rank must call it)."""
    if accelerator is None:
        return file_hashes(folder, sizes)
    from accelerate.utils import gather_object

    mine = file_hashes(folder, share_of(sizes, accelerator.process_index, accelerator.num_processes))
    return {name: digest for part in gather_object([mine]) for name, digest in part.items()}


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def record_manifest(folder: Path, accelerator=None) -> None:
    """Write `folder`'s manifest, before its COMPLETED marker (with an accelerator: every rank calls it, rank 0
    lists and writes)."""
    sizes = from_main_process(accelerator, lambda: file_sizes(folder))
    hashes = spread_hashes(folder, sizes, accelerator)
    if accelerator is None or accelerator.is_main_process:
        files = {name: {"size": size, "sha256": hashes[name]} for name, size in sizes.items()}
        (Path(folder) / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def mark_complete(folder: Path, **record) -> None:
    """The COMPLETED marker, naming the manifest: from then on a folder without its manifest counts as damaged."""
    (Path(folder) / COMPLETED_MARKER).write_text(json.dumps({"manifest": MANIFEST, **record}))


# ----------------------------------------------------------------------------------------------------------------
# Checking
# ----------------------------------------------------------------------------------------------------------------
def _marker_names_manifest(folder: Path) -> bool:
    try:
        return json.loads((folder / COMPLETED_MARKER).read_text()).get("manifest") == MANIFEST
    except (OSError, ValueError, AttributeError):  # no marker, or an older one (empty, or without the key)
        return False


def read_manifest(folder: Path) -> tuple[dict[str, tuple[int, str]] | None, list[str]]:
    """(file -> (size, sha256), problems). (None, []): the folder was written before manifests existed."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return None, ([f"{MANIFEST}: missing"] if _marker_names_manifest(folder) else [])
    try:
        entries = json.loads((folder / MANIFEST).read_text())["files"]
        return {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in entries.items()}, []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return None, [f"{MANIFEST}: unreadable ({type(error).__name__}: {error})"]


def size_problems(folder: Path, files: dict[str, tuple[int, str]]) -> list[str]:
    """What a stat of each file shows: missing, or another size than recorded."""
    problems = []
    for name, (expected, _) in files.items():
        try:
            size = (Path(folder) / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != expected:
            problems.append(f"{name}: size {size}, expected {expected}")
    return problems


def checksum_problems(files: dict[str, tuple[int, str]], hashes: dict[str, str | None]) -> list[str]:
    return [f"{name}: {'cannot be read' if hashes.get(name) is None else 'checksum differs'}"
            for name, (_, expected) in files.items() if hashes.get(name) != expected]


def cheap_check(folder: Path) -> tuple[dict[str, tuple[int, str]] | None, list[str]]:
    """(the manifest, what is wrong without reading the files): the manifest itself, then every file's size."""
    files, problems = read_manifest(folder)
    return files, problems or (size_problems(folder, files) if files is not None else [])


def folder_problems(folder: Path, accelerator=None) -> list[str] | None:
    """What is wrong with `folder`: [] when every file matches its manifest, None when it has no manifest to check
    against (written before manifests existed). With an accelerator every rank calls it and gets the same answer:
    rank 0 reads the manifest and compares sizes, then every rank hashes its share."""
    files, problems = from_main_process(accelerator, lambda: cheap_check(folder))
    if problems or files is None:
        return problems or None
    sizes = {name: size for name, (size, _) in files.items()}
    return checksum_problems(files, spread_hashes(folder, sizes, accelerator))


def describe(problems: list[str], limit: int = 3) -> str:
    """The first few problems on one line (a damaged 64-rank checkpoint may list 64 shards)."""
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
