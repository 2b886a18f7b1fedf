"""The training mixture: parse the mixer spec, load each source, sample the amounts, convert rows to messages and
tokenize them with masks into an Arrow dataset.

Sources: Hugging Face hub ids (``org/name`` or ``org/name@revision``), local ``.jsonl`` / ``.json`` / ``.parquet``
files or folders of them, and the built-in ``synthetic:<task>``. Every check that needs no download (spec shape,
amounts, files, task names, formats) runs in `parse_mixer` / `parse_mixer_file` before anything expensive happens.
Local JSON files are read line by line, so a bad row is reported as ``file:line``; rows are converted and tokenized
in `datasets.map` worker processes that report a status per row instead of raising, and the main process then
applies the policy (error, or skip and count with --skip_bad_rows).

The cache lives in open_instruct/data_cache.py, the command-line entry point in open_instruct/prepare_data.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from open_instruct import formats, synthetic
from open_instruct.chat_schema import conversation_counts
from open_instruct.tokenization import (
    Encoded,
    TemplateMaskError,
    backend,
    labels_from_offsets,
    num_trained_tokens,
    select_train_on,
    spans_and_highlights,
    token_ranges,
    truncated,
)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SYNTHETIC_PREFIX = "synthetic:"
KEPT_STATUSES = ("ok", "whole_turns", "cut", "cut_in_assistant_turn")
JSON_COLUMN = "__json"  # rows read from local JSON files and synthetic tasks travel as raw JSON text


def _encoded_features():
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")), "num_tokens": Value("int32"),
                     "num_trained_tokens": Value("int32"), "status": Value("string"), "error": Value("string"),
                     "has_reasoning": Value("int8"), "has_tool_calls": Value("int8"), "tool_results": Value("int32"),
                     "highlights": List(Value("int32"))})


class DataError(ValueError):
    """The mixture or a row is wrong; the message names the source (file, line or row) and the fix."""


@dataclass
class MixerItem:
    """One source of the mixture: where it is, how much of it, which split, which format and column names."""

    name: str
    amount: float
    is_fraction: bool
    split: str
    kind: str  # "synthetic", "local" or "hub"
    format: str | None = None  # None: detected from the first row
    columns: dict[str, str] | None = None  # canonical field -> the source's column name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.split})"

    def spec(self) -> dict:
        return {"name": self.name, "amount": self.amount, "is_fraction": self.is_fraction, "split": self.split,
                "format": self.format, "columns": self.columns}


@dataclass
class EncodeOptions:
    """How rows become (input_ids, labels); part of the cache key."""

    max_seq_length: int
    train_on: str = "assistant"
    truncation: str = "whole_turns"
    add_bos: bool = False
    train_reasoning: str = "all_turns"


@dataclass
class SourceStats:
    name: str
    split: str
    format: str = ""
    source_rows: int = 0
    sampled_rows: int = 0
    kept_rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    rows_with_reasoning: int = 0  # kept rows with an assistant reasoning trace
    rows_with_tool_calls: int = 0  # kept rows with at least one tool call
    tool_results: int = 0  # tool messages in the kept rows


# ----------------------------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------------------------
def _parse_amount(raw, name: str) -> tuple[float, bool]:
    raw = str(raw)
    try:
        value = float(raw)
    except ValueError:
        raise DataError(
            f"Mixer amount {raw!r} for {name!r} is not a number. Use a fraction with a '.' (0.5, 1.0, 2.5) "
            "or an integer row count (1000)."
        ) from None
    is_fraction = "." in raw
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"Mixer amount {raw!r} for {name!r} must be positive.")
    if not is_fraction and not raw.isdigit():
        raise DataError(f"Mixer amount {raw!r} for {name!r} must be an integer row count (1000) or a fraction with "
                        "a '.' (1.0).")
    return value, is_fraction


def _source_kind(name: str) -> str:
    if name.startswith(SYNTHETIC_PREFIX):
        task = name[len(SYNTHETIC_PREFIX):]
        if task not in synthetic.TASKS:
            raise DataError(f"Unknown synthetic source {name!r}; tasks: {', '.join(sorted(synthetic.TASKS))}.")
        return "synthetic"
    path = Path(name)
    if path.exists():
        if path.is_dir() and not local_files(path):
            raise DataError(f"Folder {name} holds no .jsonl, .json or .parquet files.")
        if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"File {name} has an unsupported type; use .jsonl, .json or .parquet.")
        return "local"
    if path.suffix in LOCAL_SUFFIXES or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(f"Dataset file {name} does not exist (relative paths start from {Path.cwd()}).")
    repo = name.split("@", 1)[0]
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DataError(
            f"Unknown dataset {name!r}: not a local file or folder, not synthetic:<task>, and not a hub id "
            "of the form org/name[@revision]."
        )
    return "hub"


def _make_item(name: str, amount, split: str, fmt: str | None = None, columns: dict | None = None) -> MixerItem:
    value, is_fraction = _parse_amount(amount, name)
    if fmt is not None and fmt not in formats.FORMATS:
        raise DataError(f"Source {name!r} has format {fmt!r}; formats: {', '.join(formats.FORMATS)}.")
    if columns is not None:
        if not (isinstance(columns, dict) and all(isinstance(v, str) for v in columns.values())):
            raise DataError(f"Source {name!r}: columns must map field names to column names, e.g. {{messages: chat}}.")
        _check_column_fields(name, columns, fmt)
    return MixerItem(name, value, is_fraction, split, _source_kind(name), fmt, columns)


def _check_column_fields(name: str, columns: dict, fmt: str | None) -> None:
    """A `columns` key must be a field of the source's format (of some format while the format is not known yet)."""
    fields = formats.REQUIRED_COLUMNS[fmt] + formats.OPTIONAL_COLUMNS[fmt] if fmt else formats.ALL_FIELDS
    unknown = sorted(set(columns) - set(fields))
    if unknown:
        owner = f"format {fmt!r}" if fmt else "any format"
        raise DataError(f"Source {name!r}: columns maps {', '.join(unknown)}, which {owner} does not use; "
                        f"fields: {', '.join(fields)}.")


