"""Where each assistant turn lies in the full render of a conversation, without assuming prefix stability.

Templates that drop the reasoning of earlier turns (Qwen3's, DeepSeek-R1's) or render the last turn differently
render a prefix of a conversation differently from the same messages inside the whole conversation, so the span of
turn i cannot be read off render(messages[:i]). Instead each turn is located in the full render itself:

1. Render the whole conversation again with assistant message i replaced by a sentinel message (content = a
   string no data contains, no reasoning, no tool calls). Everything the template renders from turn i's fields lies
   between the common prefix and the common suffix of the two renders, and nothing else does.
2. The turn's trained text starts after its header: the last occurrence of the generation prompt (or, for a turn
   the template renders without part of that prompt, the role header) that starts inside the common prefix. A
   template without a generation prompt (Mistral's [INST] layout) has an empty header: the turn starts where its
   render first differs from the stand-in's.
3. It ends after the end-of-turn marker: the text the template renders after the sentinel when the sentinel turn
   is the conversation's last (eos, <|im_end|>\\n, <|eot_id|>, ...), or, where the marker depends on the turn (a
   tool call ending differently), the end of the changed region.

The same differencing, with only the reasoning (or only the tool calls) of turn i removed, gives the span those
render (`detail=True`). Checks refuse loudly (TemplateMaskError) what this cannot place: a template that does not
render the turn's content, a span that would swallow another message, spans out of order.
"""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL = "\x1d\x1e\x1dturn\x1d\x1e\x1d"
PROBE_USER = [{"role": "user", "content": "\x1duser\x1d"}]


class TemplateMaskError(ValueError):
    """The chat template renders a conversation in a way whose assistant spans cannot be located exactly."""


@dataclass(frozen=True)
class TemplateShape:
    generation_prompt: str  # what add_generation_prompt appends: the assistant header
    role_header: str  # the part of it that every rendered assistant turn starts with
    end_marker: str  # what follows an assistant turn's content when the turn is the last message


@dataclass(frozen=True)
class TurnSpan:
    """Character spans in the full render: the trained text of one assistant turn, and (with detail) the parts
    its reasoning and its tool calls render (None where the template renders none)."""

    message: int
    start: int
    end: int
    reasoning: tuple[int, int] | None = None
    tool_calls: tuple[int, int] | None = None


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------------------------------------------------------
# Common prefix and suffix by slice comparisons (C speed): usually one comparison each.


def common_prefix(a: str, b: str, limit: int) -> int:
    hi = min(len(a), len(b), limit)
    if a[:hi] == b[:hi]:
        return hi
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def common_suffix(a: str, b: str, limit: int) -> int:
    hi = max(0, min(len(a), len(b), limit))
    if a[len(a) - hi:] == b[len(b) - hi:]:
        return hi
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[len(a) - mid:] == b[len(b) - mid:] else (lo, mid - 1)
    return lo


def changed_region(text: str, other: str, prefer: int = 0) -> tuple[int, int] | None:
    """[start, end) of `text` that differs from `other` (None when they are equal).

    When `text` is `other` with a block inserted, the block's position can be ambiguous ("<tool_call>...</tool_call>"
    inserted before "<|im_end|>" may also be read as starting one "<" later); of the valid positions, the one
    nearest `prefer` (the turn's start: templates render reasoning and calls as whole tagged blocks) is taken.
    """
    if text == other:
        return None
    prefix = common_prefix(text, other, len(text))
    inserted = len(text) - len(other)
    if inserted > 0:
        lowest = len(other) - common_suffix(text, other, len(other))
        if lowest <= prefix:
            start = min(max(prefer, lowest), prefix)
            return start, start + inserted
    suffix = common_suffix(text, other, min(len(text), len(other)) - prefix)
    return prefix, len(text) - suffix


# --------------------------------------------------------------------------------------------------------------------
# The template's header and end marker, probed once per template


_SHAPES: dict[tuple, TemplateShape] = {}


def template_shape(tokenizer) -> TemplateShape:
    key = (repr(tokenizer.chat_template), tokenizer.eos_token, tokenizer.bos_token)
    if key not in _SHAPES:
        _SHAPES[key] = _probe_shape(tokenizer)
    return _SHAPES[key]


def _probe_shape(tokenizer) -> TemplateShape:
    without = render(tokenizer, PROBE_USER)
    with_prompt = render(tokenizer, PROBE_USER, add_generation_prompt=True)
    if not with_prompt.startswith(without):
        raise TemplateMaskError("The chat template's generation prompt is not appended after the conversation, so "
                                "the assistant header cannot be told from the assistant's text.")
    prompt = with_prompt[len(without):]
    probe = render(tokenizer, PROBE_USER + [{"role": "assistant", "content": SENTINEL}])
    at = probe.find(SENTINEL)
    if at < 0:
        raise TemplateMaskError("The chat template does not render an assistant message's content.")
    between = probe[len(without):at] if probe.startswith(without) else prompt
    header = prompt[:common_prefix(prompt, between, len(prompt))] or prompt
    end_marker = probe[at + len(SENTINEL):]
    if PROBE_USER[0]["content"] in end_marker:
        raise TemplateMaskError("The chat template renders earlier messages after the assistant's turn, so where "
                                "an assistant turn ends cannot be told.")
    return TemplateShape(prompt, header, end_marker)


# --------------------------------------------------------------------------------------------------------------------
# Locating the turns


