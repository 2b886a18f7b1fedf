"""The mixture: spec parsing, sampling, JSONL checks and tokenization with per-source stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from open_instruct.data import (
    DataError,
    MixerItem,
    build_mixture,
    check_jsonl,
    format_stats,
    parse_mixer,
    sample_indices,
)
from open_instruct.tiny_model import build_tokenizer
from open_instruct.tokenization import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory, with the datasets cache inside it."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _item(amount: float, is_fraction: bool, name: str = "src") -> MixerItem:
    return MixerItem(name, amount, is_fraction, "train", "local")


# --- parse_mixer --------------------------------------------------------------------------------------------------


def test_parse_mixer_odd_number_of_items():
    with pytest.raises(DataError, match="pairs"):
        parse_mixer(["synthetic:spelling", "1.0", "synthetic:reverse"], ["train"])


def test_parse_mixer_amount_not_a_number_names_item():
    with pytest.raises(DataError) as info:
        parse_mixer(["synthetic:spelling", "abc"], ["train"])
    assert "'abc'" in str(info.value) and "synthetic:spelling" in str(info.value)


@pytest.mark.parametrize("amount", ["0", "-1.0", "0.0", "nan", "inf"])
def test_parse_mixer_amount_must_be_positive(amount):
    with pytest.raises(DataError, match="positive"):
        parse_mixer(["synthetic:spelling", amount], ["train"])


def test_parse_mixer_fraction_and_count():
    fraction, count = parse_mixer(["synthetic:spelling", "1.0", "synthetic:reverse", "100"], ["train"])
    assert (fraction.name, fraction.amount, fraction.is_fraction, fraction.kind) == ("synthetic:spelling", 1.0, True, "synthetic")
    assert (count.name, count.amount, count.is_fraction, count.kind) == ("synthetic:reverse", 100.0, False, "synthetic")
    assert fraction.split == count.split == "train"
    assert fraction.label == "synthetic:spelling (train)"


def test_parse_mixer_splits_one_per_source():
    items = parse_mixer(["synthetic:spelling", "1.0", "synthetic:reverse", "2"], ["train", "test"])
    assert [item.split for item in items] == ["train", "test"]


def test_parse_mixer_splits_length_mismatch():
    with pytest.raises(DataError, match="--dataset_mixer_list_splits has 2 entries"):
        parse_mixer(["synthetic:spelling", "1.0", "synthetic:reverse", "2", "synthetic:arithmetic", "3"],
                    ["train", "test"])


def test_parse_mixer_missing_local_file(in_tmp):
    with pytest.raises(DataError) as info:
        parse_mixer(["data/missing.jsonl", "1.0"], ["train"])
    assert "data/missing.jsonl" in str(info.value) and "does not exist" in str(info.value)


def test_parse_mixer_unknown_synthetic_task():
    with pytest.raises(DataError, match="synthetic:nope") as info:
        parse_mixer(["synthetic:nope", "1.0"], ["train"])
    assert "spelling" in str(info.value)


@pytest.mark.parametrize("name", ["org/name", "org/name@rev", "allenai/tulu-3-sft-mixture@main"])
def test_parse_mixer_hub_ids(name, in_tmp):
    (item,) = parse_mixer([name, "10"], ["train"])
    assert item.kind == "hub"
    assert item.name == name


@pytest.mark.parametrize("name", ["nonsense", "/org/name", "a/b/c", "org/", "@rev"])
def test_parse_mixer_unknown_name(name, in_tmp):
    with pytest.raises(DataError):
        parse_mixer([name, "1.0"], ["train"])


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


def test_sample_fraction_one_is_every_row_in_order():
    assert sample_indices(7, _item(1.0, True), np.random.default_rng(0)).tolist() == list(range(7))


def test_sample_same_seed_same_indices():
    for item in (_item(0.5, True), _item(2.5, True), _item(6, False)):
        first = sample_indices(100, item, np.random.default_rng(3))
        assert np.array_equal(first, sample_indices(100, item, np.random.default_rng(3)))
        assert not np.array_equal(first, sample_indices(100, item, np.random.default_rng(4)))


# --- check_jsonl --------------------------------------------------------------------------------------------------


def test_check_jsonl_bad_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n{"a": 2}\n')
    with pytest.raises(DataError) as info:
        check_jsonl(path)
    assert f"{path}:3" in str(info.value)


def test_check_jsonl_list_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r":2: each line must be a JSON object, got list"):
        check_jsonl(path)


def test_check_jsonl_good_file(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text('{"a": 1}\n\n{"b": [1]}\n')
    check_jsonl(path)


# --- build_mixture -------------------------------------------------------------------------------------------------


def test_build_mixture_local_and_synthetic(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("hi", "hello"), _chat("hey", "yo"), _chat("a", "b")])
    items = parse_mixer([path, "1.0", "synthetic:spelling", "5"], ["train"])
    mixture = build_mixture(items, tokenizer, max_seq_length=512, seed=0, show_progress=False)
    assert len(mixture) == 8
    local, synth = mixture.stats
    assert (local.name, local.split) == (path, "train")
    assert (local.source_rows, local.sampled_rows, local.kept_rows, local.truncated_rows) == (3, 3, 3, 0)
    # "hello<|endoftext|>", "yo<|endoftext|>", "b<|endoftext|>": one token per byte plus eos.
    assert local.trained_tokens == 6 + 3 + 2
    # "<|user|>\nhi\n<|assistant|>\nhello<|endoftext|>" is 13 tokens.
    assert len(mixture.input_ids[0]) == 13
    assert local.tokens == 13 + 11 + 8
    assert tokenizer.decode(mixture.input_ids[0].tolist()) == "<|user|>\nhi\n<|assistant|>\nhello<|endoftext|>"
    assert (synth.source_rows, synth.sampled_rows, synth.kept_rows) == (7151, 5, 5)
    assert synth.trained_tokens > 0
    assert synth.dropped == {} and local.dropped == {}
    for ids, labels in zip(mixture.input_ids, mixture.labels):
        assert ids.dtype == np.int32 and labels.shape == ids.shape
        assert ((labels == IGNORE_INDEX) | (labels == ids)).all()
    assert "chat.jsonl" in format_stats(mixture.stats)


def test_build_mixture_is_seeded(in_tmp, tokenizer):
    items = parse_mixer(["synthetic:reverse", "6"], ["train"])

    def build(seed):
        return [ids.tolist() for ids in build_mixture(items, tokenizer, 512, seed, show_progress=False).input_ids]

    assert build(1) == build(1)
    assert build(1) != build(2)


def test_build_mixture_bad_role_names_row(in_tmp, tokenizer):
    bad = {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]}
    path = _jsonl(in_tmp / "roles.jsonl", [_chat("hi", "ok"), bad])
    with pytest.raises(DataError) as info:
        build_mixture(parse_mixer([path, "1.0"], ["train"]), tokenizer, 512, 0, show_progress=False)
    message = str(info.value)
    assert "row 1" in message and "robot" in message and "roles.jsonl" in message


def test_build_mixture_row_without_assistant(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "noassist.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="row 0: no assistant message"):
        build_mixture(parse_mixer([path, "1.0"], ["train"]), tokenizer, 512, 0, show_progress=False)


def test_build_mixture_row_without_messages_column(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "nomsg.jsonl", [{"text": "hi"}])
    with pytest.raises(DataError, match="no 'messages' column"):
        build_mixture(parse_mixer([path, "1.0"], ["train"]), tokenizer, 512, 0, show_progress=False)


def test_build_mixture_bad_jsonl_line_names_line(in_tmp, tokenizer):
    path = in_tmp / "broken.jsonl"
    path.write_text(json.dumps(_chat("hi", "ok")) + "\nnot json\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        build_mixture(parse_mixer([str(path), "1.0"], ["train"]), tokenizer, 512, 0, show_progress=False)


def test_build_mixture_drops_rows_truncated_before_the_answer(in_tmp, tokenizer):
    # "<|user|>\n" + 30 bytes + "\n<|assistant|>\n" is 34 tokens: at 20 the answer is cut entirely.
    long_prompt = _chat("x" * 30, "ok")
    path = _jsonl(in_tmp / "mixed.jsonl", [_chat("hi", "hello"), long_prompt])
    mixture = build_mixture(parse_mixer([path, "1.0"], ["train"]), tokenizer, 20, 0, show_progress=False)
    (stats,) = mixture.stats
    assert len(mixture) == 1
    assert (stats.sampled_rows, stats.kept_rows, stats.truncated_rows) == (2, 1, 1)
    assert stats.dropped == {"no_trained_tokens_after_truncation": 1}
    assert tokenizer.decode(mixture.input_ids[0].tolist()).endswith("hello<|endoftext|>")


def test_build_mixture_truncated_row_keeps_partial_answer(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "partial.jsonl", [_chat("hi", "hello")])
    # 13 tokens in all; 10 keeps "<|user|>\nhi\n<|assistant|>\nhel".
    mixture = build_mixture(parse_mixer([path, "1.0"], ["train"]), tokenizer, 10, 0, show_progress=False)
    (stats,) = mixture.stats
    assert (stats.kept_rows, stats.truncated_rows, stats.tokens, stats.trained_tokens) == (1, 1, 10, 3)
    assert len(mixture.input_ids[0]) == len(mixture.labels[0]) == 10


def test_build_mixture_all_dropped_raises(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "long.jsonl", [_chat("x" * 30, "ok"), _chat("y" * 40, "fine")])
    with pytest.raises(DataError, match="empty after tokenization"):
        build_mixture(parse_mixer([path, "1.0"], ["train"]), tokenizer, 20, 0, show_progress=False)


def test_build_mixture_local_source_has_only_train(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("hi", "ok")])
    with pytest.raises(DataError, match="only the split 'train'"):
        build_mixture(parse_mixer([path, "1.0"], ["test"]), tokenizer, 512, 0, show_progress=False)


def test_build_mixture_count_larger_than_local_source(in_tmp, tokenizer):
    path = _jsonl(in_tmp / "chat.jsonl", [_chat("hi", "ok"), _chat("a", "b")])
    with pytest.raises(DataError, match="has 2 rows but the mixer asks for 3"):
        build_mixture(parse_mixer([path, "3"], ["train"]), tokenizer, 512, 0, show_progress=False)
