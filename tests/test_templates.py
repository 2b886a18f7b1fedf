"""Every chat template x every conversation shape: the exact rendered text and exactly which text is trained.

Expected renders and trained text are written by hand from each template's layout (see the comment block at the top
of open_instruct/chat_templates.py), never derived from the templates themselves.
"""

from __future__ import annotations

import copy

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from open_instruct.chat_templates import CHAT_TEMPLATES as ALL_TEMPLATES, CHATML, LLAMA3, OLMO, QWEN, TULU, ZEPHYR, get_chat_template
from open_instruct.tiny_model import build_tokenizer
from open_instruct.tokenization import IGNORE_INDEX, TemplateMaskError, encode_messages, render
from open_instruct.tool_templates import TOOL_TEMPLATES

# The plain chat templates; those for reasoning and tool calls are swept in tests/test_tool_templates.py.
CHAT_TEMPLATES = {name: text for name, text in ALL_TEMPLATES.items() if name not in TOOL_TEMPLATES}

EOS, BOS = "<|endoftext|>", "<|bos|>"

SHAPES: dict[str, list[dict]] = {
    "single_turn": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ],
    "with_system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ],
    "multi_turn": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ],
    "empty_assistant": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
    ],
    "unicode": [
        {"role": "user", "content": "日本語 é 🙂?"},
        {"role": "assistant", "content": "日本語 é 🙂"},
    ],
    "leading_assistant": [
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ],
}
MULTI = SHAPES["multi_turn"]


# ---------------------------------------------------------------------------------------------------------------
# Hand-written expectations, one renderer and one trained-text function per template.


def _last(messages, i) -> bool:
    return i == len(messages) - 1


def expected_tulu(messages):
    out = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out += "<|assistant|>\n" + m["content"] + EOS + ("" if _last(messages, i) else "\n")
        else:
            out += f"<|{m['role']}|>\n" + m["content"] + "\n"
    return out


def expected_simple_chat(messages):
    out = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out += "Assistant: " + m["content"] + EOS + ("" if _last(messages, i) else "\n\n")
        else:
            out += m["role"].capitalize() + ": " + m["content"] + "\n\n"
    return out


def expected_chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def expected_olmo(messages):
    return "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" + (EOS if m["role"] == "assistant" else "") + "\n"
        for m in messages
    )


def expected_llama3(messages):
    turns = (f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    return BOS + "".join(turns)


def expected_zephyr(messages):
    return "".join(f"<|{m['role']}|>\n{m['content']}{EOS}\n" for m in messages)


def _assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


def trained_tulu(messages):
    return "".join(c + EOS for c in _assistant_contents(messages))


def trained_simple_chat(messages):
    return "".join(c + EOS for c in _assistant_contents(messages))


def trained_chatml(messages):
    # The newline after <|im_end|> is inside the span even for the last turn (documented, intended).
    return "".join(c + "<|im_end|>\n" for c in _assistant_contents(messages))


def trained_olmo(messages):
    return "".join(c + "<|im_end|>" + EOS + "\n" for c in _assistant_contents(messages))


def trained_llama3(messages):
    return "".join(c + "<|eot_id|>" for c in _assistant_contents(messages))


def trained_zephyr(messages):
    return "".join(c + EOS + "\n" for c in _assistant_contents(messages))


EXPECTED = {
    "tulu": (expected_tulu, trained_tulu),
    "simple_chat": (expected_simple_chat, trained_simple_chat),
    "chatml": (expected_chatml, trained_chatml),
    "qwen": (expected_chatml, trained_chatml),
    "olmo": (expected_olmo, trained_olmo),
    "llama3": (expected_llama3, trained_llama3),
    "zephyr": (expected_zephyr, trained_zephyr),
}

# Literal full renders of single_turn and multi_turn (these also pin down the helper functions above).
LITERAL = {
    "tulu": (
        "<|user|>\nhi\n<|assistant|>\nhello<|endoftext|>",
        "<|user|>\nhi\n<|assistant|>\nhello<|endoftext|>\n<|user|>\nbye\n<|assistant|>\nciao<|endoftext|>",
    ),
    "simple_chat": (
        "User: hi\n\nAssistant: hello<|endoftext|>",
        "User: hi\n\nAssistant: hello<|endoftext|>\n\nUser: bye\n\nAssistant: ciao<|endoftext|>",
    ),
    "chatml": (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\nciao<|im_end|>\n",
    ),
    "olmo": (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|><|endoftext|>\n",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|><|endoftext|>\n"
        "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\nciao<|im_end|><|endoftext|>\n",
    ),
    "llama3": (
        "<|bos|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>",
        "<|bos|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nciao<|eot_id|>",
    ),
    "zephyr": (
        "<|user|>\nhi<|endoftext|>\n<|assistant|>\nhello<|endoftext|>\n",
        "<|user|>\nhi<|endoftext|>\n<|assistant|>\nhello<|endoftext|>\n"
        "<|user|>\nbye<|endoftext|>\n<|assistant|>\nciao<|endoftext|>\n",
    ),
}
LITERAL["qwen"] = LITERAL["chatml"]

# What add_generation_prompt appends (the assistant header).
HEADER = {
    "tulu": "<|assistant|>\n",
    "simple_chat": "Assistant: ",
    "chatml": "<|im_start|>assistant\n",
    "qwen": "<|im_start|>assistant\n",
    "olmo": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "zephyr": "<|assistant|>\n",
}

# Tulu layout with Hugging Face generation markers around the trained part of an assistant turn.
TULU_GENERATION = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)



