"""The training mixture: parse the mixer spec, load each source, sample the amounts, tokenize with masks.

Sources: Hugging Face hub ids (``org/name`` or ``org/name@revision``), local ``.jsonl`` / ``.json`` / ``.parquet``
files or folders of them, and the built-in ``synthetic:<task>``. Every check that needs no download (spec shape,
amounts, files, task names) runs in `parse_mixer` before anything expensive happens.

    python -m open_instruct.data --dataset_mixer_list synthetic:spelling 100 --tokenizer output/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from open_instruct import synthetic
from open_instruct.tokenization import ROLES, encode_messages, num_trained_tokens

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SYNTHETIC_PREFIX = "synthetic:"


class DataError(ValueError):
    """The mixture or a row is wrong; the message names the source (file, line or row) and the fix."""


@dataclass(frozen=True)
class MixerItem:
    """One source of the mixture: where it is, how much of it, which split."""

    name: str
    amount: float
    is_fraction: bool
    split: str
    kind: str  # "synthetic", "local" or "hub"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.split})"


@dataclass
class SourceStats:
    name: str
    split: str
    source_rows: int = 0
    sampled_rows: int = 0
    kept_rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated_rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class TokenizedMixture:
    """Tokenized training examples (input_ids, labels) and what the mixture turned out to be."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    stats: list[SourceStats]

    def __len__(self) -> int:
        return len(self.input_ids)


def _parse_amount(raw: str, name: str) -> tuple[float, bool]:
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
        if path.is_dir() and not _local_files(path):
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
    items = []
    for name, raw, split in zip(names, amounts, split_for):
        amount, is_fraction = _parse_amount(raw, name)
        items.append(MixerItem(name, amount, is_fraction, split, _source_kind(name)))
    return items


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)


def check_jsonl(path: Path) -> None:
    """Fail on the first line that is not a JSON object, naming file and line, before datasets reads it."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg}). Fix or remove the line.") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}.")


def load_rows(item: MixerItem) -> list[dict]:
    """Load a source's rows (downloading hub datasets through the datasets library)."""
    if item.kind == "synthetic":
        return synthetic.load_task(item.name[len(SYNTHETIC_PREFIX):], item.split)
    import datasets

    if item.kind == "local":
        files = _local_files(Path(item.name))
        for file in files:
            if file.suffix == ".jsonl":
                check_jsonl(file)
        builders = {LOCAL_SUFFIXES[f.suffix] for f in files}
        if len(builders) > 1:
            raise DataError(f"Folder {item.name} mixes parquet and JSON files; keep one kind per source.")
        if item.split != "train":
            raise DataError(f"Local source {item.name} has only the split 'train', not {item.split!r}.")
        dataset = datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
    else:
        repo, _, revision = item.name.partition("@")
        dataset = datasets.load_dataset(repo, revision=revision or None, split=item.split)
    return list(dataset)


def sample_indices(num_rows: int, item: MixerItem, rng: np.random.Generator) -> np.ndarray:
    """Row indices for an amount: fraction f -> floor(f) full copies plus a random remainder; count -> that many."""
    if item.is_fraction:
        repeats = int(item.amount)
        remainder = int(round((item.amount - repeats) * num_rows))
        parts = [np.arange(num_rows)] * repeats + [rng.choice(num_rows, size=remainder, replace=False)]
        return np.concatenate(parts).astype(np.int64)
    count = int(item.amount)
    if count > num_rows:
        raise DataError(
            f"{item.label} has {num_rows} rows but the mixer asks for {count}. Ask for at most {num_rows}, "
            f"or use a fraction such as {count / max(num_rows, 1):.2f} to repeat rows."
        )
    return rng.choice(num_rows, size=count, replace=False).astype(np.int64)


def validate_messages(row: dict, where: str) -> list[dict]:
    """Return the row's messages or raise a DataError naming the row and what is wrong."""
    if "messages" not in row:
        raise DataError(f"{where}: no 'messages' column (columns: {', '.join(sorted(row))}).")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}: message {turn} has role {message.get('role') if isinstance(message, dict) else message!r}; "
                            f"roles are {', '.join(ROLES)}.")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {turn} content must be a string.")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing would be trained.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_source(rows, indices, item, tokenizer, max_seq_length, stats: SourceStats, show_progress: bool):
    input_ids, labels = [], []
    for index in tqdm(indices, desc=f"Tokenizing {item.name}", disable=not show_progress, leave=False):
        messages = validate_messages(rows[index], f"{item.label} row {index}")
        example = encode_messages(tokenizer, messages)
        if len(example["input_ids"]) > max_seq_length:
            stats.truncated_rows += 1
            example = {key: value[:max_seq_length] for key, value in example.items()}
        trained = num_trained_tokens(example["labels"][1:])  # the first token is never predicted
        if trained == 0:
            stats.dropped["no_trained_tokens_after_truncation"] = stats.dropped.get("no_trained_tokens_after_truncation", 0) + 1
            continue
        stats.kept_rows += 1
        stats.tokens += len(example["input_ids"])
        stats.trained_tokens += trained
        input_ids.append(np.asarray(example["input_ids"], dtype=np.int32))
        labels.append(np.asarray(example["labels"], dtype=np.int32))
    return input_ids, labels


def build_mixture(items: list[MixerItem], tokenizer, max_seq_length: int, seed: int,
                  show_progress: bool = True) -> TokenizedMixture:
    """Load, sample (seeded by --seed) and tokenize every source; raise if nothing trainable is left."""
    rng = np.random.default_rng(seed)
    mixture = TokenizedMixture([], [], [])
    for item in items:
        rows = load_rows(item)
        if not rows:
            raise DataError(f"{item.label} is empty.")
        indices = sample_indices(len(rows), item, rng)
        stats = SourceStats(item.name, item.split, source_rows=len(rows), sampled_rows=len(indices))
        ids, labels = tokenize_source(rows, indices, item, tokenizer, max_seq_length, stats, show_progress)
        mixture.input_ids += ids
        mixture.labels += labels
        mixture.stats.append(stats)
    if not mixture.input_ids:
        raise DataError("The mixture is empty after tokenization: no example has a trained (assistant) token.")
    return mixture


def format_stats(stats: list[SourceStats]) -> str:
    lines = [f"{'source':<40} {'rows':>8} {'sampled':>8} {'kept':>8} {'tokens':>10} {'trained':>10} {'truncated':>9}  dropped"]
    for s in stats:
        dropped = ", ".join(f"{k}={v}" for k, v in s.dropped.items()) or "-"
        lines.append(f"{s.name + ' (' + s.split + ')':<40} {s.source_rows:>8} {s.sampled_rows:>8} {s.kept_rows:>8} "
                     f"{s.tokens:>10} {s.trained_tokens:>10} {s.truncated_rows:>9}  {dropped}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description="Build a mixture and print what it turned out to be.", allow_abbrev=False)
    parser.add_argument("--dataset_mixer_list", nargs="+", required=True)
    parser.add_argument("--dataset_mixer_list_splits", nargs="+", default=["train"])
    parser.add_argument("--tokenizer", required=True, help="Tokenizer directory or hub id (with a chat template).")
    parser.add_argument("--max_seq_length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    items = parse_mixer(args.dataset_mixer_list, args.dataset_mixer_list_splits)
    mixture = build_mixture(items, AutoTokenizer.from_pretrained(args.tokenizer), args.max_seq_length, args.seed)
    print(format_stats(mixture.stats))


if __name__ == "__main__":
    main()
