"""The cache of tokenized mixtures: its key, writing it crash-safely, and loading it only when it is intact.

`--dataset_local_cache_dir` holds one folder per key. The key covers the mixture spec, each source's identity (hub
revision, content hash of local files, synthetic task contents), the tokenizer and chat template, the masking and
truncation options, the seed and CACHE_VERSION. A cache is written to a unique temporary folder with a manifest of its
files' checksums (open_instruct/manifest.py), marked COMPLETED and renamed into place, so a killed prepare never
leaves a cache that looks complete. Loading checks the checksums first: a damaged cache (or one written before caches
had manifests) is set aside and tokenized again, or, with `--dataset_cache_on_damage stop`, stops the run.

Shared by the prepare_data entry point, the trainer and the evaluation (which reads its eval set through it); it
imports neither of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from open_instruct import synthetic
from open_instruct.data import (
    SYNTHETIC_PREFIX,
    DataError,
    EncodeOptions,
    MixerItem,
    SourceStats,
    TokenizedMixture,
    build_mixture,
    local_files,
    resolve_mixture,
)
from open_instruct.manifest import (
    COMPLETED_MARKER,
    describe,
    folder_problems,
    mark_complete,
    record_manifest,
    sha256_file,
)
from open_instruct.storage import failed_write

logger = logging.getLogger(__name__)
CACHE_VERSION = "4"  # bump when the meaning of a cached example changes


def encode_options(args) -> EncodeOptions:
    return EncodeOptions(args.max_seq_length, args.train_on, args.truncation, args.add_bos, args.train_reasoning)


# ----------------------------------------------------------------------------------------------------------------
# The cache key
# ----------------------------------------------------------------------------------------------------------------
def source_fingerprint(item: MixerItem) -> str:
    """What identifies a source's contents: file hashes, the hub revision (resolved to a commit when online)."""
    if item.kind == "local":
        return json.dumps([[str(f), sha256_file(f)] for f in local_files(Path(item.name))])
    if item.kind == "synthetic":
        rows = synthetic.load_task(item.name[len(SYNTHETIC_PREFIX):], item.split)
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    repo, _, revision = item.name.partition("@")
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo, revision=revision or None).sha or revision or "main"
    except Exception:  # offline or no access: the pinned revision name is the best identity we have
        return revision or "main"


def tokenizer_fingerprint(tokenizer) -> str:
    fast = getattr(tokenizer, "is_fast", False)
    backend = tokenizer.backend_tokenizer.to_str() if fast else repr(tokenizer.get_vocab())
    parts = [type(tokenizer).__name__, backend, tokenizer.chat_template or "", str(tokenizer.bos_token),
             str(tokenizer.eos_token), str(tokenizer.pad_token)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(items: list[MixerItem], tokenizer, args) -> str:
    spec = {
        "version": CACHE_VERSION,
        "sources": [{**item.spec(), "fingerprint": source_fingerprint(item)} for item in items],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": vars(encode_options(args)),
        "skip_bad_rows": args.skip_bad_rows,
        "max_unmaskable_fraction": args.max_unmaskable_fraction,
        "seed": args.seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------------
# Write, check, load
# ----------------------------------------------------------------------------------------------------------------
def _load(path: Path, key: str) -> TokenizedMixture:
    import datasets

    stats = [SourceStats(**s) for s in json.loads((path / "stats.json").read_text())]
    return TokenizedMixture(datasets.load_from_disk(str(path / "dataset")), stats, key)


def _save(path: Path, dataset, stats: list[SourceStats]) -> None:
    """Write into a unique temporary folder, then rename: readers see a complete cache or none."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    intact = "the data sources are untouched and nothing was trained yet"
    try:
        with failed_write("the tokenized cache", path, intact, cleanup=tmp):
            dataset.save_to_disk(str(tmp / "dataset"))
            (tmp / "stats.json").write_text(json.dumps([vars(s) for s in stats], indent=2))
            record_manifest(tmp)
            mark_complete(tmp)
            if path.exists() and not (path / COMPLETED_MARKER).exists():
                shutil.rmtree(path)  # an incomplete folder (not ours: we never leave one) must not block the cache
            try:
                os.replace(tmp, path)
            except OSError:  # another process finished the same cache first: keep theirs
                if not (path / COMPLETED_MARKER).exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_is_intact(path: Path, on_damage: str) -> bool:
    """Whether the cache at `path` matches its manifest. Otherwise it is discarded, to be tokenized again; or, for a
    damaged one with `on_damage` 'stop', the run stops. One written before caches had manifests cannot be checked:
    rebuilding it is cheap and safe, so that happens whatever `on_damage` says."""
    problems = folder_problems(path)
    if problems == []:
        return True
    if problems is None:
        logger.warning("The tokenized cache %s has no manifest (written before caches were verified): tokenizing "
                       "the mixture again.", path)
    elif on_damage == "stop":
        raise DataError(f"The tokenized cache {path} is damaged ({describe(problems)}). Delete it to tokenize again, "
                        "or run with --dataset_cache_on_damage rebuild.")
    else:
        logger.warning("The tokenized cache %s is damaged (%s): tokenizing the mixture again.", path,
                       describe(problems))
    _discard(path)
    return False


def _discard(path: Path) -> None:
    """Rename the cache out of the way, then delete it: a concurrent reader sees the whole folder or none, and a run
    that set it aside first (the rename then finds nothing) is no error."""
    aside = path.with_name(f"{path.name}.damaged-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def get_mixture(args, tokenizer, log=print, verify: bool = True) -> tuple[TokenizedMixture, str]:
    """The tokenized mixture for these args: from the cache when it is there (and, with `verify`, intact), else built
    (and cached). `verify=False` is for processes that load after one that verified the same cache."""
    items, key, path = _location(args, tokenizer)
    options = encode_options(args)
    if not args.dataset_skip_cache and (path / COMPLETED_MARKER).exists():
        if not verify or cache_is_intact(path, args.dataset_cache_on_damage):
            log(f"Loading the tokenized mixture from {path}")
            return _load(path, key), str(path)
    dataset, stats = build_mixture(items, tokenizer, options, args.seed, args.skip_bad_rows,
                                   args.max_unmaskable_fraction, args.dataset_num_proc)
    if args.dataset_skip_cache:
        return TokenizedMixture(dataset, stats, key), ""
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, dataset, stats)
    log(f"Cached the tokenized mixture in {path}")
    return _load(path, key), str(path)


def _location(args, tokenizer) -> tuple[list[MixerItem], str, Path]:
    """The mixture's sources, its cache key and the folder its cache has (or would have)."""
    items = resolve_mixture(args)
    key = cache_key(items, tokenizer, args)
    return items, key, Path(args.dataset_local_cache_dir) / key


def cached_mixture(args, tokenizer) -> tuple[TokenizedMixture | None, str]:
    """(the mixture a run of these args would load, its folder) when its cache is complete, else (None, the folder
    it would have). Neither tokenizes nor verifies checksums: for a plan (mason's time plan) that reads the examples'
    lengths before any job runs."""
    _, key, path = _location(args, tokenizer)
    if args.dataset_skip_cache or not (path / COMPLETED_MARKER).exists():
        return None, str(path)
    return _load(path, key), str(path)