def parse_mixer(mixer_list: list[str], splits: list[str]) -> list[MixerItem]:
    """Validate the 'name amount ...' spec and resolve each source's kind, without loading any data."""
    if len(mixer_list) % 2:
        raise DataError(
            f"--dataset_mixer_list needs pairs 'name amount', got {len(mixer_list)} items: {' '.join(mixer_list)}"
        )
    names, amounts = mixer_list[0::2], mixer_list[1::2]
    if len(splits) not in (1, len(names)):
        raise DataError(
            f"--dataset_mixer_list_splits has {len(splits)} entries; give one for all sources or one per source "
            f"({len(names)})."
        )
    split_for = splits * len(names) if len(splits) == 1 else splits
    return [_make_item(name, raw, split) for name, raw, split in zip(names, amounts, split_for)]


def parse_mixer_file(path: str | Path, default_split: str = "train") -> list[MixerItem]:
    """A YAML or JSON mixture file: a list of sources (or {"sources": [...]}), each with name and amount, and
    optionally split, format and columns (canonical field -> the source's column name)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"Mixture file {path} does not exist.")
    try:
        spec = yaml.safe_load(read_utf8(file))  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise DataError(f"Mixture file {path} is not valid YAML/JSON: {exc}") from None
    entries = spec.get("sources") if isinstance(spec, dict) else spec
    if not isinstance(entries, list) or not entries:
        raise DataError(f"Mixture file {path} must be a non-empty list of sources (or a mapping with 'sources').")
    items = []
    for index, entry in enumerate(entries):
        where = f"{path} source {index + 1}"
        if not isinstance(entry, dict) or "name" not in entry or "amount" not in entry:
            raise DataError(f"{where}: each source needs 'name' and 'amount'.")
        unknown = set(entry) - {"name", "amount", "split", "format", "columns"}
        if unknown:
            raise DataError(f"{where}: unknown keys {', '.join(sorted(unknown))}; allowed: name, amount, split, "
                            "format, columns.")
        try:
            items.append(_make_item(str(entry["name"]), entry["amount"], str(entry.get("split", default_split)),
                                    entry.get("format"), entry.get("columns")))
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    return items


def resolve_mixture(args) -> list[MixerItem]:
    """The mixture from --dataset_mixer_file or --dataset_mixer_list (exactly one of them)."""
    if args.dataset_mixer_file and args.dataset_mixer_list:
        raise DataError("Give the mixture either as --dataset_mixer_list or as --dataset_mixer_file, not both.")
    if args.dataset_mixer_file:
        return parse_mixer_file(args.dataset_mixer_file, args.dataset_mixer_list_splits[0])
    return parse_mixer(args.dataset_mixer_list, args.dataset_mixer_list_splits)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)


class _UnreadableLine(ValueError):
    """A JSONL line that is not UTF-8 or not JSON; `kind` is what --skip_bad_rows counts it as."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def jsonl_values(path: Path, skipped: Counter | None = None):
    """(file:line, the line, its parsed value) for each non-blank line of a JSONL file. A line that is not UTF-8 or
    not JSON is a DataError naming the file and line; given a `skipped` Counter, it is counted there by kind
    (not_utf8, invalid_json) and left out instead."""
    with path.open("rb") as handle:  # bytes: a bad byte is reported (or skipped) with its own line
        for number, raw in enumerate(handle, start=1):
            try:
                parsed = _parse_jsonl_line(raw)
            except _UnreadableLine as bad:
                if skipped is None:
                    raise DataError(f"{path}:{number}: {bad}. Fix or remove the line.") from None
                skipped[bad.kind] += 1
                continue
            if parsed is not None:
                yield f"{path}:{number}", *parsed


