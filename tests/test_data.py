"""The mixture: spec parsing (list and file), sampling, local sources, formats, row policies, truncation, masks and
the tokenized examples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from open_instruct.data import (
    DataError,
    EncodeOptions,
    MixerItem,
    TokenizedMixture,
    build_mixture,
    format_stats,
    load_source,
    parse_mixer,
    parse_mixer_file,
    resolve_mixture,
    sample_indices,
)
from open_instruct.tiny_model import build_tokenizer
from open_instruct.tokenization import IGNORE_INDEX

EOS = "<|endoftext|>"

# Renders the messages in reverse order: rendering a prefix of the conversation is no prefix of the whole, so
# assistant spans of multi-message rows cannot be derived; a row holding one assistant message is still maskable.
# Renders an assistant's "!" as "." : a turn with "!" cannot be found in the render (its trained text would not be
# its content), so its row is a mask error; rows without "!" mask exactly.
ALTERING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '<|assistant|>\\n' + message['content'] | replace('!', '.') }}"
    "{{ eos_token + '\\n' }}"
    "{%- else -%}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory, with the datasets cache inside it (nothing is written to the home dir)."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _item(amount: float, is_fraction: bool, name: str = "src") -> MixerItem:
    return MixerItem(name, amount, is_fraction, "train", "local")


def _build(items, tokenizer, max_seq_length=512, seed=0, **kwargs):
    truncation = kwargs.pop("truncation", "whole_turns")
    options = EncodeOptions(max_seq_length, truncation=truncation)
    return build_mixture(items, tokenizer, options, seed, num_proc=kwargs.pop("num_proc", 1), **kwargs)


def _trained_text(tokenizer, input_ids, labels) -> str:
    return tokenizer.decode([int(t) for t, l in zip(input_ids, labels) if l != IGNORE_INDEX])


def _rows(dataset) -> list[tuple[list[int], list[int]]]:
    return [(list(map(int, r["input_ids"])), list(map(int, r["labels"]))) for r in dataset]


# --- parse_mixer --------------------------------------------------------------------------------------------------


def test_parse_mixer_odd_number_of_items():
    with pytest.raises(DataError, match="pairs"):
        parse_mixer(["synthetic:spelling", "1.0", "synthetic:reverse"], ["train"])


def test_parse_mixer_amount_not_a_number_names_item():
    with pytest.raises(DataError, match="not a number") as info:
        parse_mixer(["synthetic:spelling", "abc"], ["train"])
    assert "'abc'" in str(info.value) and "synthetic:spelling" in str(info.value)


@pytest.mark.parametrize("amount", ["0", "-1.0", "0.0", "nan", "inf"])
def test_parse_mixer_amount_must_be_positive(amount):
    with pytest.raises(DataError, match="positive"):
        parse_mixer(["synthetic:spelling", amount], ["train"])


@pytest.mark.parametrize("amount", ["1e3", "+5", "10e0"])
def test_parse_mixer_amount_neither_integer_nor_fraction(amount):
    with pytest.raises(DataError, match="integer row count") as info:
        parse_mixer(["synthetic:spelling", amount], ["train"])
    assert repr(amount) in str(info.value)


def test_parse_mixer_fraction_and_count():
    fraction, count = parse_mixer(["synthetic:spelling", "1.0", "synthetic:reverse", "100"], ["train"])
    assert (fraction.name, fraction.amount, fraction.is_fraction, fraction.kind) == (
        "synthetic:spelling", 1.0, True, "synthetic")
    assert (count.name, count.amount, count.is_fraction, count.kind) == ("synthetic:reverse", 100.0, False, "synthetic")
    assert fraction.split == count.split == "train"
    assert fraction.format is None and fraction.columns is None
    assert fraction.label == "synthetic:spelling (train)"


def test_parse_mixer_splits_one_per_source():
    items = parse_mixer(["synthetic:spelling", "1.0", "synthetic:reverse", "2"], ["train", "test"])
    assert [item.split for item in items] == ["train", "test"]


def test_parse_mixer_splits_length_mismatch():
    with pytest.raises(DataError, match="--dataset_mixer_list_splits has 2 entries"):
        parse_mixer(["synthetic:spelling", "1.0", "synthetic:reverse", "2", "synthetic:arithmetic", "3"],
                    ["train", "test"])


def test_parse_mixer_missing_local_file():
    with pytest.raises(DataError) as info:
        parse_mixer(["data/missing.jsonl", "1.0"], ["train"])
    assert "data/missing.jsonl" in str(info.value) and "does not exist" in str(info.value)


def test_parse_mixer_unknown_synthetic_task():
    with pytest.raises(DataError, match="synthetic:nope") as info:
        parse_mixer(["synthetic:nope", "1.0"], ["train"])
    assert "spelling" in str(info.value)


@pytest.mark.parametrize("name", ["org/name", "org/name@rev", "allenai/tulu-3-sft-mixture@main"])
def test_parse_mixer_hub_ids(name):
    (item,) = parse_mixer([name, "10"], ["train"])
    assert item.kind == "hub"
    assert item.name == name


@pytest.mark.parametrize("name", ["nonsense", "/org/name", "a/b/c", "org/", "@rev", "./chat"])
def test_parse_mixer_unknown_name(name):
    with pytest.raises(DataError, match="does not exist|Unknown dataset"):
        parse_mixer([name, "1.0"], ["train"])


def test_parse_mixer_bare_word_says_what_is_accepted():
    with pytest.raises(DataError) as info:
        parse_mixer(["nonsense", "1.0"], ["train"])
    assert "'nonsense'" in str(info.value) and "org/name" in str(info.value) and "synthetic:" in str(info.value)


def test_parse_mixer_local_file_and_folder(in_tmp):
    (in_tmp / "data").mkdir()
    _jsonl(in_tmp / "data" / "a.jsonl", [_chat("hi", "ok")])
    (in_tmp / "empty").mkdir()
    (in_tmp / "notes.txt").write_text("x")
    file_item, folder_item = parse_mixer(["data/a.jsonl", "1.0", "data", "1"], ["train"])
    assert file_item.kind == folder_item.kind == "local"
    with pytest.raises(DataError, match="holds no"):
        parse_mixer(["empty", "1.0"], ["train"])
    with pytest.raises(DataError, match="unsupported"):
        parse_mixer(["notes.txt", "1.0"], ["train"])


# --- parse_mixer_file / resolve_mixture ---------------------------------------------------------------------------


def test_parse_mixer_file_yaml_list(in_tmp):
    _jsonl(in_tmp / "chat.jsonl", [{"chat": _chat("hi", "ok")["messages"]}])
    (in_tmp / "mix.yaml").write_text(
        "- name: synthetic:spelling\n"
        "  amount: 0.5\n"
        "- name: synthetic:reverse\n"
        "  amount: 20\n"
        "  split: test\n"
        "- name: chat.jsonl\n"
        "  amount: 1.0\n"
        "  format: messages\n"
        "  columns: {messages: chat}\n"
    )
    spelling, reverse, chat = parse_mixer_file(in_tmp / "mix.yaml")
    assert (spelling.name, spelling.amount, spelling.is_fraction, spelling.split, spelling.kind) == (
        "synthetic:spelling", 0.5, True, "train", "synthetic")
    assert (spelling.format, spelling.columns) == (None, None)
    assert (reverse.amount, reverse.is_fraction, reverse.split) == (20.0, False, "test")
    assert (chat.kind, chat.format, chat.columns) == ("local", "messages", {"messages": "chat"})


def test_parse_mixer_file_sources_mapping_and_default_split(in_tmp):
    (in_tmp / "mix.yaml").write_text("sources:\n  - {name: synthetic:spelling, amount: 3}\n"
                                     "  - {name: synthetic:reverse, amount: 1.0, split: train}\n")
    first, second = parse_mixer_file(in_tmp / "mix.yaml", default_split="test")
    assert (first.name, first.amount, first.is_fraction, first.split) == ("synthetic:spelling", 3.0, False, "test")
    assert (second.name, second.split) == ("synthetic:reverse", "train")


def test_parse_mixer_file_json(in_tmp):
    spec = [{"name": "synthetic:arithmetic", "amount": "0.25", "format": "messages"}]
    (in_tmp / "mix.json").write_text(json.dumps({"sources": spec}))
    (item,) = parse_mixer_file(in_tmp / "mix.json")
    assert (item.name, item.amount, item.is_fraction, item.format, item.kind) == (
        "synthetic:arithmetic", 0.25, True, "messages", "synthetic")


def test_parse_mixer_file_missing():
    with pytest.raises(DataError, match="nope.yaml does not exist"):
        parse_mixer_file("nope.yaml")


@pytest.mark.parametrize("text", ["name: synthetic:spelling\namount: 1.0\n", "42\n", "[]\n", "", "sources: 3\n"])
def test_parse_mixer_file_not_a_list(in_tmp, text):
    (in_tmp / "mix.yaml").write_text(text)
    with pytest.raises(DataError, match="non-empty list of sources"):
        parse_mixer_file(in_tmp / "mix.yaml")


def test_parse_mixer_file_invalid_yaml(in_tmp):
    (in_tmp / "mix.yaml").write_text("- name: [unclosed\n")
    with pytest.raises(DataError, match="not valid YAML"):
        parse_mixer_file(in_tmp / "mix.yaml")


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ("{name: synthetic:reverse}", "needs 'name' and 'amount'"),
        ("{amount: 1.0}", "needs 'name' and 'amount'"),
        ("synthetic:reverse 1.0", "needs 'name' and 'amount'"),
        ("{name: synthetic:reverse, amount: 1.0, weight: 2}", "unknown keys weight"),
        ("{name: synthetic:reverse, amount: 1.0, format: csv}", "format 'csv'"),
        ("{name: synthetic:reverse, amount: 1.0, columns: [messages, chat]}", "columns must map"),
        ("{name: synthetic:reverse, amount: 1.0, columns: {messages: 3}}", "columns must map"),
        ("{name: synthetic:reverse, amount: abc}", "not a number"),
        ("{name: synthetic:reverse, amount: 0}", "positive"),
        ("{name: synthetic:nope, amount: 1.0}", "Unknown synthetic source"),
        ("{name: missing.jsonl, amount: 1.0}", "does not exist"),
    ],
)
def test_parse_mixer_file_bad_entry_names_the_source(in_tmp, second, message):
    (in_tmp / "mix.yaml").write_text(f"- {{name: synthetic:spelling, amount: 1.0}}\n- {second}\n")
    with pytest.raises(DataError, match=message) as info:
        parse_mixer_file(in_tmp / "mix.yaml")
    assert "source 2" in str(info.value) and "mix.yaml" in str(info.value)


def test_parse_mixer_file_rejects_unknown_column_field(in_tmp):
    _jsonl(in_tmp / "chat.jsonl", [{"chat": _chat("hi", "ok")["messages"]}])
    (in_tmp / "mix.yaml").write_text("- {name: chat.jsonl, amount: 1.0, columns: {bogus: chat}}\n")
    with pytest.raises(DataError, match="bogus"):
        parse_mixer_file(in_tmp / "mix.yaml")


def _args(*extra):
    from open_instruct.args import parse_args

    return parse_args(["--model_name_or_path", "x", "--dataset_local_cache_dir", "cache", *extra])


def test_resolve_mixture_list_or_file_not_both(in_tmp):
    (in_tmp / "mix.yaml").write_text("- {name: synthetic:reverse, amount: 2}\n")
    with pytest.raises(DataError, match="not both"):
        resolve_mixture(_args("--dataset_mixer_list", "synthetic:spelling", "1.0", "--dataset_mixer_file", "mix.yaml"))
    (from_file,) = resolve_mixture(_args("--dataset_mixer_file", "mix.yaml", "--dataset_mixer_list_splits", "test"))
    assert (from_file.name, from_file.amount, from_file.split) == ("synthetic:reverse", 2.0, "test")
    (from_list,) = resolve_mixture(_args("--dataset_mixer_list", "synthetic:spelling", "1.0"))
    assert (from_list.name, from_list.is_fraction) == ("synthetic:spelling", True)


# --- sample_indices ----------------------------------------------------------------------------------------------


def test_sample_count_larger_than_source():
    with pytest.raises(DataError) as info:
        sample_indices(10, _item(11, False), np.random.default_rng(0))
    assert "has 10 rows" in str(info.value) and "11" in str(info.value)


def test_sample_count():
    indices = sample_indices(10, _item(4, False), np.random.default_rng(0))
    assert len(indices) == 4 and len(set(indices.tolist())) == 4
    assert all(0 <= i < 10 for i in indices)
    assert sorted(sample_indices(10, _item(10, False), np.random.default_rng(0)).tolist()) == list(range(10))


def test_sample_fraction_above_one_repeats():
    indices = sample_indices(10, _item(2.5, True), np.random.default_rng(0))
    assert len(indices) == 25
    counts = np.bincount(indices, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3
    assert (counts == 3).sum() == 5


def test_sample_fraction_below_one():
    indices = sample_indices(10, _item(0.5, True), np.random.default_rng(0))
    assert len(indices) == 5 and len(set(indices.tolist())) == 5
    assert all(0 <= i < 10 for i in indices)


def test_sample_fraction_one_is_every_row_in_order():
    assert sample_indices(7, _item(1.0, True), np.random.default_rng(0)).tolist() == list(range(7))


def test_sample_same_seed_same_indices():
    for item in (_item(0.5, True), _item(2.5, True), _item(6, False)):
        first = sample_indices(100, item, np.random.default_rng(3))
        assert np.array_equal(first, sample_indices(100, item, np.random.default_rng(3)))
        assert not np.array_equal(first, sample_indices(100, item, np.random.default_rng(4)))


# --- local sources ------------------------------------------------------------------------------------------------


def _load(name: str):
    (item,) = parse_mixer([name, "1.0"], ["train"])
    return load_source(item)


def test_jsonl_bad_line_is_named(in_tmp):
    path = in_tmp / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n{"a": 2}\n')
    with pytest.raises(DataError, match="invalid JSON") as info:
        _load(str(path))
    assert f"{path}:3" in str(info.value)


def test_jsonl_line_that_is_a_list(in_tmp):
    path = in_tmp / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="each line must be a JSON object, got list") as info:
        _load(str(path))
    assert f"{path}:2" in str(info.value)


def test_jsonl_rows_and_locations_skip_blank_lines(in_tmp):
    path = in_tmp / "good.jsonl"
    path.write_text('{"a": 1}\n\n{"b": [1]}\n')
    source = _load(str(path))
    assert len(source) == 2
    assert source.first_row() == {"a": 1}
    assert [source.location(0), source.location(1)] == [f"{path}:1", f"{path}:3"]


def test_json_list_of_objects(in_tmp, tokenizer):
    path = in_tmp / "chat.json"
    path.write_text(json.dumps([_chat("hi", "hello"), _chat("yo", "hey")], indent=2))
    source = _load(str(path))
    assert len(source) == 2 and source.location(1) == f"{path} item 1"
    dataset, (stats,) = _build(parse_mixer([str(path), "1.0"], ["train"]), tokenizer)
    assert stats.format == "messages" and stats.kept_rows == 2
    assert [_trained_text(tokenizer, ids, labels) for ids, labels in _rows(dataset)] == ["hello" + EOS, "hey" + EOS]


def test_json_wrapped_list(in_tmp):
    path = in_tmp / "wrapped.json"
    path.write_text(json.dumps({"data": [{"prompt": "p", "completion": "c"}] * 3}))
    assert len(_load(str(path))) == 3


def test_json_invalid_names_the_line(in_tmp):
    path = in_tmp / "broken.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,,}\n]\n')
    with pytest.raises(DataError, match="invalid JSON") as info:
        _load(str(path))
    assert f"{path}:3" in str(info.value)


def test_json_holding_one_object_is_one_row(in_tmp):
    path = in_tmp / "one.json"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(row))
    source = load_source(parse_mixer([str(path), "1.0"], ["train"])[0])
    assert len(source) == 1 and source.first_row() == row


@pytest.mark.parametrize("value", [42, [{"a": 1}, 3]])
def test_json_must_hold_a_list_of_objects(in_tmp, value):
    path = in_tmp / "odd.json"
    path.write_text(json.dumps(value))
    with pytest.raises(DataError, match="list of objects"):
        _load(str(path))


def test_folder_of_jsonl_is_read_in_sorted_order(in_tmp):
    folder = in_tmp / "data"
    (folder / "sub").mkdir(parents=True)
    _jsonl(folder / "b.jsonl", [{"n": 2}, {"n": 3}])  # written first: the order must not follow creation
    _jsonl(folder / "sub" / "c.jsonl", [{"n": 4}])
    _jsonl(folder / "a.jsonl", [{"n": 1}])
    (folder / "README.md").write_text("ignored")
    source = _load("data")
    rows = [json.loads(r["__json"])["n"] for r in source.dataset]
    assert rows == [1, 2, 3, 4]
    assert source.location(2) == "data/b.jsonl:2" and source.location(3) == "data/sub/c.jsonl:1"


def test_parquet_file(in_tmp, tokenizer):
    import datasets

    rows = [_chat("hi", "hello"), _chat("yo", "hey"), _chat("a", "b")]
    datasets.Dataset.from_list(rows).to_parquet(str(in_tmp / "chat.parquet"))
    source = _load("chat.parquet")
    assert len(source) == 3 and source.first_row() == rows[0]
    dataset, (stats,) = _build(parse_mixer(["chat.parquet", "1.0"], ["train"]), tokenizer)
    assert (stats.format, stats.source_rows, stats.kept_rows) == ("messages", 3, 3)
    assert [_trained_text(tokenizer, *row) for row in _rows(dataset)] == ["hello" + EOS, "hey" + EOS, "b" + EOS]


def test_parquet_bad_row_names_the_row(in_tmp, tokenizer):
    import datasets

    rows = [_chat("hi", "hello"), {"messages": [{"role": "user", "content": "no answer"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(in_tmp / "chat.parquet"))
    with pytest.raises(DataError, match="no assistant message") as info:
        _build(parse_mixer(["chat.parquet", "1.0"], ["train"]), tokenizer)
    assert "chat.parquet (train) row 1" in str(info.value)


def test_folder_mixing_parquet_and_jsonl(in_tmp):
    import datasets

    (in_tmp / "data").mkdir()
    datasets.Dataset.from_list([_chat("hi", "hello")]).to_parquet(str(in_tmp / "data" / "a.parquet"))
    _jsonl(in_tmp / "data" / "b.jsonl", [_chat("yo", "hey")])
    with pytest.raises(DataError, match="mixes parquet and JSON"):
        _load("data")


def test_local_source_has_only_train(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("hi", "ok")])
    with pytest.raises(DataError, match="only the split 'train'"):
        _build(parse_mixer([path, "1.0"], ["test"]), tokenizer)


# --- build_mixture: stats and formats -----------------------------------------------------------------------------


def test_build_mixture_local_and_synthetic(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("hi", "hello"), _chat("hey", "yo"), _chat("a", "b")])
    items = parse_mixer([path, "1.0", "synthetic:spelling", "5"], ["train"])
    dataset, (local, synth) = _build(items, tokenizer)
    assert len(dataset) == 8
    assert (local.name, local.split, local.format) == (path, "train", "messages")
    assert (local.source_rows, local.sampled_rows, local.kept_rows) == (3, 3, 3)
    # "hello<|endoftext|>", "yo<|endoftext|>", "b<|endoftext|>": one token per byte plus eos.
    assert local.trained_tokens == 6 + 3 + 2
    # "<|user|>\nhi\n<|assistant|>\nhello<|endoftext|>" is 13 tokens.
    first_ids, first_labels = _rows(dataset)[0]
    assert len(first_ids) == 13 and local.tokens == 13 + 11 + 8
    assert tokenizer.decode(first_ids) == "<|user|>\nhi\n<|assistant|>\nhello<|endoftext|>"
    assert dataset[0]["num_tokens"] == 13
    assert (synth.source_rows, synth.sampled_rows, synth.kept_rows) == (7151, 5, 5)
    assert synth.trained_tokens > 0
    assert local.dropped == local.truncated == synth.dropped == {}
    for ids, labels in _rows(dataset):
        assert len(ids) == len(labels)
        assert all(l == IGNORE_INDEX or l == t for t, l in zip(ids, labels))
    table = format_stats([local, synth])
    assert "chat.jsonl (train)" in table and "synthetic:spelling (train)" in table and "7151" in table


FORMAT_ROWS = {
    "alpaca": ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "<|user|>\nAdd\n\n2 and 3\n", "5"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
                 "<|user|>\nhi\n", "hello"),
    "dolly": ({"instruction": "Sum", "context": "1, 2", "response": "3", "category": "qa"},
              "<|user|>\nSum\n\n1, 2\n", "3"),
    "openorca": ({"id": "x1", "system_prompt": "Be brief.", "question": "Why?", "response": "Because."},
                 "<|system|>\nBe brief.\n<|user|>\nWhy?\n", "Because."),
    "prompt_completion": ({"prompt": "The sky is", "completion": " blue."}, "<|user|>\nThe sky is\n", " blue."),
    "messages": ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                               {"role": "assistant", "content": "A"}]}, "<|system|>\nS\n<|user|>\nU\n", "A"),
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
def test_build_mixture_detects_each_format(in_tmp, tokenizer, fmt):
    row, prompt, response = FORMAT_ROWS[fmt]
    path = _jsonl(in_tmp / f"{fmt}.jsonl", [row, row])
    dataset, (stats,) = _build(parse_mixer([path, "1.0"], ["train"]), tokenizer)
    assert stats.format == fmt
    assert stats.kept_rows == len(dataset) == 2
    ids, labels = _rows(dataset)[0]
    assert _trained_text(tokenizer, ids, labels) == response + EOS
    assert tokenizer.decode(ids) == prompt + "<|assistant|>\n" + response + EOS


def test_build_mixture_columns_mapping(in_tmp, tokenizer):
    _jsonl(in_tmp / "chat.jsonl", [{"chat": _chat("hi", "mapped")["messages"]}])
    _jsonl(in_tmp / "qa.jsonl", [{"q": "Why?", "a": "Because.", "output": "not this"}])
    (in_tmp / "mix.yaml").write_text("- {name: chat.jsonl, amount: 1.0, columns: {messages: chat}}\n"
                                     "- {name: qa.jsonl, amount: 1.0, columns: {instruction: q, output: a}}\n")
    dataset, (chat, qa) = _build(parse_mixer_file(in_tmp / "mix.yaml"), tokenizer)
    assert (chat.format, qa.format) == ("messages", "alpaca")
    assert [_trained_text(tokenizer, *row) for row in _rows(dataset)] == ["mapped" + EOS, "Because." + EOS]


def test_build_mixture_explicit_format_overrides_detection(in_tmp, tokenizer):
    row = {**_chat("hi", "from messages"), "prompt": "p", "completion": "from completion"}
    path = _jsonl(in_tmp / "both.jsonl", [row])
    (detected,) = parse_mixer([path, "1.0"], ["train"])
    forced = MixerItem(path, 1.0, True, "train", "local", format="prompt_completion")
    for item, fmt, response in ((detected, "messages", "from messages"),
                                (forced, "prompt_completion", "from completion")):
        dataset, (stats,) = _build([item], tokenizer)
        assert stats.format == fmt
        assert _trained_text(tokenizer, *_rows(dataset)[0]) == response + EOS


def test_build_mixture_no_format_matches(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "text.jsonl", [{"text": "hi", "label": 1}])
    with pytest.raises(DataError, match="Cannot detect the dataset format") as info:
        _build(parse_mixer([path, "1.0"], ["train"]), tokenizer)
    assert f"{path}:1" in str(info.value) and "label, text" in str(info.value)


def test_build_mixture_columns_naming_a_missing_column(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [{"chat": _chat("hi", "ok")["messages"]}])
    item = MixerItem(path, 1.0, True, "train", "local", columns={"messages": "conversation"})
    with pytest.raises(DataError, match="conversation") as info:
        _build([item], tokenizer)
    assert path in str(info.value)


def test_build_mixture_columns_field_not_in_format(in_tmp, tokenizer):
    _jsonl(in_tmp / "chat.jsonl", [{"chat": _chat("hi", "ok")["messages"]}])
    (in_tmp / "mix.yaml").write_text("- {name: chat.jsonl, amount: 1.0, format: alpaca, columns: {messages: chat}}\n")
    with pytest.raises(DataError, match="messages"):
        _build(parse_mixer_file(in_tmp / "mix.yaml"), tokenizer)


# --- bad rows -----------------------------------------------------------------------------------------------------

BAD_ROWS = {
    "unknown_role": ({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]},
                     "unknown role 'robot'"),
    "non_string_content": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
                           "content must be a string"),
    "no_assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
}


def _file_with_bad_line_4(in_tmp, bad_row) -> str:
    # Line 2 is blank: the reported line is the file's line, not the row's index.
    good = [json.dumps(_chat(f"q{i}", f"a{i}")) for i in range(4)]
    lines = [good[0], "", good[1], json.dumps(bad_row), good[2], good[3]]
    path = in_tmp / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
@pytest.mark.parametrize("amount", ["1.0", "5"])  # in order, and a shuffled count sample
def test_bad_row_stops_with_file_and_line(in_tmp, tokenizer, kind, amount):
    bad_row, message = BAD_ROWS[kind]
    path = _file_with_bad_line_4(in_tmp, bad_row)
    with pytest.raises(DataError, match=message) as info:
        _build(parse_mixer([path, amount], ["train"]), tokenizer)
    assert f"{path}:4:" in str(info.value) and "--skip_bad_rows" in str(info.value)


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_skipped_and_counted(in_tmp, tokenizer, kind):
    path = _file_with_bad_line_4(in_tmp, BAD_ROWS[kind][0])
    dataset, (stats,) = _build(parse_mixer([path, "1.0"], ["train"]), tokenizer, skip_bad_rows=True)
    assert stats.dropped == {"bad_row": 1}
    assert (stats.source_rows, stats.sampled_rows, stats.kept_rows) == (5, 5, 4)
    assert [_trained_text(tokenizer, *row) for row in _rows(dataset)] == [f"a{i}{EOS}" for i in range(4)]
    assert "bad_row=1" in format_stats([stats])


# --- truncation ---------------------------------------------------------------------------------------------------

TWO_TURNS = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "more"}, {"role": "assistant", "content": "x" * 50}]}
FIRST_TURN = "<|user|>\nhi\n<|assistant|>\nhello" + EOS  # 13 tokens


def test_truncation_whole_turns(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "long.jsonl", [_chat("a", "b"), TWO_TURNS])
    dataset, (stats,) = _build(parse_mixer([path, "1.0"], ["train"]), tokenizer, max_seq_length=20)
    assert stats.truncated == {"whole_turns": 1} and stats.dropped == {}
    assert stats.kept_rows == 2
    ids, labels = _rows(dataset)[1]
    assert tokenizer.decode(ids) == FIRST_TURN
    assert _trained_text(tokenizer, ids, labels) == "hello" + EOS


def test_truncation_whole_turns_drops_rows_whose_first_answer_does_not_fit(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "long.jsonl", [_chat("a", "b"), _chat("y" * 40, "ok")])
    dataset, (stats,) = _build(parse_mixer([path, "1.0"], ["train"]), tokenizer, max_seq_length=20)
    assert stats.dropped == {"dropped_too_long": 1} and stats.kept_rows == len(dataset) == 1


def test_truncation_drop(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "long.jsonl", [_chat("a", "b"), TWO_TURNS, _chat("c", "d")])
    dataset, (stats,) = _build(parse_mixer([path, "1.0"], ["train"]), tokenizer, max_seq_length=20, truncation="drop")
    assert stats.dropped == {"dropped_too_long": 1} and stats.truncated == {}
    assert stats.kept_rows == len(dataset) == 2
    assert [_trained_text(tokenizer, *row) for row in _rows(dataset)] == ["b" + EOS, "d" + EOS]


def test_truncation_cut(in_tmp, tokenizer):
    rows = [_chat("hi", "x" * 50), _chat("y" * 40, "ok"), _chat("a", "b")]
    path = _jsonl(in_tmp / "long.jsonl", rows)
    dataset, (stats,) = _build(parse_mixer([path, "1.0"], ["train"]), tokenizer, max_seq_length=20, truncation="cut")
    # Row 0 is cut inside its answer; row 1 is cut before its answer starts, so nothing is left to train.
    assert stats.truncated == {"cut_in_assistant_turn": 1}
    assert stats.dropped == {"no_trained_tokens": 1}
    assert stats.kept_rows == len(dataset) == 2
    ids, labels = _rows(dataset)[0]
    assert len(ids) == 20
    assert tokenizer.decode(ids) == "<|user|>\nhi\n<|assistant|>\n" + "x" * 13
    assert _trained_text(tokenizer, ids, labels) == "x" * 13


def test_everything_dropped_is_an_error(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "long.jsonl", [_chat("x" * 30, "ok"), _chat("y" * 40, "fine")])
    with pytest.raises(DataError, match="empty after filtering") as info:
        _build(parse_mixer([path, "1.0"], ["train"]), tokenizer, max_seq_length=20, truncation="drop")
    assert "dropped_too_long=2" in str(info.value)


# --- mask errors --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def altering_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ALTERING_TEMPLATE
    return tokenizer


def test_mask_errors_stop_the_build(in_tmp, altering_tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("hi", "ok!"), _chat("yo", "hey!")])
    with pytest.raises(DataError, match="--max_unmaskable_fraction") as info:
        _build(parse_mixer([path, "1.0"], ["train"]), altering_tokenizer)
    assert "2 of 2 rows" in str(info.value) and f"{path}:1" in str(info.value)


def test_mask_errors_tolerated_are_counted(in_tmp, altering_tokenizer):
    bad = _jsonl(in_tmp / "chat.jsonl", [_chat("hi", "ok!"), _chat("yo", "hey!"), _chat("a", "b!")])
    solo = [{"messages": [{"role": "assistant", "content": "solo"}]}] * 2
    good = _jsonl(in_tmp / "solo.jsonl", solo)
    with pytest.raises(DataError, match="empty after filtering") as info:
        _build(parse_mixer([bad, "1.0"], ["train"]), altering_tokenizer, max_unmaskable_fraction=1.0)
    assert "mask_error=3" in str(info.value)
    dataset, (bad_stats, good_stats) = _build(parse_mixer([bad, "1.0", good, "1.0"], ["train"]), altering_tokenizer,
                                              max_unmaskable_fraction=1.0)
    assert bad_stats.dropped == {"mask_error": 3} and bad_stats.kept_rows == 0
    assert good_stats.dropped == {} and good_stats.kept_rows == 2 and len(dataset) == 2
    assert _trained_text(altering_tokenizer, *_rows(dataset)[0]) == "solo<|endoftext|>\n"


def test_mask_error_fraction_threshold(in_tmp, altering_tokenizer):
    solo = {"messages": [{"role": "assistant", "content": "solo"}]}
    path = _jsonl(in_tmp / "mixed.jsonl", [solo, _chat("hi", "ok!"), solo])  # 1 of 3 rows unmaskable
    items = parse_mixer([path, "1.0"], ["train"])
    with pytest.raises(DataError, match="1 of 3 rows"):
        _build(items, altering_tokenizer, max_unmaskable_fraction=0.3)
    dataset, (stats,) = _build(items, altering_tokenizer, max_unmaskable_fraction=0.5)
    assert stats.dropped == {"mask_error": 1} and stats.kept_rows == len(dataset) == 2


# --- sampling, examples, processes ---------------------------------------------------------------------------------


def test_build_mixture_is_seeded(tokenizer):
    items = parse_mixer(["synthetic:reverse", "6", "synthetic:spelling", "0.001"], ["train"])

    def build(seed):
        return _rows(_build(items, tokenizer, seed=seed)[0])

    first = build(1)
    assert len(first) == 6 + 7
    assert first == build(1)
    assert first != build(2)


def test_count_larger_than_local_source(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("hi", "ok"), _chat("a", "b")])
    with pytest.raises(DataError, match="has 2 rows but the mixer asks for 3"):
        _build(parse_mixer([path, "3"], ["train"]), tokenizer)


def test_fraction_that_samples_no_rows(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat(f"q{i}", f"a{i}") for i in range(10)])
    items = parse_mixer([path, "0.01", "synthetic:spelling", "3"], ["train"])
    try:
        dataset, (tiny, spelling) = _build(items, tokenizer)
    except DataError as error:
        assert path in str(error)
    else:
        assert (tiny.sampled_rows, tiny.kept_rows, len(dataset)) == (0, 0, 3)


def test_tokenized_mixture_examples(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("a", "one"), _chat("bb", "three"), _chat("ccc", "five!")])
    dataset, stats = _build(parse_mixer([path, "1.0"], ["train"]), tokenizer)
    mixture = TokenizedMixture(dataset, stats)
    assert len(mixture) == 3 and mixture.stats is stats
    input_ids, labels = mixture.examples([2, 0, 2, 1])
    assert len(input_ids) == len(labels) == 4
    assert all(isinstance(a, np.ndarray) and a.ndim == 1 for a in input_ids + labels)
    assert [_trained_text(tokenizer, i, l) for i, l in zip(input_ids, labels)] == [
        "five!" + EOS, "one" + EOS, "five!" + EOS, "three" + EOS]
    rows = _rows(dataset)
    for got_ids, got_labels, index in zip(input_ids, labels, [2, 0, 2, 1]):
        assert got_ids.tolist() == rows[index][0] and got_labels.tolist() == rows[index][1]


def test_tokenized_mixture_examples_of_equal_length(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("a", "x"), _chat("b", "y")])  # same length: numpy may stack them
    mixture = TokenizedMixture(*_build(parse_mixer([path, "1.0"], ["train"]), tokenizer))
    input_ids, labels = mixture.examples(np.array([1, 1, 0]))
    assert len(input_ids) == 3 and all(a.shape == (8,) for a in input_ids + labels)
    assert [tokenizer.decode(a.tolist())[-len(EOS) - 1:] for a in input_ids] == ["y" + EOS, "y" + EOS, "x" + EOS]


def test_two_processes_give_the_same_examples(tokenizer, monkeypatch):
    import datasets

    used = []
    original = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        used.append(kwargs.get("num_proc"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    monkeypatch.setattr("open_instruct.data.POOL_MIN_ROWS_PER_WORKER", 1000)  # a pool on 2,000 rows, for speed
    items = parse_mixer(["synthetic:spelling", "2000"], ["train"])
    serial, (serial_stats,) = _build(items, tokenizer, seed=5, num_proc=1)
    parallel, (parallel_stats,) = _build(items, tokenizer, seed=5, num_proc=2)
    assert used == [None, 2]  # one process: no worker pool at all; the second build really ran two workers
    assert len(parallel) == 2000
    assert _rows(serial) == _rows(parallel)
    assert vars(serial_stats) == vars(parallel_stats)


def test_pool_size_gives_each_worker_enough_rows_and_never_more_workers_than_asked(monkeypatch):
    from open_instruct import data

    monkeypatch.setattr(data, "usable_cores", lambda: 8)
    assert data.pool_size(5_530, None) is None  # one worker's worth: no pool
    assert data.pool_size(8_000, None) == 2
    assert data.pool_size(1_000_000, None) == 8  # every usable core
    assert data.pool_size(1_000_000, 3) == 3  # --dataset_num_proc caps it
    assert data.pool_size(1_000_000, 1) is None
    assert data.pool_size(9_000, 16) == 2
    assert data.pool_size(10, 2, min_rows_per_worker=1) == 2


def test_usable_cores_counts_the_affinity_not_the_machine():
    import os

    from open_instruct.data import usable_cores

    assert usable_cores() == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