# ---------------------------------------------------------------------------------------------------------------
# Helpers and fixtures.


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def templated(tokenizer):
    cache = {}

    def get(template_or_name: str):
        template = CHAT_TEMPLATES.get(template_or_name, template_or_name)
        if template not in cache:
            other = copy.deepcopy(tokenizer)
            other.chat_template = template
            cache[template] = other
        return cache[template]

    return get


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _trained_runs(example) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _trained_text(tokenizer, example) -> str:
    # Each maximal run decoded on its own, then concatenated (a run split inside a UTF-8 character would show).
    return "".join(_decode(tokenizer, run) for run in _trained_runs(example))


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sweep_params():
    for name in sorted(CHAT_TEMPLATES):
        for shape in SHAPES:
            yield pytest.param(name, shape, id=f"{name}-{shape}")


# ---------------------------------------------------------------------------------------------------------------
# The sweep.


@pytest.mark.parametrize("name, shape", list(_sweep_params()))
def test_sweep_full_text_and_trained_text(templated, name, shape):
    tok = templated(name)
    messages = SHAPES[shape]
    expected_render, expected_trained = EXPECTED[name]
    example = encode_messages(tok, messages)
    assert example.status == "ok"
    assert len(example.labels) == len(example.input_ids)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))
    assert _decode(tok, example.input_ids) == expected_render(messages)
    assert _trained_text(tok, example) == expected_trained(messages)
    # One trained run per assistant turn: headers always separate them.
    assert len(_trained_runs(example)) == len(_assistant_contents(messages))


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_literal_renders(templated, name):
    tok = templated(name)
    single, multi = LITERAL[name]
    expected_render, _ = EXPECTED[name]
    assert expected_render(SHAPES["single_turn"]) == single
    assert expected_render(MULTI) == multi
    assert render(tok, SHAPES["single_turn"]) == single
    assert render(tok, MULTI) == multi
    assert _decode(tok, encode_messages(tok, SHAPES["single_turn"]).input_ids) == single
    assert _decode(tok, encode_messages(tok, MULTI).input_ids) == multi


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_prefix_property_and_generation_prompt(templated, name):
    tok = templated(name)
    for messages in SHAPES.values():
        full = render(tok, messages)
        for k in range(1, len(messages) + 1):
            assert full.startswith(render(tok, messages[:k]))
            with_prompt = render(tok, messages[:k], add_generation_prompt=True)
            assert with_prompt == render(tok, messages[:k]) + HEADER[name]
            if k < len(messages) and messages[k]["role"] == "assistant":
                assert full.startswith(with_prompt)


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_empty_conversation_renders_just_the_header(name):
    # Hugging Face refuses to render an empty conversation, so render the Jinja directly.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    template = env.from_string(get_chat_template(name))
    bos = BOS if name == "llama3" else ""
    assert template.render(messages=[], add_generation_prompt=True, eos_token=EOS, bos_token=BOS) == bos + HEADER[name]
    assert template.render(messages=[], add_generation_prompt=False, eos_token=EOS, bos_token=BOS) == bos


# ---------------------------------------------------------------------------------------------------------------
# train_on.


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_train_on_last_assistant(templated, name):
    tok = templated(name)
    _, expected_trained = EXPECTED[name]
    example = encode_messages(tok, MULTI, train_on="last_assistant")
    assert _trained_text(tok, example) == expected_trained(MULTI[-1:])
    assert example.input_ids == encode_messages(tok, MULTI).input_ids


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_train_on_all(templated, name):
    tok = templated(name)
    example = encode_messages(tok, MULTI, train_on="all")
    assert example.labels == example.input_ids
    assert _decode(tok, example.input_ids) == EXPECTED[name][0](MULTI)


# ---------------------------------------------------------------------------------------------------------------
# Truncation.