def _parse_jsonl_line(raw: bytes) -> tuple[str, object] | None:
    """(the text, its value) of one JSONL line; None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _UnreadableLine("not_utf8", _not_utf8_reason(raw, exc)) from None
    if not line.strip():
        return None
    try:
        return line, json.loads(line)
    except json.JSONDecodeError as exc:
        raise _UnreadableLine("invalid_json", f"invalid JSON ({exc.msg})") from None


def _not_utf8_reason(data: bytes, exc: UnicodeDecodeError) -> str:
    """Why bytes that failed to decode are not UTF-8: the first bad byte and its column in its line."""
    column = exc.start - data.rfind(b"\n", 0, exc.start)
    return f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}: {exc.reason})"


def _read_jsonl(path: Path, skipped: Counter | None = None) -> tuple[list[str], list[str]]:
    rows, where = [], []
    for place, line, value in jsonl_values(path, skipped):
        if not isinstance(value, dict):
            raise DataError(f"{place}: each line must be a JSON object, got {type(value).__name__}.")
        rows.append(line)
        where.append(place)
    return rows, where


def read_utf8(path: Path) -> str:
    """A whole text file; a byte that is not UTF-8 is a DataError naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: {_not_utf8_reason(data, exc)}. Fix or remove the line.") from None


def _read_json(path: Path) -> tuple[list[str], list[str]]:
    try:
        value = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}).") from None
    if isinstance(value, dict):
        key, inner = next(iter(value.items())) if len(value) == 1 else (None, None)
        # {"data": [rows]} wraps rows; any other object (e.g. {"messages": [...]}) is itself one row.
        value = inner if key not in formats.ALL_FIELDS and isinstance(inner, list) else [value]
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise DataError(f"{path}: a .json source must hold a list of objects (or be JSON Lines named .jsonl).")
    return [json.dumps(row) for row in value], [f"{path} item {i}" for i in range(len(value))]


