"""Messages -> (input_ids, labels): the one canonical transform, with exact loss masks.

The trained tokens are exactly those whose first character lies inside an assistant span: what the template renders
for an assistant turn after its role header (the generation prompt) through its end-of-turn marker, i.e. the
reasoning and content and tool calls as rendered, never the header, a tool result, a user or system turn or the
tools' schemas. open_instruct/turn_spans.py finds the spans in the full render without assuming that the template
renders prefixes as prefixes. The conversation is rendered and tokenized once with character offsets, so the mask
costs one tokenization plus one render per assistant turn. Because the mask comes from the messages and never from
token values, an eos that doubles as the pad token is still trained.

    train_on="assistant"        every assistant turn (default)
    train_on="last_assistant"   only the final assistant turn
    train_on="all"              every token (continued pre-training on chat text)

    reasoning="all_turns"       train the reasoning of every turn where the template renders it (default)
    reasoning="last_turn"       train only the last assistant turn's reasoning (earlier turns' stays context)

Truncation to max_seq_length (`truncate`):
    "whole_turns"  drop trailing messages so the example ends with a complete assistant turn that fits (default);
                   a row whose first assistant turn does not fit is dropped
    "drop"         drop every row longer than max_seq_length
    "cut"          cut at max_seq_length; a final assistant turn cut before its end marker is reported
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from open_instruct.turn_spans import TemplateMaskError, locate_assistant_turns, render  # noqa: F401 (re-exported)

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last_assistant", "all")
REASONING = ("all_turns", "last_turn")
TRUNCATION = ("whole_turns", "drop", "cut")


@dataclass
class Encoded:
    """One tokenized example. `status` says what truncation did: ok, whole_turns, cut, cut_in_assistant_turn,
    or dropped_too_long (input_ids then empty)."""

    input_ids: list[int]
    labels: list[int]
    status: str = "ok"


def bos_prefix(tokenizer, text: str, add_bos: bool) -> str:
    """The bos string to prepend (once: not when the template already starts with it)."""
    if not add_bos:
        return ""
    if tokenizer.bos_token is None:
        raise ValueError("--add_bos was given but the tokenizer has no bos token.")
    return "" if text.startswith(tokenizer.bos_token) else tokenizer.bos_token


HIGHLIGHT_KINDS = {"reasoning": 1, "tool_call": 2}  # codes of the spans the audit highlights


def assistant_char_spans(tokenizer, messages: list[dict], add_bos: bool = False, tools: list[dict] | None = None,
                         reasoning: str = "all_turns") -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, character spans of the assistant turns' trained text).

    reasoning="last_turn" leaves out of the spans what the reasoning of every assistant turn but the last renders.
    """
    text, spans, _ = spans_and_highlights(tokenizer, messages, add_bos, tools, reasoning)
    return text, spans


def spans_and_highlights(tokenizer, messages: list[dict], add_bos: bool = False, tools: list[dict] | None = None,
                         reasoning: str = "all_turns") -> tuple[str, list[tuple[int, int]], list[tuple[int, int, int]]]:
    """(text, trained character spans, highlights): highlights are (start, end, HIGHLIGHT_KINDS code) of the trained
    text that an assistant's reasoning or tool calls render, for the audit."""
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {REASONING}, got {reasoning!r}")
    detail = reasoning == "last_turn" or any(m.get("reasoning_content") or m.get("tool_calls") for m in messages)
    text, turns = locate_assistant_turns(tokenizer, messages, tools, detail=detail)
    spans, highlights = [], []
    for number, turn in enumerate(turns):
        cut = turn.reasoning if reasoning == "last_turn" and number < len(turns) - 1 else None
        kept = _without(turn.start, turn.end, cut)
        spans.extend(kept)
        for kind, region in (("reasoning", turn.reasoning), ("tool_call", turn.tool_calls)):
            for start, end in kept if region else []:
                if max(start, region[0]) < min(end, region[1]):
                    highlights.append((max(start, region[0]), min(end, region[1]), HIGHLIGHT_KINDS[kind]))
    bos = len(bos_prefix(tokenizer, text, add_bos))
    return (text if not bos else tokenizer.bos_token + text, [(a + bos, b + bos) for a, b in spans],
            [(a + bos, b + bos, kind) for a, b, kind in highlights])