@pytest.mark.parametrize("name", ["tulu", "chatml", "olmo", "llama3", "zephyr", "simple_chat"])
def test_truncation_policies(templated, name):
    tok = templated(name)
    full = encode_messages(tok, MULTI)
    first = encode_messages(tok, MULTI[:2])
    n_full, n_first = len(full.input_ids), len(first.input_ids)
    assert n_first == _num_tokens(tok, render(tok, MULTI[:2]))
    assert full.input_ids[:n_first] == first.input_ids
    assert n_first < n_full

    for limit in (n_first, (n_first + n_full) // 2, n_full - 1):
        whole = encode_messages(tok, MULTI, max_seq_length=limit, truncate="whole_turns")
        assert (whole.input_ids, whole.labels, whole.status) == (first.input_ids, first.labels, "whole_turns")
        dropped = encode_messages(tok, MULTI, max_seq_length=limit, truncate="drop")
        assert (dropped.input_ids, dropped.labels, dropped.status) == ([], [], "dropped_too_long")

    # The first assistant turn itself does not fit.
    too_short = encode_messages(tok, MULTI, max_seq_length=n_first - 1, truncate="whole_turns")
    assert (too_short.input_ids, too_short.labels, too_short.status) == ([], [], "dropped_too_long")

    # "cut" two tokens into the second assistant's content ("ci" of "ciao").
    second_start = _num_tokens(tok, render(tok, MULTI[:3], add_generation_prompt=True))
    limit = second_start + 2
    cut = encode_messages(tok, MULTI, max_seq_length=limit, truncate="cut")
    assert len(cut.input_ids) == len(cut.labels) == limit
    assert (cut.input_ids, cut.labels) == (full.input_ids[:limit], full.labels[:limit])
    assert cut.status == "cut_in_assistant_turn"
    assert _trained_text(tok, cut) == EXPECTED[name][1](MULTI[:2]) + "ci"

    # "cut" inside the second user turn's content ("b" of "bye").
    through_user = render(tok, MULTI[:3])
    limit = _num_tokens(tok, through_user[: through_user.rindex("bye")]) + 1
    cut = encode_messages(tok, MULTI, max_seq_length=limit, truncate="cut")
    assert _decode(tok, cut.input_ids).endswith("b")
    assert len(cut.input_ids) == len(cut.labels) == limit
    assert (cut.input_ids, cut.labels) == (full.input_ids[:limit], full.labels[:limit])
    assert cut.status == "cut"

    # Fitting exactly is not truncation.
    exact = encode_messages(tok, MULTI, max_seq_length=n_full, truncate="cut")
    assert (exact.input_ids, exact.labels, exact.status) == (full.input_ids, full.labels, "ok")


# ---------------------------------------------------------------------------------------------------------------
# add_bos.


def test_add_bos_prepends_one_untrained_bos_to_tulu(templated):
    tok = templated("tulu")
    plain = encode_messages(tok, MULTI)
    with_bos = encode_messages(tok, MULTI, add_bos=True)
    assert tok.bos_token == BOS
    assert with_bos.input_ids == [tok.bos_token_id] + plain.input_ids
    assert with_bos.labels == [IGNORE_INDEX] + plain.labels
    assert with_bos.input_ids.count(tok.bos_token_id) == 1
    assert _decode(tok, with_bos.input_ids) == BOS + LITERAL["tulu"][1]
    assert _trained_text(tok, with_bos) == _trained_text(tok, plain) == trained_tulu(MULTI)


def test_add_bos_does_not_double_llama3_bos(templated):
    tok = templated("llama3")
    plain = encode_messages(tok, MULTI)
    with_bos = encode_messages(tok, MULTI, add_bos=True)
    assert plain.input_ids[0] == tok.bos_token_id
    assert plain.labels[0] == IGNORE_INDEX
    assert (with_bos.input_ids, with_bos.labels) == (plain.input_ids, plain.labels)
    assert with_bos.input_ids.count(tok.bos_token_id) == 1


# ---------------------------------------------------------------------------------------------------------------
# pad == eos.


@pytest.mark.parametrize("name", ["tulu", "simple_chat", "olmo", "zephyr"])
def test_eos_is_trained_when_pad_is_eos(templated, name):
    default = templated(name)
    tok = copy.deepcopy(default)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    example = encode_messages(tok, MULTI)
    assert example == encode_messages(default, MULTI)
    assert _trained_text(tok, example) == EXPECTED[name][1](MULTI)
    eos = tok.eos_token_id
    trained_eos = [i for i, label in enumerate(example.labels) if label == eos]
    assert len(trained_eos) == 2  # one per assistant turn
    assert all(example.input_ids[i] == eos for i in trained_eos)
    # Each trained eos closes an assistant turn: it directly follows that turn's content (and <|im_end|> for olmo).
    text_before = [_decode(tok, example.input_ids[:i]) for i in trained_eos]
    suffix = "<|im_end|>" if name == "olmo" else ""
    assert [t.endswith(c + suffix) for t, c in zip(text_before, ("hello", "ciao"))] == [True, True]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face {% generation %} markers.


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_generation_markers_template_trains_like_tulu(templated, shape):
    messages = SHAPES[shape]
    marked, plain = templated(TULU_GENERATION), templated("tulu")
    a, b = encode_messages(marked, messages), encode_messages(plain, messages)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert _trained_text(marked, a) == trained_tulu(messages)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_generation_markers_match_hf_assistant_mask(templated, shape):
    messages = SHAPES[shape]
    tok = templated(TULU_GENERATION)
    example = encode_messages(tok, messages)
    try:
        out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True, tokenize=True)
        hf_mask = out["assistant_masks"]
    except (ValueError, NotImplementedError, KeyError) as error:
        pytest.skip(f"apply_chat_template(return_assistant_tokens_mask=True) unsupported here: {error}")
    assert list(out["input_ids"]) == example.input_ids
    assert [i for i, m in enumerate(hf_mask) if m] == [i for i, l in enumerate(example.labels) if l != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------------------------
# A reply that starts with a newline, with a tokenizer that merges "\n\n" (as Llama-3's and OLMo-2's do): tulu's
# header newline and the reply's leading newline become one token that is half header, half reply.


def _newline_merging_tokenizer(template: str):
    """Byte-level BPE whose only merge is two newlines into one token; tulu's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char = bytes_to_unicode()
    vocab = {char[b]: b for b in range(256)} | {char[10] * 2: 256}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(char[10], char[10])]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    special = [EOS, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token="<|pad|>",
                                  additional_special_tokens=special[2:])
    tok.chat_template = template
    return tok


def _open_instruct_index_mask(tok, messages) -> list[int]:
    """open-instruct's tulu transform, restated: a non-assistant message is masked by token index, from the length of
    the tokenized conversation before it to the length of the conversation through it (with the generation prompt
    when an assistant answers it). Returns the trained positions."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    trained = [True] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:i], tokenize=True, return_dict=False)) if i else 0
        prompt = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        end = len(tok.apply_chat_template(messages[:i + 1], tokenize=True, add_generation_prompt=prompt,
                                          return_dict=False))
        trained[start:end] = [False] * (end - start)
    return [i for i, flag in enumerate(trained) if flag]


LEADING_NEWLINE = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "\nHello"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "\n\nbye"},
]