def _with_message(messages: list[dict], i: int, message: dict) -> list[dict]:
    return messages[:i] + [message] + messages[i + 1:]


def _header_end(text: str, shape: TemplateShape, lo: int, prefix: int, i: int) -> int:
    for header in (shape.generation_prompt, shape.role_header):
        at = text.rfind(header, lo, prefix + len(header))
        if at >= 0:
            return at + len(header)
    raise TemplateMaskError(f"The chat template renders assistant message {i} without its header "
                            f"{shape.role_header!r}, so where its trained text starts is unknown.")


def _end_in_other(tokenizer, other: str, after: int, probe: list[dict], i: int, tools, shape: TemplateShape) -> int:
    """Where the sentinel turn's end-of-turn marker ends in `other` (the render with the sentinel at turn i)."""
    if other.startswith(shape.end_marker, after):
        return after + len(shape.end_marker)
    local = render(tokenizer, probe[: i + 1], tools=tools)  # the marker of this turn as the last message
    marker = local[local.find(SENTINEL) + len(SENTINEL):]
    others = [m.get("content", "").strip() for m in probe[:i] if m["role"] != "assistant"]
    if SENTINEL in local and other.startswith(marker, after) and not any(c and c in marker for c in others):
        return after + len(marker)
    raise TemplateMaskError(f"The chat template ends assistant message {i} differently inside the conversation "
                            f"than as its last message ({shape.end_marker!r}), so where its trained text ends is "
                            "unknown.")


def turn_bounds(tokenizer, messages, tools, i: int, text: str, shape: TemplateShape, lo: int) -> tuple[int, int]:
    """[start, end) of assistant message i's trained text in `text`, the render of the whole conversation."""
    probe = _with_message(messages, i, {"role": "assistant", "content": SENTINEL})
    try:
        other = render(tokenizer, probe, tools=tools)
    except Exception as exc:  # the template refuses the stand-in turn (e.g. it checks call/result pairing)
        raise TemplateMaskError(f"The chat template cannot render assistant message {i} replaced by a stand-in "
                                f"({type(exc).__name__}: {exc}), so its span cannot be located.") from None
    at = other.find(SENTINEL)
    if at < 0:
        raise TemplateMaskError(f"The chat template does not render assistant message {i}'s content.")
    prefix = common_prefix(text, other, at)
    after = at + len(SENTINEL)
    suffix = common_suffix(text, other, min(len(text) - prefix, len(other) - after))
    start = _header_end(text, shape, lo, prefix, i)
    end_other = _end_in_other(tokenizer, other, after, probe, i, tools, shape)
    end = end_other + len(text) - len(other) if end_other >= len(other) - suffix else len(text) - suffix
    if start > end:
        raise TemplateMaskError(f"Assistant message {i}'s header ends after its text; the template is not "
                                "supported.")
    return start, end


def _check_turn_text(text: str, message: dict, span: TurnSpan) -> None:
    inside = text[span.start:span.end]
    content = message.get("content", "").strip()
    if content and content not in inside:
        raise TemplateMaskError(f"The chat template renders assistant message {span.message}'s content altered or "
                                "outside its turn, so its trained tokens cannot be located exactly.")
    for call in message.get("tool_calls", []):
        if call["function"]["name"] not in inside:
            raise TemplateMaskError(f"The chat template renders a tool call of assistant message {span.message} "
                                    "outside its turn (or not at all).")


def _check_others_untrained(text: str, messages: list[dict], spans: list[TurnSpan]) -> None:
    """A non-assistant message's text must occur outside every trained span, where the template renders it."""
    for index, message in enumerate(messages):
        content = message.get("content", "").strip() if message["role"] != "assistant" else ""
        at = text.find(content) if content else -1
        if at < 0:
            continue
        while at >= 0 and any(s.start <= at < s.end for s in spans):
            at = text.find(content, at + 1)
        if at < 0:
            raise TemplateMaskError(f"Message {index} ({message['role']}) would lie inside an assistant turn's "
                                    "trained text; the template mixes turns and is not supported.")


def _field_span(tokenizer, messages, tools, i: int, text: str, field: str, start: int) -> tuple[int, int] | None:
    if not messages[i].get(field):
        return None
    without = {key: value for key, value in messages[i].items() if key != field}
    return changed_region(text, render(tokenizer, _with_message(messages, i, without), tools=tools), prefer=start)


def locate_assistant_turns(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                           detail: bool = False) -> tuple[str, list[TurnSpan]]:
    """The full render and the TurnSpan of every assistant message, in order (see the module docstring)."""
    shape = template_shape(tokenizer)
    text = render(tokenizer, messages, tools=tools)
    spans: list[TurnSpan] = []
    lo = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = turn_bounds(tokenizer, messages, tools, i, text, shape, lo)
        if start < lo:
            raise TemplateMaskError(f"Assistant message {i} would start inside the previous assistant turn.")
        reasoning = tool_calls = None
        if detail:
            reasoning = _field_span(tokenizer, messages, tools, i, text, "reasoning_content", start)
            tool_calls = _field_span(tokenizer, messages, tools, i, text, "tool_calls", start)
        spans.append(TurnSpan(i, start, end, reasoning, tool_calls))
        _check_turn_text(text, message, spans[-1])
        lo = end
    _check_others_untrained(text, messages, spans)
    return text, spans