class Source:
    """A loaded source: an Arrow dataset of rows and, per row, where it came from (for error messages)."""

    def __init__(self, item: MixerItem, dataset, locations: list[str] | None, skipped: Counter | None = None):
        self.item, self.dataset, self._locations = item, dataset, locations
        self.skipped = skipped or Counter()  # lines left out while reading (--skip_bad_rows), by kind

    def __len__(self) -> int:
        return len(self.dataset)

    def location(self, row: int) -> str:
        return self._locations[row] if self._locations else f"{self.item.label} row {row}"

    def first_row(self) -> dict:
        return decode_row(self.dataset[0])


def load_source(item: MixerItem, skip_bad_rows: bool = False) -> Source:
    """Load a source's rows (hub datasets through the datasets library, which caches downloads). With
    `skip_bad_rows`, JSONL lines that cannot be read are counted and left out instead of stopping the run."""
    import datasets

    if item.kind == "synthetic":
        rows = synthetic.load_task(item.name[len(SYNTHETIC_PREFIX):], item.split)
        return Source(item, datasets.Dataset.from_dict({JSON_COLUMN: [json.dumps(r) for r in rows]}), None)
    if item.kind == "hub":
        return Source(item, _load_hub_dataset(item), None)
    if item.split != "train":
        raise DataError(f"Local source {item.name} has only the split 'train', not {item.split!r}.")
    files = local_files(Path(item.name))
    if any(f.suffix == ".parquet" for f in files):
        if not all(f.suffix == ".parquet" for f in files):
            raise DataError(f"Folder {item.name} mixes parquet and JSON files; keep one kind per source.")
        return Source(item, datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train"), None)
    rows, where, skipped = [], [], Counter() if skip_bad_rows else None
    for file in files:
        file_rows, file_where = _read_jsonl(file, skipped) if file.suffix == ".jsonl" else _read_json(file)
        rows += file_rows
        where += file_where
    return Source(item, datasets.Dataset.from_dict({JSON_COLUMN: rows}), where, skipped)


def _load_hub_dataset(item: MixerItem):
    import datasets

    repo, _, revision = item.name.partition("@")
    try:
        return datasets.load_dataset(repo, revision=revision or None, split=item.split)
    except OSError as exc:  # datasets' ConnectionError and DatasetNotFoundError, the hub client's errors
        from open_instruct.hub import error_reason  # hub imports this module

        reason = error_reason(exc)
        raise DataError(f"dataset {item.name}: cannot load it from the Hugging Face Hub ({reason}).") from None


def decode_row(row: dict) -> dict:
    if JSON_COLUMN in row:
        return json.loads(row[JSON_COLUMN])
    return dict(row)


def sample_indices(num_rows: int, item: MixerItem, rng: np.random.Generator) -> np.ndarray:
    """Row indices for an amount: fraction f -> floor(f) full copies plus a random remainder; count -> that many."""
    if item.is_fraction:
        repeats = int(item.amount)
        remainder = int(round((item.amount - repeats) * num_rows))
        parts = [np.arange(num_rows)] * repeats + [rng.choice(num_rows, size=remainder, replace=False)]
        indices = np.concatenate(parts).astype(np.int64)
        if len(indices) == 0:
            raise DataError(f"Mixer amount {item.amount} of {item.label} ({num_rows} rows) selects no row; "
                            f"use at least {1 / num_rows:.2g} or an integer count.")
        return indices
    count = int(item.amount)
    if count > num_rows:
        raise DataError(
            f"{item.label} has {num_rows} rows but the mixer asks for {count}. Ask for at most {num_rows}, "
            f"or use a fraction such as {count / max(num_rows, 1):.2f} to repeat rows."
        )
    return rng.choice(num_rows, size=count, replace=False).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Converting and tokenizing
# ----------------------------------------------------------------------------------------------------------------
def _row_at(batch: dict, index: int) -> dict:
    return {key: values[index] for key, values in batch.items()}


def encode_batch(batch: dict, tokenizer, fmt: str, columns: dict | None, options: dict) -> dict:
    """Source rows -> tokenized examples, each with a status; never raises for a bad row (runs in worker processes).

    Rendering and span finding run per row; the whole batch is tokenized in one Rust call.
    """
    out = {"input_ids": [], "labels": [], "num_tokens": [], "num_trained_tokens": [], "status": [], "error": [],
           "has_reasoning": [], "has_tool_calls": [], "tool_results": [], "highlights": []}

    def emit(input_ids, labels, status, error="", counts=(0, 0, 0), highlights=()):
        trained = num_trained_tokens(labels[1:])  # the first token is never predicted
        if status in KEPT_STATUSES and trained == 0:
            input_ids, labels, status = [], [], "no_trained_tokens"
        flat = [value for first, last, kind in highlights if first < len(input_ids)
                for value in (first, min(last, len(input_ids)), kind)]
        values = (input_ids, labels, len(input_ids), trained if input_ids else 0, status, error, *counts, flat)
        for key, value in zip(out, values):
            out[key].append(value)

    rendered = []  # (messages, tools, text, spans) of rows that rendered; (None, None, status, error) of the others
    for position in range(len(next(iter(batch.values())))):
        try:
            messages, tools = formats.to_chat(decode_row(_row_at(batch, position)), fmt, columns)
            text, spans, highlights = spans_and_highlights(tokenizer, messages, options["add_bos"], tools,
                                                           options["train_reasoning"])
            spans = select_train_on(text, spans, options["train_on"])
            rendered.append((messages, tools, text, (spans, highlights)))
        except formats.RowError as exc:
            rendered.append((None, None, "bad_row", str(exc)))
        except TemplateMaskError as exc:
            rendered.append((None, None, "mask_error", str(exc)))
    texts = [entry[2] for entry in rendered if entry[0] is not None]
    encodings = iter(backend(tokenizer).encode_batch(texts, add_special_tokens=False))
    for messages, tools, text_or_status, spans_or_error in rendered:
        if messages is None:
            emit([], [], text_or_status, spans_or_error)
            continue
        encoding = next(encodings)
        spans, highlights = spans_or_error
        full = Encoded(list(encoding.ids), labels_from_offsets(encoding.ids, encoding.offsets, spans))
        result = truncated(tokenizer, messages, full, options["max_seq_length"], options["train_on"],
                           options["truncation"], options["add_bos"], tools, options["train_reasoning"])
        # Highlights are token ranges of the full encoding: valid for it and for a cut of it, not for a re-encoded
        # shorter conversation (whole_turns), which the audit then shows without them.
        ranges = [] if result.status == "whole_turns" else [
            (*tokens, kind) for tokens, (*_, kind) in zip(token_ranges(encoding.offsets, [h[:2] for h in highlights]),
                                                     highlights)]
        emit(result.input_ids, result.labels, result.status, counts=conversation_counts(messages), highlights=ranges)
    return out


def detect_source_format(source: Source) -> str:
    """The source's format (given, or detected from its first row) after checking its column mapping on that row."""
    item = source.item
    try:
        first = formats.rename_columns(source.first_row(), item.columns) if item.columns else source.first_row()
        fmt = item.format or formats.detect_format(first.keys())
    except ValueError as exc:  # RowError included: a mapped column is missing
        raise DataError(f"{source.location(0)}: {exc}") from None
    if item.columns:
        _check_column_fields(item.name, item.columns, fmt)
    return fmt


# Rows a tokenizing worker must get before a pool pays for its start-up. benchmarks/num_proc.py (docs/benchmarks.md)
# measured where a pool of 2 starts to beat one process: from about 1,200 to 8,100 rows, for short synthetic rows
# and long multi-turn chats alike; 4,000 sits in that range.
POOL_MIN_ROWS_PER_WORKER = 4000


def usable_cores() -> int:
    """The cores this process may run on (a Slurm job or a container gets fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pool_size(rows: int, num_proc: int | None, min_rows_per_worker: int | None = None) -> int | None:
    """Tokenizing processes for a source of `rows` rows: --dataset_num_proc when given, else one per usable core,
    and in both cases no more than give each worker `min_rows_per_worker` rows. None: no pool (one process)."""
    workers = min(num_proc or usable_cores(), rows // max(min_rows_per_worker or POOL_MIN_ROWS_PER_WORKER, 1))
    return workers if workers > 1 else None


def tokenize_source(source: Source, indices: np.ndarray, tokenizer, options: EncodeOptions, skip_bad_rows: bool,
                    max_unmaskable_fraction: float, num_proc: int | None,
                    pool_min_rows: int | None = None):
    """Tokenize the sampled rows of one source; returns (Arrow dataset of kept examples, SourceStats)."""
    fmt = detect_source_format(source)
    sampled = source.dataset.select(indices)
    encoded = sampled.map(
        encode_batch,
        batched=True,
        batch_size=1000,
        features=_encoded_features(),
        fn_kwargs={"tokenizer": tokenizer, "fmt": fmt, "columns": source.item.columns, "options": vars(options)},
        remove_columns=sampled.column_names,
        num_proc=pool_size(len(sampled), num_proc, pool_min_rows),
        desc=f"Tokenizing {source.item.name}",
        load_from_cache_file=False,
    )
    statuses = _column(encoded, "status")
    stats = SourceStats(source.item.name, source.item.split, fmt, len(source), len(indices))
    _apply_row_policy(source, indices, encoded, statuses, skip_bad_rows, max_unmaskable_fraction)
    for status, count in zip(*np.unique(statuses, return_counts=True)):
        if status in ("whole_turns", "cut", "cut_in_assistant_turn"):
            stats.truncated[str(status)] = int(count)
        elif status not in KEPT_STATUSES:
            stats.dropped[str(status)] = int(count)
    stats.dropped.update(source.skipped)  # counted over the whole source: they never reach the sampling
    kept = np.flatnonzero(np.isin(statuses, KEPT_STATUSES))
    stats.kept_rows = len(kept)
    stats.tokens = int(_column(encoded, "num_tokens").sum())
    stats.trained_tokens = int(_column(encoded, "num_trained_tokens").sum())
    stats.rows_with_reasoning = int(_column(encoded, "has_reasoning")[kept].sum())
    stats.rows_with_tool_calls = int(_column(encoded, "has_tool_calls")[kept].sum())
    stats.tool_results = int(_column(encoded, "tool_results")[kept].sum())
    columns = ["input_ids", "labels", "num_tokens", "num_trained_tokens", "highlights"]
    return encoded.select(kept).select_columns(columns), stats


def _column(dataset, name: str) -> np.ndarray:
    """A whole column straight from Arrow (indexing the dataset would build one Python row at a time)."""
    return dataset.data.column(name).to_numpy(zero_copy_only=False)


def _apply_row_policy(source, indices, encoded, statuses, skip_bad_rows: bool, max_unmaskable_fraction: float):
    bad = np.flatnonzero(statuses == "bad_row")
    if len(bad) and not skip_bad_rows:
        first = int(bad[0])
        raise DataError(f"{source.location(int(indices[first]))}: {encoded[first]['error']} "
                        f"({len(bad)} bad rows in {source.item.label}; --skip_bad_rows skips and counts them).")
    unmaskable = np.flatnonzero(statuses == "mask_error")
    if len(unmaskable) > max_unmaskable_fraction * len(statuses):
        first = int(unmaskable[0])
        raise DataError(
            f"{source.item.label}: {len(unmaskable)} of {len(statuses)} rows have no derivable assistant span "
            f"(more than --max_unmaskable_fraction {max_unmaskable_fraction}); first at "
            f"{source.location(int(indices[first]))}: {encoded[first]['error']}"
        )


def build_mixture(items: list[MixerItem], tokenizer, options: EncodeOptions, seed: int, skip_bad_rows: bool = False,
                  max_unmaskable_fraction: float = 0.01, num_proc: int | None = None):
    """Load, sample (seeded) and tokenize every source; returns (Arrow dataset, [SourceStats])."""
    import datasets

    rng = np.random.default_rng(seed)
    parts, all_stats = [], []
    for item in items:
        source = load_source(item, skip_bad_rows)
        if len(source) == 0:
            raise DataError(f"{item.label} is empty.")
        indices = sample_indices(len(source), item, rng)
        part, stats = tokenize_source(source, indices, tokenizer, options, skip_bad_rows, max_unmaskable_fraction,
                                      num_proc)
        parts.append(part)
        all_stats.append(stats)
    dataset = datasets.concatenate_datasets(parts)
    if len(dataset) == 0:
        raise DataError("The mixture is empty after filtering: no example kept a trained (assistant) token. "
                        f"Per source:\n{format_stats(all_stats)}")
    return dataset, all_stats


class TokenizedMixture:
    """The training examples (an Arrow dataset, memory-mapped when cached) and what the mixture turned out to be."""

    def __init__(self, dataset, stats: list[SourceStats], fingerprint: str = ""):
        self.dataset = dataset.with_format("numpy")
        self.stats = stats
        self.fingerprint = fingerprint  # the cache key: sources' contents, tokenizer, encoding options, seed
        self.lengths = _column(dataset, "num_tokens").astype(np.int64)
        self.trained_lengths = _column(dataset, "num_trained_tokens").astype(np.int64)  # positions with a loss
        self.rows: np.ndarray | None = None  # a subset's rows of `dataset` (see `subset`); None: all of them

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, rows) -> TokenizedMixture:
        """A view of these rows, renumbered 0..len-1 (no copy of the Arrow data): e.g. training minus a held-out set."""
        rows = np.asarray(rows, dtype=np.int64)
        view = copy.copy(self)
        view.rows = rows if self.rows is None else self.rows[rows]
        view.lengths, view.trained_lengths = self.lengths[rows], self.trained_lengths[rows]
        return view

    def examples(self, indices) -> tuple[list[np.ndarray], list[np.ndarray]]:
        rows = indices if self.rows is None else self.rows[np.asarray(indices, dtype=np.int64)]
        batch = self.dataset[[int(i) for i in rows]]
        return list(batch["input_ids"]), list(batch["labels"])

    def highlights(self, index: int) -> list[tuple[int, int, int]]:
        """(first, last token, kind code) of the reasoning and tool-call spans of one example (for the audit)."""
        row = int(index if self.rows is None else self.rows[index])
        flat = [int(x) for x in self.dataset[row]["highlights"]] if "highlights" in self.dataset.column_names else []
        return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def format_stats(stats: list[SourceStats]) -> str:
    lines = [f"{'source':<40} {'format':<17} {'rows':>8} {'sampled':>8} {'kept':>8} {'tokens':>10} {'trained':>10}"
             "  truncated / dropped / reasoning and tools"]
    for s in stats:
        chat = {"rows with reasoning": s.rows_with_reasoning, "rows with tool calls": s.rows_with_tool_calls,
                "tool results": s.tool_results}
        notes = ", ".join([f"{k}={v}" for k, v in {**s.truncated, **s.dropped}.items()]
                          + [f"{k}: {v}" for k, v in chat.items() if v]) or "-"
        lines.append(f"{s.name + ' (' + s.split + ')':<40} {s.format:<17} {s.source_rows:>8} {s.sampled_rows:>8} "
                     f"{s.kept_rows:>8} {s.tokens:>10} {s.trained_tokens:>10}  {notes}")
    return "\n".join(lines)
