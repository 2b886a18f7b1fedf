"""Reasoning and tool-call rows: the canonical form (open_instruct/chat_schema.py), the converters for the public
shapes (messages+tools, ShareGPT function_call/observation, Hermes tags, xLAM), row errors with file:line, and the
data path's counts in dataset_stats."""

from __future__ import annotations

import json

import pytest

from open_instruct.chat_schema import RowError, split_think, validate
from open_instruct.chat_templates import get_chat_template
from open_instruct.data import DataError, EncodeOptions, build_mixture, parse_mixer
from open_instruct.formats import detect_format, to_chat
from open_instruct.tiny_model import build_tokenizer
from open_instruct.tokenization import IGNORE_INDEX

ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def call(name="add", **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# ---------------------------------------------------------------------------------------------------------------------
# Canonical form


def test_messages_with_reasoning_tool_calls_and_tools_are_kept_and_normalised():
    row = {
        "messages": [
            {"role": "user", "content": "1+2?", "weight": 1},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "content": "3", "tool_call_id": "c1"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 3."},
        ],
        "tools": json.dumps([{"name": "add", "parameters": {"type": "object"}}]),
    }
    messages, tools = to_chat(row, "messages")
    assert tools == [ADD]
    assert messages == [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}, "id": "c1"}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"},
        {"role": "assistant", "content": "It is 3.", "reasoning_content": "add them"},
    ]


def test_split_think_literals():
    assert split_think("<think>\nr\n</think>\n\nanswer") == ("r", "answer")
    assert split_think("  <think>r</think>answer") == ("r", "answer")
    assert split_think("no reasoning") == (None, "no reasoning")
    assert split_think("<think> never closed") == (None, "<think> never closed")
    assert split_think("answer <think>late</think>") == (None, "answer <think>late</think>")


@pytest.mark.parametrize(
    ("messages", "tools", "match"),
    [
        ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("add", a=1)]}],
         [{"type": "function", "function": {"name": "mul"}}], r"message 1 tool call 0 calls 'add', which is not in "
                                                               r"the row's tools \(mul\)"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{a: 1}"}}]}], None,
         r"message 1 tool call 0 arguments of 'add' is not valid JSON"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "[1, 2]"}}]}], None,
         r"arguments of 'add' must be a JSON object, got a list of 2"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "3"}, {"role": "assistant", "content": "a"}],
         None, r"message 1 is a tool result with no preceding tool call to answer"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call()]},
          {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}], None,
         r"message 3 is a tool result with no preceding tool call"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{**call(), "id": "a"}]},
          {"role": "tool", "content": "1", "tool_call_id": "b"}], None, r"answers tool_call_id 'b', which no pending"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "content": "<think>x</think>y", "reasoning_content": "z"}], None,
         r"both reasoning_content and a <think> block"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
         None, r"message 1 tool call 0 has no function name"),
        ([{"role": "user", "content": "q"}, {"role": "assistant"}], None, r"message 1 has no 'content'"),
    ],
)
def test_row_errors(messages, tools, match):
    with pytest.raises(RowError, match=match):
        validate(messages, tools)


def test_tools_errors():
    with pytest.raises(RowError, match="tools is not valid JSON"):
        to_chat({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "tools": "[{"}, "messages")
    with pytest.raises(RowError, match="tool 0 has no function name"):
        to_chat({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "tools": [{"description": "nameless"}]}, "messages")


# ---------------------------------------------------------------------------------------------------------------------
# Converters of the public shapes


def test_sharegpt_function_call_and_observation():
    row = {
        "conversations": [
            {"from": "human", "value": "1+2?"},
            {"from": "gpt", "value": "Let me add."},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
            {"from": "observation", "value": "3"},
            {"from": "function_call", "value": '[{"name": "add", "arguments": {"a": 3, "b": 0}}]'},
            {"from": "observation", "value": "3"},
            {"from": "gpt", "value": "It is 3."},
        ],
        "tools": '[{"name": "add", "parameters": {"type": "object"}}]',
    }
    assert detect_format(row) == "sharegpt"
    messages, tools = to_chat(row, "sharegpt")
    assert tools == [ADD]
    assert messages == [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "Let me add.", "tool_calls": [call(a=1, b=2)]},  # joins the gpt turn
        {"role": "tool", "content": "3", "name": "add"},
        {"role": "assistant", "content": "", "tool_calls": [call(a=3, b=0)]},
        {"role": "tool", "content": "3", "name": "add"},
        {"role": "assistant", "content": "It is 3."},
    ]


