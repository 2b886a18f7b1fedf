"""encode_messages on literal conversations: the exact rendered text and exactly which tokens are trained."""

from __future__ import annotations

import copy

import pytest

from open_instruct.tool_templates import TOOL_TEMPLATES

from open_instruct.chat_templates import CHAT_TEMPLATES, CHATML, SIMPLE_CHAT, TULU, get_chat_template
from open_instruct.tiny_model import build_tokenizer
from open_instruct.tokenization import (
    IGNORE_INDEX,
    TemplateMaskError,
    assistant_char_spans,
    encode_messages,
    num_trained_tokens,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ciao"},
]
TULU_TEXT = (
    "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\nhello<|endoftext|>\n"
    "<|user|>\nbye\n<|assistant|>\nciao<|endoftext|>"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _with_template(tokenizer, template: str):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _trained_text(tokenizer, example) -> str:
    return _decode(tokenizer, [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_tokenizer_basics(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == TULU
    # Byte level: every UTF-8 byte is one token, special tokens are single tokens.
    assert len(tokenizer("é", add_special_tokens=False)["input_ids"]) == 2
    assert tokenizer("<|assistant|>", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("<|assistant|>")
    ]


def test_tulu_full_text(tokenizer):
    example = encode_messages(tokenizer, CONVERSATION)
    assert _decode(tokenizer, example.input_ids) == TULU_TEXT


def test_tulu_trained_tokens_are_assistant_content_and_eos(tokenizer):
    example = encode_messages(tokenizer, CONVERSATION)
    assert _trained_text(tokenizer, example) == "hello<|endoftext|>ciao<|endoftext|>"
    eos = tokenizer.eos_token_id
    # Two eos tokens, both trained; the newline after the first one is not.
    eos_positions = [i for i, t in enumerate(example.input_ids) if t == eos]
    assert len(eos_positions) == 2
    assert all(example.labels[i] == eos for i in eos_positions)
    newline_after_eos = eos_positions[0] + 1
    assert _decode(tokenizer, [example.input_ids[newline_after_eos]]) == "\n"
    assert example.labels[newline_after_eos] == IGNORE_INDEX
    # The assistant role token is never trained.
    assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert all(label != assistant_id for label in example.labels)


def test_trained_tokens_are_contiguous_runs(tokenizer):
    example = encode_messages(tokenizer, CONVERSATION)
    mask = [label != IGNORE_INDEX for label in example.labels]
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert runs == 2
    assert num_trained_tokens(example.labels) == len("hello") + 1 + len("ciao") + 1


def test_labels_copy_input_ids_where_trained(tokenizer):
    example = encode_messages(tokenizer, CONVERSATION)
    assert len(example.labels) == len(example.input_ids)
    assert any(label == IGNORE_INDEX for label in example.labels)
    for token, label in zip(example.input_ids, example.labels):
        assert label in (IGNORE_INDEX, token)


def test_char_spans_literal(tokenizer):
    text, spans = assistant_char_spans(tokenizer, CONVERSATION)
    assert text == TULU_TEXT
    assert [text[a:b] for a, b in spans] == ["hello<|endoftext|>", "ciao<|endoftext|>"]


def test_multibyte_utf8_is_trained_completely(tokenizer):
    messages = [{"role": "user", "content": "é?"}, {"role": "assistant", "content": "日本é"}]
    example = encode_messages(tokenizer, messages)
    assert _trained_text(tokenizer, example) == "日本é<|endoftext|>"
    # 日 and 本 are 3 bytes each, é is 2, plus eos.
    assert num_trained_tokens(example.labels) == 3 + 3 + 2 + 1
    assert _decode(tokenizer, example.input_ids) == "<|user|>\né?\n<|assistant|>\n日本é<|endoftext|>"


def test_truncation_cuts_ids_and_labels_together(tokenizer):
    full = encode_messages(tokenizer, CONVERSATION)
    for limit in (1, 5, 20, 30, len(full.input_ids) - 1):
        cut = encode_messages(tokenizer, CONVERSATION, max_seq_length=limit, truncate="cut")
        assert len(cut.input_ids) == len(cut.labels) == limit
        assert cut.input_ids == full.input_ids[:limit]
        assert cut.labels == full.labels[:limit]


def test_truncation_longer_than_example_is_a_no_op(tokenizer):
    full = encode_messages(tokenizer, CONVERSATION)
    assert encode_messages(tokenizer, CONVERSATION, max_seq_length=10_000) == full


def test_truncation_inside_assistant_keeps_partial_answer(tokenizer):
    prefix = "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"
    prefix_tokens = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    example = encode_messages(tokenizer, CONVERSATION, max_seq_length=prefix_tokens + 3, truncate="cut")
    assert _trained_text(tokenizer, example) == "hel"


def test_a_template_that_mixes_turns_is_refused(tokenizer):
    # Reversed turns: the end of the assistant turn cannot be told from the user turn rendered after it.
    reverse = ("{%- for m in messages | reverse -%}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor -%}"
               "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}")
    backwards = _with_template(tokenizer, reverse)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(TemplateMaskError, match="renders earlier messages after the assistant's turn"):
        assistant_char_spans(backwards, messages)
    assert tokenizer.chat_template == TULU  # the original tokenizer is untouched


def test_templates_whose_spans_cannot_be_located_are_refused(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    prompt_first = _with_template(tokenizer, "{%- if add_generation_prompt -%}{{ 'A: ' }}{%- endif -%}"
                                             "{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] }}{%- endfor -%}")
    with pytest.raises(TemplateMaskError, match="generation prompt"):
        encode_messages(prompt_first, messages)
    drops_replies = _with_template(tokenizer, (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'U: ' + m['content'] + '\\n' }}{%- else -%}"
        "{{ 'A: ok\\n' }}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ 'A: ' }}{%- endif -%}"))
    with pytest.raises(TemplateMaskError, match="does not render an assistant message's content"):
        encode_messages(drops_replies, messages)


def test_chatml_trained_text(tokenizer):
    chatml = _with_template(tokenizer, CHATML)
    example = encode_messages(chatml, CONVERSATION)
    assert _decode(chatml, example.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n"
        "<|im_start|>assistant\nciao<|im_end|>\n"
    )
    assert _trained_text(chatml, example) == "hello<|im_end|>\nciao<|im_end|>\n"


def test_simple_chat_trained_text(tokenizer):
    simple = _with_template(tokenizer, SIMPLE_CHAT)
    example = encode_messages(simple, CONVERSATION)
    assert _decode(simple, example.input_ids) == (
        "System: Be brief.\n\nUser: hi\n\nAssistant: hello<|endoftext|>\n\nUser: bye\n\nAssistant: ciao<|endoftext|>"
    )
    assert _trained_text(simple, example) == "hello<|endoftext|>ciao<|endoftext|>"


@pytest.mark.parametrize("name", sorted(set(CHAT_TEMPLATES) - set(TOOL_TEMPLATES)))
def test_templates_render_prefixes_as_prefixes(tokenizer, name):
    templated = _with_template(tokenizer, get_chat_template(name))
    text, spans = assistant_char_spans(templated, CONVERSATION)
    assert [text[a:b].startswith(c) for (a, b), c in zip(spans, ("hello", "ciao"))] == [True, True]


def test_get_chat_template():
    assert get_chat_template("tulu") == TULU
    assert get_chat_template("chatml") == CHATML
    assert get_chat_template("simple_chat") == SIMPLE_CHAT
    with pytest.raises(ValueError) as info:
        get_chat_template("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in ("chatml", "simple_chat", "tulu"):
        assert name in message


# BUG (open_instruct/tokenization.py assistant_char_spans): for an assistant message at index 0 the span starts at
# 0 (`before = ... if i else ""`), so the role header ("<|assistant|>\n" with tulu, "<|im_start|>assistant\n" with
# chatml) is trained, contrary to the module's contract. validate_messages accepts such conversations.
def test_leading_assistant_message_does_not_train_role_header(tokenizer):
    messages = [
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ]
    example = encode_messages(tokenizer, messages)
    assert _trained_text(tokenizer, example) == "hello<|endoftext|>ok<|endoftext|>"
