"""Tokenize the training mixture into the cache (open_instruct/data_cache.py) without touching a GPU; finetune.py
reuses it.

    python -m open_instruct.prepare_data --model_name_or_path output/tiny-llama \
        --dataset_mixer_list synthetic:spelling 1.0 --audit_file output/audit.jsonl

It takes the same flags as open_instruct.finetune (a YAML config too), so the exact command of a training run,
with `finetune` replaced by `prepare_data`, fills the cache that run will hit. The prepare step the trainer shares
(`prepare`: cache, stats, audit, one shown example) and the audit live here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from open_instruct.data import DataError, TokenizedMixture, format_stats
from open_instruct.data_cache import get_mixture
from open_instruct.evaluation import eval_mixer_args
from open_instruct.storage import StorageError
from open_instruct.tokenization import HIGHLIGHT_KINDS, IGNORE_INDEX


# ----------------------------------------------------------------------------------------------------------------
# Audit: see exactly what is trained
# ----------------------------------------------------------------------------------------------------------------
KIND_NAMES = {code: name for name, code in HIGHLIGHT_KINDS.items()}


def segments(tokenizer, input_ids, labels, highlights=()) -> list[dict]:
    """The decoded example as maximal runs of trained / untrained tokens; a run inside a highlight (an assistant's
    reasoning or tool calls, as (first, last token, kind code)) carries "kind": "reasoning" or "tool_call"."""
    kinds = [None] * len(input_ids)
    for first, last, code in highlights:
        kinds[first:last] = [KIND_NAMES[code]] * (min(last, len(input_ids)) - first)
    keys = [(label != IGNORE_INDEX, kind) for label, kind in zip(labels, kinds)]
    runs: list[dict] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or keys[end] != keys[start]:
            run = {"text": tokenizer.decode([int(t) for t in input_ids[start:end]], skip_special_tokens=False),
                   "trained": bool(keys[start][0])}
            if keys[start][1]:
                run["kind"] = keys[start][1]
            runs.append(run)
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
                      "segments": segments(tokenizer, ids[0], labels[0], mixture.highlights(index))}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(picks)


COLORS = {None: "1;32", "reasoning": "1;36", "tool_call": "1;35"}  # trained text: green; reasoning cyan; calls magenta
LABELS = {None: "", "reasoning": "reasoning: ", "tool_call": "tool call: "}


def highlight(runs: list[dict], color: bool) -> str:
    """Trained text in green on a terminal (an assistant's reasoning cyan, its tool calls magenta), untrained text
    dim; without a terminal, trained text between « and », reasoning as «reasoning: ...», calls as «tool call: ...»."""
    if color:
        return "".join(f"\x1b[{COLORS[r.get('kind')]}m{r['text']}\x1b[0m" if r["trained"] else f"\x1b[2m{r['text']}\x1b[0m"
                       for r in runs)
    return "".join(f"«{LABELS[r.get('kind')]}{r['text']}»" if r["trained"] else r["text"] for r in runs)


def show_example(mixture: TokenizedMixture, tokenizer, log=print) -> None:
    index = _first_with_highlights(mixture)
    ids, labels = mixture.examples([index])
    trained_note = ("green (reasoning cyan, tool calls magenta)" if sys.stdout.isatty()
                    else "between « and »")
    log(f"Example {index} of the mixture, trained tokens {trained_note}:\n"
        + highlight(segments(tokenizer, ids[0], labels[0], mixture.highlights(index)), sys.stdout.isatty()))


def _first_with_highlights(mixture: TokenizedMixture, look: int = 200) -> int:
    """Example 0, or among the first `look` the first with reasoning or tool calls (the part worth seeing)."""
    return next((i for i in range(min(look, len(mixture))) if mixture.highlights(i)), 0)


def prepare(args, tokenizer, log=print, verify_cache: bool = True) -> tuple[TokenizedMixture, str]:
    """The prepare step shared by this entry point and the trainer: cache, stats, audit, one shown example."""
    mixture, path = get_mixture(args, tokenizer, log, verify=verify_cache)
    log("Mixture:\n" + format_stats(mixture.stats))
    if args.audit_file:
        written = write_audit(args.audit_file, mixture, tokenizer, args.audit_num_examples)
        log(f"Wrote {written} audited examples to {args.audit_file}")
    show_example(mixture, tokenizer, log)
    return mixture, path


def main(argv: list[str] | None = None) -> None:
    from open_instruct.args import parse_args
    from open_instruct.model_utils import ModelSetupError, load_tokenizer
    from open_instruct.source_checks import check_run_sources

    args = parse_args(argv)
    try:
        check_run_sources(args)  # spec errors, missing files and hub repos before the tokenizer download
        tokenizer = load_tokenizer(args)
        mixture, path = prepare(args, tokenizer)
        if args.eval_dataset_mixer_list:  # the run's eval loss set goes through the same cache
            eval_set, eval_path = get_mixture(eval_mixer_args(args), tokenizer)
    except (DataError, ModelSetupError, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(mixture)} examples ready{' in ' + path if path else ''}.")
    if args.eval_dataset_mixer_list:
        print(f"{len(eval_set)} eval examples ready{' in ' + eval_path if eval_path else ''}.")


if __name__ == "__main__":
    main()
