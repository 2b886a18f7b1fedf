"""Row -> canonical messages converters: literal rows, exact outputs, and one test per error."""

from __future__ import annotations

import copy

import pytest

from open_instruct.formats import (
    CONVERTERS,
    DETECTION_ORDER,
    FORMATS,
    REQUIRED_COLUMNS,
    RowError,
    detect_format,
    rename_columns,
    to_messages,
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def test_api_lists_every_format():
    assert set(FORMATS) == set(CONVERTERS) == set(DETECTION_ORDER) | {"hermes"} == set(REQUIRED_COLUMNS)
    # hermes has sharegpt's columns: it is chosen by name, never detected
    assert DETECTION_ORDER == ("messages", "xlam", "sharegpt", "openorca", "dolly", "alpaca", "prompt_completion")
    assert issubclass(RowError, ValueError)


# ---------------------------------------------------------------------------------------------------------------------
# Each format: literal rows -> exact messages


def test_messages_drops_extra_keys():
    row = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "alice"},
            {"role": "assistant", "content": "Hello!", "weight": 1.0},
        ],
    }
    before = copy.deepcopy(row)
    assert to_messages(row, "messages") == [system("Be brief."), user("Hi"), assistant("Hello!")]
    assert row == before  # pure: the input is untouched


def test_messages_empty_assistant_content_allowed():
    row = {"messages": [user("Say nothing."), assistant("")]}
    assert to_messages(row, "messages") == [user("Say nothing."), assistant("")]


def test_alpaca_empty_input():
    row = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert to_messages(row, "alpaca") == [user("Name a color."), assistant("Blue.")]


def test_alpaca_missing_or_none_or_blank_input():
    expected = [user("Name a color."), assistant("Blue.")]
    assert to_messages({"instruction": "Name a color.", "output": "Blue."}, "alpaca") == expected
    assert to_messages({"instruction": "Name a color.", "input": None, "output": "Blue."}, "alpaca") == expected
    assert to_messages({"instruction": "Name a color.", "input": " \n", "output": "Blue."}, "alpaca") == expected


def test_alpaca_with_input():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert to_messages(row, "alpaca") == [user("Translate to French.\n\nGood morning"), assistant("Bonjour")]


def test_dolly_without_context():
    row = {"instruction": "What is 2+2?", "context": "", "response": "4", "category": "open_qa"}
    assert to_messages(row, "dolly") == [user("What is 2+2?"), assistant("4")]
    del row["context"]
    assert to_messages(row, "dolly") == [user("What is 2+2?"), assistant("4")]


def test_dolly_with_context():
    row = {"instruction": "Who founded it?", "context": "Acme was founded by Ann.", "response": "Ann",
           "category": "closed_qa"}
    assert to_messages(row, "dolly") == [user("Who founded it?\n\nAcme was founded by Ann."), assistant("Ann")]


def test_openorca_empty_system_prompt():
    row = {"id": "niv.1", "system_prompt": "", "question": "Is water wet?", "response": "Yes."}
    assert to_messages(row, "openorca") == [user("Is water wet?"), assistant("Yes.")]
    del row["system_prompt"]
    assert to_messages(row, "openorca") == [user("Is water wet?"), assistant("Yes.")]


def test_openorca_with_system_prompt():
    row = {"system_prompt": "You are an AI assistant.", "question": "Is water wet?", "response": "Yes."}
    assert to_messages(row, "openorca") == [
        system("You are an AI assistant."), user("Is water wet?"), assistant("Yes.")
    ]