def test_hermes_tags():
    row = {
        "conversations": [
            {"from": "system", "value": 'You call functions. <tools> [{"name": "add", "parameters": '
                                        '{"type": "object"}}] </tools> Use them well.'},
            {"from": "human", "value": "1+2 and 3+4?"},
            {"from": "gpt", "value": '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                                     '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'},
            {"from": "tool", "value": "<tool_response>\n3\n</tool_response>\n<tool_response>\n7\n</tool_response>"},
            {"from": "gpt", "value": "3 and 7."},
        ],
    }
    messages, tools = to_chat(row, "hermes")
    assert tools == [ADD]
    assert messages == [
        {"role": "system", "content": "You call functions.  Use them well."},
        {"role": "user", "content": "1+2 and 3+4?"},
        {"role": "assistant", "content": "", "tool_calls": [call(a=1, b=2), call(a=3, b=4)]},
        {"role": "tool", "content": "3", "name": "add"},
        {"role": "tool", "content": "7", "name": "add"},
        {"role": "assistant", "content": "3 and 7."},
    ]


def test_hermes_bad_call_json_is_a_row_error():
    row = {"conversations": [{"from": "human", "value": "q"},
                             {"from": "gpt", "value": "<tool_call>{name: add}</tool_call>"}]}
    with pytest.raises(RowError, match=r"message 1 <tool_call> is not valid JSON"):
        to_chat(row, "hermes")


def test_xlam():
    row = {"id": 1, "query": "1+2?", "tools": '[{"name": "add", "description": "", "parameters": {}}]',
           "answers": '[{"name": "add", "arguments": {"a": 1, "b": 2}}]'}
    assert detect_format(row) == "xlam"
    messages, tools = to_chat(row, "xlam")
    assert tools == [{"type": "function", "function": {"name": "add", "description": "", "parameters": {}}}]
    assert messages == [{"role": "user", "content": "1+2?"},
                        {"role": "assistant", "content": "", "tool_calls": [call(a=1, b=2)]}]
    with pytest.raises(RowError, match="calls 'mul', which is not in the row's tools"):
        to_chat({**row, "answers": '[{"name": "mul", "arguments": {}}]'}, "xlam")


# ---------------------------------------------------------------------------------------------------------------------
# Through the data path


@pytest.fixture(scope="module")
def hermes_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = get_chat_template("hermes")
    return tokenizer


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


TOOL_ROW = {"messages": [{"role": "user", "content": "1+2?"},
                         {"role": "assistant", "content": "", "tool_calls": [call(a=1, b=2)]},
                         {"role": "tool", "content": "3"},
                         {"role": "assistant", "content": "<think>easy</think>It is 3."}], "tools": [ADD]}
PLAIN_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _build(path, tokenizer, **kwargs):
    return build_mixture(parse_mixer([path, "1.0"], ["train"]), tokenizer, EncodeOptions(2048, **kwargs), 0,
                         num_proc=1, skip_bad_rows=kwargs.pop("skip_bad_rows", False))


def test_stats_count_reasoning_tool_calls_and_results(in_tmp, hermes_tokenizer):
    path = _write(in_tmp / "tools.jsonl", [TOOL_ROW, PLAIN_ROW, TOOL_ROW])
    dataset, (stats,) = _build(path, hermes_tokenizer)
    assert (stats.rows_with_reasoning, stats.rows_with_tool_calls, stats.tool_results) == (2, 2, 2)
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    trained = hermes_tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>\n'
                       "<think>\neasy\n</think>\nIt is 3.<|im_end|>\n")


def test_a_malformed_tool_row_names_its_file_and_line(in_tmp, hermes_tokenizer):
    bad = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "tool_calls": [call("mul", a=1)]}], "tools": [ADD]}
    path = _write(in_tmp / "tools.jsonl", [TOOL_ROW, bad, PLAIN_ROW])
    with pytest.raises(DataError, match=rf"{path}:2: message 1 tool call 0 calls 'mul'"):
        _build(path, hermes_tokenizer)
    dataset, (stats,) = build_mixture(parse_mixer([path, "1.0"], ["train"]), hermes_tokenizer, EncodeOptions(2048),
                                      0, skip_bad_rows=True, num_proc=1)
    assert stats.dropped == {"bad_row": 1} and stats.kept_rows == len(dataset) == 2


def test_audit_and_printed_example_highlight_reasoning_and_tool_calls(in_tmp, hermes_tokenizer):
    from open_instruct.data import TokenizedMixture
    from open_instruct.prepare_data import highlight, segments

    path = _write(in_tmp / "tools.jsonl", [TOOL_ROW])
    dataset, stats = _build(path, hermes_tokenizer)
    mixture = TokenizedMixture(dataset, stats)
    ids, labels = mixture.examples([0])
    runs = segments(hermes_tokenizer, ids[0], labels[0], mixture.highlights(0))
    assert [(r["text"], r.get("kind")) for r in runs if r["trained"]] == [
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "tool_call"),
        ("<|im_end|>\n", None),
        ("<think>\neasy\n</think>\n", "reasoning"),
        ("It is 3.<|im_end|>\n", None),
    ]
    shown = highlight(runs, color=False)
    assert "«reasoning: <think>\neasy\n</think>\n»«It is 3.<|im_end|>\n»" in shown
    assert '«tool call: <tool_call>\n{"name": "add"' in shown
    assert "<tool_response>\n3\n</tool_response>" in shown and "«<tool_response>" not in shown
