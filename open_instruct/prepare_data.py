"""Tokenize the training mixture into a cache (Arrow, via datasets) without touching a GPU; finetune.py reuses it.

    python -m open_instruct.prepare_data --model_name_or_path output/tiny-llama \
        --dataset_mixer_list synthetic:spelling 1.0 --audit_file output/audit.jsonl

It takes the same flags as open_instruct.finetune (a YAML config too), so the exact command of a training run,
with `finetune` replaced by `prepare_data`, fills the cache that run will hit. The cache key covers the mixture
spec, each source's identity (hub revision, content hash of local files, synthetic task contents), the tokenizer and
chat template, the masking and truncation options, the seed and CACHE_VERSION. A cache is written to a temporary
folder and renamed into place when complete, so a killed prepare never leaves a cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

from open_instruct import synthetic
from open_instruct.data import (
    SYNTHETIC_PREFIX,
    DataError,
    EncodeOptions,
    MixerItem,
    SourceStats,
    TokenizedMixture,
    build_mixture,
    format_stats,
    local_files,
    resolve_mixture,
)
from open_instruct.tokenization import IGNORE_INDEX

CACHE_VERSION = "3"  # bump when the meaning of a cached example changes
COMPLETED_MARKER = "COMPLETED"


def encode_options(args) -> EncodeOptions:
    return EncodeOptions(args.max_seq_length, args.train_on, args.truncation, args.add_bos)


# ----------------------------------------------------------------------------------------------------------------
# The cache key
# ----------------------------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(item: MixerItem) -> str:
    """What identifies a source's contents: file hashes, the hub revision (resolved to a commit when online)."""
    if item.kind == "local":
        return json.dumps([[str(f), _sha256_file(f)] for f in local_files(Path(item.name))])
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
    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(tokenizer.get_vocab())
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
# Build or load
# ----------------------------------------------------------------------------------------------------------------
def _load(path: Path, key: str) -> TokenizedMixture:
    import datasets

    stats = [SourceStats(**s) for s in json.loads((path / "stats.json").read_text())]
    return TokenizedMixture(datasets.load_from_disk(str(path / "dataset")), stats, key)


def _save(path: Path, dataset, stats: list[SourceStats]) -> None:
    """Write into a unique temporary folder, then rename: readers see a complete cache or none."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        dataset.save_to_disk(str(tmp / "dataset"))
        (tmp / "stats.json").write_text(json.dumps([vars(s) for s in stats], indent=2))
        (tmp / COMPLETED_MARKER).write_text("")
        if path.exists() and not (path / COMPLETED_MARKER).exists():
            shutil.rmtree(path)  # an incomplete folder (not ours: we never leave one) must not block the cache
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (path / COMPLETED_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_mixture(args, tokenizer, log=print) -> tuple[TokenizedMixture, str]:
    """The tokenized mixture for these args: from the cache when it is there, else built (and cached)."""
    items = resolve_mixture(args)
    options = encode_options(args)
    key = cache_key(items, tokenizer, args)
    path = Path(args.dataset_local_cache_dir) / key
    if not args.dataset_skip_cache and (path / COMPLETED_MARKER).exists():
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


# ----------------------------------------------------------------------------------------------------------------
# Audit: see exactly what is trained
# ----------------------------------------------------------------------------------------------------------------
def segments(tokenizer, input_ids, labels) -> list[dict]:
    """The decoded example as maximal runs of trained / untrained tokens."""
    runs: list[dict] = []
    start = 0
    trained = [label != IGNORE_INDEX for label in labels]
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or trained[end] != trained[start]:
            runs.append({"text": tokenizer.decode([int(t) for t in input_ids[start:end]], skip_special_tokens=False),
                         "trained": bool(trained[start])})
            start = end
    return runs


def audit_indices(mixture: TokenizedMixture, count: int) -> list[tuple[str, int]]:
    """Up to `count` examples taken round-robin from the sources (examples are stored source after source)."""
    offsets = np.cumsum([0] + [s.kept_rows for s in mixture.stats])
    picks, depth = [], 0
    while len(picks) < count and depth < max((s.kept_rows for s in mixture.stats), default=0):
        for stats, offset in zip(mixture.stats, offsets):
            if depth < stats.kept_rows and len(picks) < count:
                picks.append((stats.name, int(offset) + depth))
        depth += 1
    return picks


def write_audit(path: str | Path, mixture: TokenizedMixture, tokenizer, count: int) -> int:
    picks = audit_indices(mixture, count)
    with Path(path).open("w") as handle:
        for source, index in picks:
            ids, labels = mixture.examples([index])
            record = {"source": source, "index": index, "num_tokens": len(ids[0]),
                      "num_trained_tokens": int((labels[0] != IGNORE_INDEX).sum()),
                      "segments": segments(tokenizer, ids[0], labels[0])}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(picks)


def highlight(runs: list[dict], color: bool) -> str:
    """Trained text in green on a terminal, else between « and »."""
    if color:
        return "".join(f"\x1b[1;32m{r['text']}\x1b[0m" if r["trained"] else f"\x1b[2m{r['text']}\x1b[0m" for r in runs)
    return "".join(f"«{r['text']}»" if r["trained"] else r["text"] for r in runs)


def show_example(mixture: TokenizedMixture, tokenizer, log=print) -> None:
    ids, labels = mixture.examples([0])
    trained_note = "green" if sys.stdout.isatty() else "between « and »"
    log(f"Example 0 of the mixture, trained tokens {trained_note}:\n"
        + highlight(segments(tokenizer, ids[0], labels[0]), sys.stdout.isatty()))


def prepare(args, tokenizer, log=print) -> tuple[TokenizedMixture, str]:
    """The prepare step shared by this entry point and the trainer: cache, stats, audit, one shown example."""
    mixture, path = get_mixture(args, tokenizer, log)
    log("Mixture:\n" + format_stats(mixture.stats))
    if args.audit_file:
        written = write_audit(args.audit_file, mixture, tokenizer, args.audit_num_examples)
        log(f"Wrote {written} audited examples to {args.audit_file}")
    show_example(mixture, tokenizer, log)
    return mixture, path


def main(argv: list[str] | None = None) -> None:
    from open_instruct.args import parse_args
    from open_instruct.evaluation import eval_mixer_args
    from open_instruct.model_utils import ModelSetupError, load_tokenizer
    from open_instruct.source_checks import check_run_sources

    args = parse_args(argv)
    try:
        check_run_sources(args)  # spec errors, missing files and hub repos before the tokenizer download
        tokenizer = load_tokenizer(args)
        mixture, path = prepare(args, tokenizer)
        if args.eval_dataset_mixer_list:  # the run's eval loss set goes through the same cache
            eval_set, eval_path = get_mixture(eval_mixer_args(args), tokenizer)
    except (DataError, ModelSetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(mixture)} examples ready{' in ' + path if path else ''}.")
    if args.eval_dataset_mixer_list:
        print(f"{len(eval_set)} eval examples ready{' in ' + eval_path if eval_path else ''}.")


if __name__ == "__main__":
    main()