def test_sharegpt_system_and_multi_turn():
    row = {
        "id": "abc",
        "conversations": [
            {"from": "system", "value": "You are helpful."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye!", "weight": 1},
        ],
    }
    assert to_messages(row, "sharegpt") == [
        system("You are helpful."), user("Hi"), assistant("Hello!"), user("Bye"), assistant("Goodbye!")
    ]


def test_sharegpt_mixed_case_and_aliases():
    row = {
        "conversations": [
            {"from": "Human", "value": "a"},
            {"from": "GPT", "value": "b"},
            {"from": "USER", "value": "c"},
            {"from": "ChatGPT", "value": "d"},
            {"from": "user", "value": "e"},
            {"from": "Assistant", "value": "f"},
            {"from": "human", "value": "g"},
            {"from": "bard", "value": "h"},
            {"from": "human", "value": "i"},
            {"from": "Bing", "value": "j"},
            {"from": "human", "value": "k"},
            {"from": "model", "value": "l"},
        ]
    }
    assert to_messages(row, "sharegpt") == [
        user("a"), assistant("b"), user("c"), assistant("d"), user("e"), assistant("f"),
        user("g"), assistant("h"), user("i"), assistant("j"), user("k"), assistant("l"),
    ]


def test_prompt_completion_strings():
    row = {"prompt": "The sky is", "completion": " blue."}
    assert to_messages(row, "prompt_completion") == [user("The sky is"), assistant(" blue.")]


def test_prompt_completion_message_lists():
    row = {
        "prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sky color?"}],
        "completion": [{"role": "assistant", "content": "Blue.", "extra": True}],
    }
    assert to_messages(row, "prompt_completion") == [system("Be terse."), user("Sky color?"), assistant("Blue.")]


def test_prompt_completion_mixed_string_and_list():
    row = {"prompt": "Sky color?", "completion": [{"role": "assistant", "content": "Blue."}]}
    assert to_messages(row, "prompt_completion") == [user("Sky color?"), assistant("Blue.")]


def test_converters_do_not_touch_their_input():
    rows = {
        "messages": {"messages": [{"role": "user", "content": "q", "x": 1}, {"role": "assistant", "content": "a"}]},
        "alpaca": {"instruction": "i", "input": "x", "output": "o"},
        "dolly": {"instruction": "i", "context": "c", "response": "r"},
        "openorca": {"system_prompt": "s", "question": "q", "response": "r"},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "prompt_completion": {"prompt": [{"role": "user", "content": "q"}], "completion": "a"},
    }
    for fmt, row in rows.items():
        before = copy.deepcopy(row)
        first = to_messages(row, fmt)
        assert row == before, fmt
        assert to_messages(row, fmt) == first, fmt


