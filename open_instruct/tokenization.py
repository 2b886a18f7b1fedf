"""Messages -> (input_ids, labels): the one canonical transform, with exact loss masks.

The trained tokens are exactly those whose first character lies inside an assistant span, where span i is
[len(render(messages[:i], generation prompt)), len(render(messages[:i+1]))): the assistant's content and its
end-of-turn marker, never the role header or the generation prompt. The conversation is rendered and tokenized once
with character offsets, so the mask costs one tokenization plus one render per assistant turn. Because the mask
comes from the messages and never from token values, an eos that doubles as the pad token is still trained.

    train_on="assistant"        every assistant turn (default)
    train_on="last_assistant"   only the final assistant turn
    train_on="all"              every token (continued pre-training on chat text)

Truncation to max_seq_length (`truncate`):
    "whole_turns"  drop trailing messages so the example ends with a complete assistant turn that fits (default);
                   a row whose first assistant turn does not fit is dropped
    "drop"         drop every row longer than max_seq_length
    "cut"          cut at max_seq_length; a final assistant turn cut before its end marker is reported
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "last_assistant", "all")
TRUNCATION = ("whole_turns", "drop", "cut")


class TemplateMaskError(ValueError):
    """The chat template does not render prefixes as prefixes, so assistant spans cannot be located exactly."""


@dataclass
class Encoded:
    """One tokenized example. `status` says what truncation did: ok, whole_turns, cut, cut_in_assistant_turn,
    or dropped_too_long (input_ids then empty)."""

    input_ids: list[int]
    labels: list[int]
    status: str = "ok"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _generation_prompt(tokenizer) -> str:
    """The assistant header the template appends with add_generation_prompt (rendered after a probe user turn)."""
    probe = [{"role": "user", "content": "x"}]
    with_prompt = render(tokenizer, probe, add_generation_prompt=True)
    without = render(tokenizer, probe)
    if not with_prompt.startswith(without):
        raise TemplateMaskError("The chat template's generation prompt is not appended after the conversation.")
    return with_prompt[len(without):]


def _render_prefix(tokenizer, messages: list[dict], i: int) -> str:
    """Everything before assistant turn i's content: the earlier messages plus the assistant header."""
    if i:
        return render(tokenizer, messages[:i], add_generation_prompt=True)
    # Chat templates cannot render an empty conversation. The header of a leading assistant turn is the generation
    # prompt, found in the render of that turn alone after whatever the template puts first (a bos, say), and it
    # must be followed directly by the turn's content.
    header = _generation_prompt(tokenizer)
    first = render(tokenizer, messages[:1])
    start = first.find(header)
    if start < 0 or not first[start + len(header):].startswith(messages[0]["content"]):
        raise TemplateMaskError("The chat template renders a leading assistant turn without its generation-prompt "
                                "header, so the turn's trained span cannot be located.")
    return first[: start + len(header)]


def bos_prefix(tokenizer, text: str, add_bos: bool) -> str:
    """The bos string to prepend (once: not when the template already starts with it)."""
    if not add_bos:
        return ""
    if tokenizer.bos_token is None:
        raise ValueError("--add_bos was given but the tokenizer has no bos token.")
    return "" if text.startswith(tokenizer.bos_token) else tokenizer.bos_token


def assistant_char_spans(tokenizer, messages: list[dict], add_bos: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, [(start, end) character span of each assistant turn])."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_prefix(tokenizer, messages, i)
        through = text if i + 1 == len(messages) else render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise TemplateMaskError(
                f"The chat template does not render message {i} as a prefix of the whole conversation, so its "
                "assistant tokens cannot be masked exactly. Use a template from open_instruct/chat_templates.py."
            )
        spans.append((len(before), len(through)))
    bos = bos_prefix(tokenizer, text, add_bos)
    return bos + text, [(start + len(bos), end + len(bos)) for start, end in spans]


def trained_spans(tokenizer, messages: list[dict], train_on: str, add_bos: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that have a loss under `train_on`."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    text, spans = assistant_char_spans(tokenizer, messages, add_bos)
    if train_on == "all":
        return text, [(0, len(text))]
    return text, spans[-1:] if train_on == "last_assistant" else spans


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


def _encode_full(tokenizer, messages: list[dict], train_on: str, add_bos: bool) -> tuple[list[int], list[int]]:
    text, spans = trained_spans(tokenizer, messages, train_on, add_bos)
    encoding = backend(tokenizer).encode(text, add_special_tokens=False)
    return list(encoding.ids), labels_from_offsets(encoding.ids, encoding.offsets, spans)


def encode_messages(tokenizer, messages: list[dict], max_seq_length: int | None = None, train_on: str = "assistant",
                    truncate: str = "whole_turns", add_bos: bool = False) -> Encoded:
    """Tokenize a conversation with its loss mask, applying the truncation policy (see the module docstring)."""
    input_ids, labels = _encode_full(tokenizer, messages, train_on, add_bos)
    return truncated(tokenizer, messages, Encoded(input_ids, labels), max_seq_length, train_on, truncate, add_bos)


def truncated(tokenizer, messages: list[dict], full: Encoded, max_seq_length: int | None, train_on: str,
              truncate: str, add_bos: bool) -> Encoded:
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
        ids, labs = _encode_full(tokenizer, messages[:end], train_on, add_bos)
        if len(ids) <= max_seq_length:
            return Encoded(ids, labs, "whole_turns")
    return Encoded([], [], "dropped_too_long")


def num_trained_tokens(labels) -> int:
    return int(np.count_nonzero(np.asarray(labels) != IGNORE_INDEX))
