"""Messages -> (input_ids, labels): the one canonical transform, with exact assistant-only loss masks.

The trained tokens are exactly those whose first character lies inside an assistant span, where span i is
[len(render(messages[:i], generation prompt)), len(render(messages[:i+1]))). The conversation is tokenized once
with character offsets, so the mask costs one tokenization plus one render per assistant turn.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class TemplateMaskError(ValueError):
    """The chat template does not render prefixes as prefixes, so assistant spans cannot be located exactly."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, [(start, end) character span of each assistant turn])."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_prefix(tokenizer, messages[:i])
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise TemplateMaskError(
                f"The chat template does not render message {i} as a prefix of the whole conversation, so its "
                "assistant tokens cannot be masked exactly. Use a template from open_instruct/chat_templates.py."
            )
        spans.append((len(before), len(through)))
    return text, spans


def _render_prefix(tokenizer, prefix: list[dict]) -> str:
    """Everything before an assistant turn's content: the earlier messages plus the assistant header."""
    if prefix:
        return render(tokenizer, prefix, add_generation_prompt=True)
    # Chat templates cannot render an empty conversation; the header alone is the generation prompt, i.e. what
    # add_generation_prompt appends after any user turn.
    probe = [{"role": "user", "content": "x"}]
    with_prompt = render(tokenizer, probe, add_generation_prompt=True)
    without = render(tokenizer, probe)
    if not with_prompt.startswith(without):
        raise TemplateMaskError("The chat template's generation prompt is not appended after the conversation.")
    return with_prompt[len(without):]


def encode_messages(tokenizer, messages: list[dict], max_seq_length: int | None = None) -> dict[str, Any]:
    """Tokenize a conversation; labels copy input_ids on assistant spans and are IGNORE_INDEX elsewhere.

    Truncates to max_seq_length tokens (the mask is truncated with it).
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, (start, _end) in enumerate(encoding["offset_mapping"]):
        if any(span_start <= start < span_end for span_start, span_end in spans):
            labels[index] = input_ids[index]
    if max_seq_length is not None:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    return {"input_ids": input_ids, "labels": labels}


def num_trained_tokens(labels: list[int]) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)