# ---------------------------------------------------------------------------------------------------------------------
# detect_format


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages"], "messages"),
        (["id", "messages", "source"], "messages"),
        (["conversations"], "sharegpt"),
        (["id", "conversations"], "sharegpt"),
        (["system_prompt", "question", "response"], "openorca"),
        (["id", "question", "response"], "openorca"),
        (["instruction", "context", "response", "category"], "dolly"),
        (["instruction", "response"], "dolly"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output", "text"], "alpaca"),
        (["prompt", "completion"], "prompt_completion"),
        (["prompt", "completion", "label"], "prompt_completion"),
        # several formats present: the fixed order decides
        (["messages", "prompt", "completion"], "messages"),
        (["messages", "conversations"], "messages"),
        (["instruction", "question", "response"], "openorca"),
        (["instruction", "response", "output"], "dolly"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected
    assert detect_format(set(columns)) == expected
    assert detect_format({c: None for c in columns}) == expected  # a row's keys work too


def test_detect_format_unknown_columns():
    with pytest.raises(ValueError, match=r"columns: id, text\.") as info:
        detect_format(["text", "id"])
    message = str(info.value)
    for fmt in DETECTION_ORDER:
        assert f"{fmt}: " in message
    assert "alpaca: instruction, output, [input]" in message
    assert "openorca: question, response, [system_prompt]" in message
    assert "mixer file" in message and "`format`" in message and "`columns`" in message
    assert not isinstance(info.value, RowError)


def test_detect_format_partial_columns_do_not_match():
    with pytest.raises(ValueError, match="Cannot detect"):
        detect_format(["instruction"])
    with pytest.raises(ValueError, match=r"columns: \(none\)"):
        detect_format([])


# ---------------------------------------------------------------------------------------------------------------------
# rename_columns / columns mapping


def test_rename_columns_none_is_a_copy():
    row = {"messages": []}
    renamed = rename_columns(row, None)
    assert renamed == row and renamed is not row


def test_rename_columns_maps_canonical_names():
    row = {"prompt": "Add 1+1.", "answer": "2"}
    renamed = rename_columns(row, {"instruction": "prompt", "output": "answer"})
    assert renamed["instruction"] == "Add 1+1." and renamed["output"] == "2"
    assert row == {"prompt": "Add 1+1.", "answer": "2"}


def test_rename_columns_swap_reads_original_row():
    row = {"question": "A", "response": "B"}
    renamed = rename_columns(row, {"question": "response", "response": "question"})
    assert renamed == {"question": "B", "response": "A"}


def test_rename_columns_missing_source_column():
    with pytest.raises(RowError, match=r"missing column 'answer' \(mapped to 'output'"):
        rename_columns({"prompt": "x", "reply": "y"}, {"instruction": "prompt", "output": "answer"})


def test_rename_columns_unknown_canonical_field():
    with pytest.raises(ValueError, match="unknown field") as info:
        rename_columns({"a": 1}, {"answer": "a"})
    assert not isinstance(info.value, RowError)


def test_to_messages_with_columns_messages():
    row = {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    assert to_messages(row, "messages", columns={"messages": "conversation"}) == [user("Hi"), assistant("Yo")]


def test_to_messages_with_columns_alpaca():
    row = {"prompt": "Add 1+1.", "extra": "Show work.", "answer": "2"}
    columns = {"instruction": "prompt", "input": "extra", "output": "answer"}
    assert to_messages(row, "alpaca", columns) == [user("Add 1+1.\n\nShow work."), assistant("2")]


def test_to_messages_with_columns_missing_mapped_column():
    with pytest.raises(RowError, match="missing column 'answer'"):
        to_messages({"prompt": "Add 1+1."}, "alpaca", {"instruction": "prompt", "output": "answer"})


def test_to_messages_columns_key_not_a_field_of_the_format():
    with pytest.raises(ValueError, match="format 'dolly' does not use") as info:
        to_messages({"instruction": "i", "answer": "a"}, "dolly", {"output": "answer"})
    assert not isinstance(info.value, RowError)


def test_unknown_format():
    with pytest.raises(ValueError, match="Unknown format 'chatml'; formats: messages, xlam, alpaca, dolly") as info:
        to_messages({"messages": []}, "chatml")
    assert not isinstance(info.value, RowError)


# ---------------------------------------------------------------------------------------------------------------------
# Errors: every one is a RowError that names the problem (and the message index)


@pytest.mark.parametrize(
    ("row", "fmt", "match"),
    [
        # messages not a non-empty list
        ({"messages": []}, "messages", r"'messages' must be a non-empty list .*empty list"),
        ({"messages": "hi"}, "messages", r"'messages' must be a non-empty list .*got str"),
        ({"messages": None}, "messages", r"'messages' must be a non-empty list .*got NoneType"),
        # a message not a dict
        ({"messages": [{"role": "user", "content": "q"}, "a"]}, "messages", r"message 1 must be an object"),
        # role missing / unknown (allowed roles listed)
        ({"messages": [{"content": "q"}, assistant("a")]}, "messages",
         r"message 0 has no 'role'; roles are system, user, assistant, tool"),
        ({"messages": [user("q"), {"role": "function", "content": "x"}, assistant("a")]}, "messages",
         r"message 1 has unknown role 'function'; roles are system, user, assistant, tool"),
        ({"messages": [user("q"), {"role": "tool", "content": "x"}, assistant("a")]}, "messages",
         r"message 1 is a tool result with no preceding tool call to answer"),
        ({"prompt": [{"role": "human", "content": "q"}], "completion": "a"}, "prompt_completion",
         r"message 0 has unknown role 'human'"),
        # content missing or not a string
        ({"messages": [user("q"), {"role": "assistant"}]}, "messages",
         r"message 1 has no 'content'; content must be a string"),
        ({"messages": [user("q"), {"role": "assistant", "content": None}]}, "messages",
         r"message 1 content must be a string, got NoneType"),
        ({"messages": [{"role": "user", "content": 5}, assistant("a")]}, "messages",
         r"message 0 content must be a string, got int"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3.5}]}, "sharegpt",
         r"message 1 content must be a string, got float"),
        ({"prompt": "q", "completion": [{"role": "assistant", "content": ["a"]}]}, "prompt_completion",
         r"message 1 content must be a string, got list"),
        # required column missing
        ({"instruction": "i", "input": ""}, "alpaca", r"missing column 'output'"),
        ({"output": "o"}, "alpaca", r"missing column 'instruction'"),
        ({"instruction": "i", "context": "c"}, "dolly", r"missing column 'response'"),
        ({"question": "q"}, "openorca", r"missing column 'response'"),
        ({"response": "r"}, "openorca", r"missing column 'question'"),
        ({"id": 1}, "sharegpt", r"missing column 'conversations'"),
        ({"id": 1}, "messages", r"missing column 'messages' \(columns: id\)"),
        ({"prompt": "p"}, "prompt_completion", r"missing column 'completion'"),
        ({"completion": "c"}, "prompt_completion", r"missing column 'prompt'"),
        # required field not a string
        ({"instruction": 5, "output": "o"}, "alpaca", r"column 'instruction' must be a string, got int"),
        ({"instruction": "i", "output": None}, "alpaca", r"column 'output' must be a string, got NoneType"),
        ({"instruction": "i", "input": 3, "output": "o"}, "alpaca", r"column 'input' must be a string when given"),
        ({"instruction": ["i"], "response": "r"}, "dolly", r"column 'instruction' must be a string, got list"),
        ({"instruction": "i", "context": {"a": 1}, "response": "r"}, "dolly", r"column 'context' must be a string"),
        ({"question": "q", "response": 42}, "openorca", r"column 'response' must be a string, got int"),
        ({"system_prompt": 1, "question": "q", "response": "r"}, "openorca",
         r"column 'system_prompt' must be a string when given"),
        ({"prompt": 1, "completion": "c"}, "prompt_completion",
         r"column 'prompt' must be a string or a list of \{role, content\} messages, got int"),
        ({"prompt": "p", "completion": None}, "prompt_completion", r"column 'completion' must be a string or a list"),
        # no assistant message
        ({"messages": [user("q")]}, "messages", r"no assistant message, so nothing would be trained"),
        ({"messages": [system("s"), user("q")]}, "messages", r"no assistant message"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", r"no assistant message"),
        ({"prompt": [user("q")], "completion": [user("again")]}, "prompt_completion", r"no assistant message"),
        ({"prompt": [user("q")], "completion": []}, "prompt_completion", r"no assistant message"),
        # a system message anywhere but first
        ({"messages": [user("q"), system("s"), assistant("a")]}, "messages",
         r"message 1 is a system message; a system message is allowed only as the first message"),
        ({"messages": [system("s"), system("t"), user("q"), assistant("a")]}, "messages",
         r"message 1 is a system message"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                            {"from": "system", "value": "s"}]}, "sharegpt", r"message 2 is a system message"),
        ({"prompt": "q", "completion": [system("s"), assistant("a")]}, "prompt_completion",
         r"message 1 is a system message"),
        # sharegpt specifics
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "sharegpt",
         r"message 1: unknown 'from' value 'robot'; accepted \(any case\): system, human, user, gpt, assistant, "
         r"chatgpt, bard, bing, model"),
        ({"conversations": [{"from": None, "value": "q"}]}, "sharegpt", r"message 0: unknown 'from' value None"),
        ({"conversations": [{"value": "q"}]}, "sharegpt", r"message 0: no 'from' key"),
        ({"conversations": [{"from": "human"}]}, "sharegpt", r"message 0: no 'value' key"),
        ({"conversations": ["hi"]}, "sharegpt", r"message 0: a conversation turn must be an object"),
        ({"conversations": []}, "sharegpt", r"'conversations' must be a non-empty list"),
    ],
)
def test_row_errors(row, fmt, match):
    with pytest.raises(RowError, match=match):
        to_messages(row, fmt)


def test_row_not_a_dict():
    with pytest.raises(RowError, match="a row must be an object"):
        to_messages(["not", "a", "row"], "messages")