def test_a_reply_starting_with_a_newline_leaves_the_merged_header_token_untrained():
    tok = _newline_merging_tokenizer(TULU_GENERATION)
    example = encode_messages(tok, LEADING_NEWLINE)
    pieces = [_decode(tok, [i]) for i in example.input_ids]
    straddling = [i for i in range(1, len(pieces)) if pieces[i - 1] == "<|assistant|>" and pieces[i].startswith("\n\n")]
    assert len(straddling) == 2  # the setting this test is about: header newline + reply newline in one token
    ours = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    # Untrained: the token is half the template's generation prompt, which the model never writes at inference.
    assert not set(straddling) & set(ours)
    assert "".join(pieces[i] for i in ours) == "Hello" + EOS + "\nbye" + EOS  # everything after it is trained
    # open-instruct's index-based transform agrees with us ...
    assert ours == _open_instruct_index_mask(tok, LEADING_NEWLINE)
    # ... while Hugging Face's return_assistant_tokens_mask trains every token that overlaps the reply: exactly
    # the two straddling tokens more.
    out = tok.apply_chat_template(LEADING_NEWLINE, return_dict=True, return_assistant_tokens_mask=True, tokenize=True)
    assert list(out["input_ids"]) == example.input_ids
    assert [i for i, m in enumerate(out["assistant_masks"]) if m] == sorted(ours + straddling)


# ---------------------------------------------------------------------------------------------------------------
# Registry.


def test_get_chat_template_new_names():
    assert get_chat_template("qwen") is CHATML
    assert QWEN is CHATML
    assert get_chat_template("olmo") is OLMO
    assert get_chat_template("llama3") is LLAMA3
    assert get_chat_template("zephyr") is ZEPHYR
    assert get_chat_template("tulu") is TULU
    assert set(CHAT_TEMPLATES) == {"tulu", "simple_chat", "chatml", "qwen", "olmo", "llama3", "zephyr"}
    with pytest.raises(ValueError) as info:
        get_chat_template("nope")
    for name in CHAT_TEMPLATES:
        assert name in str(info.value)