def _without(start: int, end: int, cut: tuple[int, int] | None) -> list[tuple[int, int]]:
    """[start, end) minus `cut`: zero, one or two spans."""
    if cut is None or cut[1] <= start or cut[0] >= end:
        return [(start, end)]
    return [(a, b) for a, b in ((start, cut[0]), (cut[1], end)) if a < b]


def trained_spans(tokenizer, messages: list[dict], train_on: str, add_bos: bool, tools: list[dict] | None = None,
                  reasoning: str = "all_turns") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that have a loss under `train_on` and `reasoning`."""
    text, spans = assistant_char_spans(tokenizer, messages, add_bos, tools, reasoning)
    return text, select_train_on(text, spans, train_on)


def select_train_on(text: str, spans: list[tuple[int, int]], train_on: str) -> list[tuple[int, int]]:
    """Of the assistant turns' spans, those that have a loss under `train_on`."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if train_on == "all":
        return [(0, len(text))]
    return spans[-1:] if train_on == "last_assistant" else spans  # the last turn is never cut in two


def token_ranges(offsets, spans) -> list[tuple[int, int]]:
    """[first, last) token index of each character span: the tokens whose first character lies inside it."""
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    return [tuple(int(x) for x in np.searchsorted(starts, [a, b], side="left")) for a, b in spans]


def labels_from_offsets(input_ids, offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Labels copy input_ids where a token's first character lies in a span, IGNORE_INDEX elsewhere.

    Token start offsets never decrease, so each span is one contiguous token range found by binary search.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(ids))
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    for span_start, span_end in spans:
        first, last = np.searchsorted(starts, [span_start, span_end], side="left")
        labels[first:last] = ids[first:last]
    return labels.tolist()


def backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer: exact masks need its character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; exact masks need character offsets.")
    return tokenizer.backend_tokenizer


def _encode_full(tokenizer, messages: list[dict], train_on: str, add_bos: bool, tools=None,
                 reasoning: str = "all_turns") -> tuple[list[int], list[int]]:
    text, spans = trained_spans(tokenizer, messages, train_on, add_bos, tools, reasoning)
    encoding = backend(tokenizer).encode(text, add_special_tokens=False)
    return list(encoding.ids), labels_from_offsets(encoding.ids, encoding.offsets, spans)


def encode_messages(tokenizer, messages: list[dict], max_seq_length: int | None = None, train_on: str = "assistant",
                    truncate: str = "whole_turns", add_bos: bool = False, tools: list[dict] | None = None,
                    reasoning: str = "all_turns") -> Encoded:
    """Tokenize a conversation with its loss mask, applying the truncation policy (see the module docstring)."""
    input_ids, labels = _encode_full(tokenizer, messages, train_on, add_bos, tools, reasoning)
    return truncated(tokenizer, messages, Encoded(input_ids, labels), max_seq_length, train_on, truncate, add_bos,
                     tools, reasoning)


def truncated(tokenizer, messages: list[dict], full: Encoded, max_seq_length: int | None, train_on: str,
              truncate: str, add_bos: bool, tools: list[dict] | None = None, reasoning: str = "all_turns") -> Encoded:
    """Apply the truncation policy to an encoded conversation (a no-op when it fits)."""
    if truncate not in TRUNCATION:
        raise ValueError(f"truncate must be one of {TRUNCATION}, got {truncate!r}")
    if max_seq_length is None or len(full.input_ids) <= max_seq_length:
        return full
    if truncate == "drop":
        return Encoded([], [], "dropped_too_long")
    if truncate == "cut":
        labels = full.labels
        cut_inside = labels[max_seq_length - 1] != IGNORE_INDEX and labels[max_seq_length] != IGNORE_INDEX
        return Encoded(full.input_ids[:max_seq_length], labels[:max_seq_length],
                       "cut_in_assistant_turn" if cut_inside else "cut")
    # whole_turns: the longest prefix of the conversation that ends with an assistant turn and fits.
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant" and i + 1 < len(messages)]
    for end in reversed(ends):
        ids, labs = _encode_full(tokenizer, messages[:end], train_on, add_bos, tools, reasoning)
        if len(ids) <= max_seq_length:
            return Encoded(ids, labs, "whole_turns")
    return Encoded([], [], "dropped_too_long")


def num_trained_tokens(labels) -> int:
    return int(np.count_nonzero(np.asarray(labels) != IGNORE_INDEX))
