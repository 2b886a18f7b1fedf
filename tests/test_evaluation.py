"""In-loop evaluation (open_instruct/evaluation.py): metric definitions on literal numbers, multiple-choice and
exact-match scoring with fake models, the held-out split, ZeRO-3's equal forward counts, the flags; then tiny-model
runs (integration) and a 2-process ZeRO-3 run that must give the 1-process figures without hanging (multiprocess)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, clean_env, finetune, read_metrics, run, with_cache_dir
from open_instruct import synthetic
from open_instruct.args import ArgumentError, parse_args
from open_instruct.checkpointing import SAME_RUN_SETTINGS, resume_problems
from open_instruct.data import DataError, TokenizedMixture
from open_instruct.evaluation import (
    Evaluator,
    bits_per_byte,
    centered_accuracy,
    majority_baseline,
    eval_mixer_items,
    eval_summary,
    load_mc_file,
    rank_batches,
    reply_text,
    split_held_out,
    trained_bytes,
)
from open_instruct.tiny_model import build_tokenizer
from open_instruct.tokenization import IGNORE_INDEX, encode_messages

BASE = ["--model_name_or_path", "m", "--dataset_mixer_list", "synthetic:spelling", "1.0"]
ZERO3 = "configs/ds_configs/stage3_no_offloading_accelerate.conf"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()  # byte-level: one token per UTF-8 byte, tulu template, eos <|endoftext|>


class FakeAccelerator:
    """What the Evaluator uses of accelerate's Accelerator, for one rank of `num_processes`; reduce is local."""

    def __init__(self, process_index: int = 0, num_processes: int = 1):
        self.process_index, self.num_processes = process_index, num_processes
        self.device, self.is_main_process = torch.device("cpu"), process_index == 0

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def unwrap_model(self, model):
        return model


class FixedLogitsModel(torch.nn.Module):
    """The same next-token logits at every position: log-likelihoods are a fixed score per token."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.calls = logits, []

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False, **_):
        self.calls.append(input_ids.shape)
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def eval_args(*flags):
    return parse_args([*BASE, *flags])


def mixture_of(examples: list[list[int]]) -> TokenizedMixture:
    """A tokenized mixture of the given token lists, every token after the first trained."""
    import datasets

    labels = [[IGNORE_INDEX] + ids[1:] for ids in examples]
    dataset = datasets.Dataset.from_dict({"input_ids": examples, "labels": labels,
                                          "num_tokens": [len(x) for x in examples],
                                          "num_trained_tokens": [len(x) - 1 for x in examples]})
    return TokenizedMixture(dataset, [])


# ----------------------------------------------------------------------------------------------------------------
# Metric definitions
# ----------------------------------------------------------------------------------------------------------------
def test_centered_accuracy_on_literal_numbers():
    # generative (chance 0) at 0.5 -> 0.5; 4-way MC (chance 0.25) at 0.625 -> (0.625 - 0.25) / 0.75 = 0.5
    assert centered_accuracy([(0.5, 0.0), (0.625, 0.25)]) == pytest.approx(0.5)
    assert centered_accuracy([(0.25, 0.25)]) == 0.0  # guessing
    assert centered_accuracy([(1.0, 0.5), (0.0, 0.0)]) == pytest.approx(0.5)
    assert centered_accuracy([(0.0, 0.5)]) == pytest.approx(-1.0)  # worse than guessing is negative
    assert centered_accuracy([(1.0, 1.0), (0.5, 0.0)]) == pytest.approx(0.25)  # a floor of 1 shows nothing: 0


def test_majority_baseline_on_literal_lists():
    """Always giving the most common answer: its count / the number of answers."""
    assert majority_baseline(["1", "1", "2", "0", "1"]) == pytest.approx(3 / 5)
    assert majority_baseline(["a", "b", "c", "d"]) == pytest.approx(1 / 4)  # a tie: any one of them
    assert majority_baseline(["x"]) == 1.0
    assert majority_baseline([" 1", "1 ", "2"]) == pytest.approx(2 / 3)  # compared stripped, like exact match
    assert majority_baseline([1, 1, 0, 2]) == pytest.approx(1 / 2)  # multiple choice: correct choices' indices
    assert majority_baseline([]) == 0.0


def test_bits_per_byte_on_a_hand_computed_example(tokenizer):
    """'héllo' + eos as the trained reply: h, two bytes of é, l, l, o = 6 bytes in 6 byte tokens, plus the eos
    (0 bytes). With every trained token costing ln 2 nats (one bit): 7 bits over 6 bytes."""
    encoded = encode_messages(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "héllo"}])
    trained = [t for t, label in zip(encoded.input_ids[1:], encoded.labels[1:]) if label != IGNORE_INDEX]
    assert len(trained) == 7 and trained[-1] == tokenizer.eos_token_id
    assert trained_bytes(tokenizer, encoded.input_ids, encoded.labels) == 6
    assert bits_per_byte(7 * math.log(2), 6) == pytest.approx(7 / 6)
    # The first token is never predicted, so its byte never counts, even when its label is kept (train_on all).
    abc = tokenizer("abc", add_special_tokens=False).input_ids
    assert trained_bytes(tokenizer, abc, abc) == 2


def test_reply_text_stops_at_the_end_of_turn_and_keeps_special_tokens(tokenizer):
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert reply_text(tokenizer, ids("c a t") + [eos, pad, pad], [eos]) == "c a t"
    assert reply_text(tokenizer, ids(" c a t\n"), [eos]) == "c a t"  # no end marker: all of it, stripped
    assert reply_text(tokenizer, ids("c a") + ids("<|user|>") + ids("t") + [eos], [eos]) == "c a<|user|>t"


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------------------------
def write_jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("padding_free", [True, False], ids=["packed", "padded"])
def test_mc_scoring_picks_the_option_with_the_highest_log_likelihood(tokenizer, tmp_path, padding_free):
    """Logits favour 'b' strongly and 'a' a little, at every position: among equally long options 'bbb' has the
    highest log-likelihood, then 'aba', then 'aaa'. Q1 answers 'bbb' (right), Q2 'aaa' (wrong), Q3 'aba' among
    'aba'/'aaa'/'cac' (right)."""
    path = write_jsonl(tmp_path / "toy.jsonl", [
        {"question": "q1", "choices": ["aaa", "bbb", "aba"], "answer": 1},
        {"question": "q2", "choices": ["aaa", "bbb"], "answer": "A"},
        {"question": "q3", "choices": ["cac", "aaa", "aba", "ccc"], "answer": "c"},
    ])
    logits = torch.zeros(len(tokenizer))
    logits[tokenizer.convert_tokens_to_ids("b")], logits[tokenizer.convert_tokens_to_ids("a")] = 6.0, 2.0
    flags = ["--eval_tasks", f"mc:{path}", "--eval_batch_size", "2"] + ([] if padding_free else ["--no_padding_free"])
    evaluator = Evaluator.build(eval_args(*flags), tokenizer, FakeAccelerator(), None)
    model = FixedLogitsModel(logits)
    model.train()
    record = evaluator.run(model, step=7)
    assert model.training  # train mode restored
    assert record["step"] == 7 and record["eval/toy_accuracy"] == pytest.approx(2 / 3)
    assert record["eval/toy_majority_baseline"] == pytest.approx(1 / 3)  # correct choices 1, 0, 2: one each
    chance = (1 / 3 + 1 / 2 + 1 / 4) / 3
    assert record["eval/centered_accuracy"] == pytest.approx((2 / 3 - chance) / (1 - chance))
    assert "eval_loss" not in record


@pytest.mark.parametrize("row, problem", [
    ({"question": "q", "answer": 0}, "missing field 'choices'"),
    ({"choices": ["a", "b"], "answer": 0}, "missing field 'question'"),
    ({"question": "q", "choices": ["a", "b"]}, "missing field 'answer'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is out of range for 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer 'C' is out of range for 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": "1"}, "answer '1' must be a 0-based index or a letter"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "choices must be a list of at least two strings"),
    ('{"question": "q", "choices": [', "invalid JSON"),
])
def test_mc_file_errors_name_the_file_and_line(tmp_path, row, problem):
    good = {"question": "fine", "choices": ["x", "y"], "answer": "B"}
    path = write_jsonl(tmp_path / "mc.jsonl", [good, "", row])  # line 2 is blank: the bad row is line 3
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(problem)):
        load_mc_file(path)


def test_mc_answers_as_index_or_letter(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "answer": a}
                                               for a in (2, "B", "a")])
    assert [q.answer for q in load_mc_file(path)] == [2, 1, 0]


# ----------------------------------------------------------------------------------------------------------------
# Exact match
# ----------------------------------------------------------------------------------------------------------------
class ScriptedGenerator(torch.nn.Module):
    """generate() answers 'Spell the word: w' correctly (then eos, then padding) when w has an even length, else
    with a letter too many; records how it was called."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        assert generation_config.use_cache and not generation_config.do_sample
        self.calls.append({"rows": input_ids.shape[0], "synced_gpus": synced_gpus, "training": self.training,
                           "grad": torch.is_grad_enabled()})
        replies = []
        for row, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(row[mask.bool()].tolist())
            word = re.search(r"Spell the word: (\w+)", prompt).group(1)
            reply = " ".join(word) if len(word) % 2 == 0 else " ".join(word) + " q"
            replies.append(self.tokenizer(reply, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id])
        width = max(map(len, replies)) + 2
        new = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in replies])
        return torch.cat([input_ids, new], dim=1)


def test_exact_match_with_a_fake_generate(tokenizer):
    evaluator = Evaluator.build(eval_args("--eval_tasks", "spelling", "--eval_max_examples", "9", "--eval_batch_size",
                                          "4"), tokenizer, FakeAccelerator(), None)
    model = ScriptedGenerator(tokenizer)
    record = evaluator.run(model, step=0)
    words = [row["messages"][0]["content"].split(": ")[1] for row in synthetic.load_task("spelling", "test")[:9]]
    expected = sum(len(w) % 2 == 0 for w in words) / 9
    assert 0 < expected < 1
    assert record["eval/spelling_accuracy"] == pytest.approx(expected)
    answers = [row["messages"][1]["content"] for row in synthetic.load_task("spelling", "test")[:9]]
    baseline = max(map(answers.count, answers)) / 9
    assert record["eval/spelling_majority_baseline"] == pytest.approx(baseline)
    # Exact match has no chance of guessing, so the majority baseline is the floor the accuracy is centered on.
    assert record["eval/centered_accuracy"] == pytest.approx((expected - baseline) / (1 - baseline))
    assert [c["rows"] for c in model.calls] == [4, 4, 1]
    assert not any(c["synced_gpus"] or c["training"] or c["grad"] for c in model.calls)


def test_second_rank_pads_to_the_same_number_of_generate_calls_and_forwards(tokenizer):
    """Rank 1 of 2 holds fewer prompts and examples than rank 0; under ZeRO-3 it must still make as many generate
    calls and forward passes (dummy ones, results dropped), and generate with synced_gpus."""
    loss_set = mixture_of([[1, 2, 3, 4]] * 5)  # rank 0: rows 0, 2, 4 (2 batches of 2); rank 1: rows 1, 3 (1 batch)
    args = eval_args("--eval_tasks", "spelling", "--eval_max_examples", "5", "--eval_batch_size", "2",
                     "--eval_fraction", "0.5")
    counts = []
    for rank in (0, 1):
        evaluator = Evaluator.build(args, tokenizer, FakeAccelerator(rank, 2), loss_set)
        generator, forwards = ScriptedGenerator(tokenizer), FixedLogitsModel(torch.zeros(len(tokenizer)))
        generator.forward = forwards.forward  # uniform logits: every trained token costs ln V
        evaluator.run(generator, step=0)
        counts.append((len(generator.calls), len(forwards.calls)))
        assert all(c["synced_gpus"] for c in generator.calls)
        local = evaluator._loss_sums(generator)  # this rank's own sums: the dummy batch adds nothing
        assert local[1] == 3 * (3 if rank == 0 else 2)
        assert local[0] == pytest.approx(local[1] * math.log(len(tokenizer)), rel=1e-6)
    # 3 prompts and 3 examples on rank 0, 2 and 2 on rank 1, 2 per call: 2 generate calls and 2 forwards each
    assert counts == [(2, 2), (2, 2)]


def test_rank_batches_pad_every_rank_to_the_largest_share():
    assert rank_batches([1] * 5, 0, 2, 2) == ([[(0, 0), (2, 0)], [(4, 0)]], 2)
    assert rank_batches([1] * 5, 1, 2, 2) == ([[(1, 0), (3, 0)]], 2)
    # multiple choice: rank 0 holds questions 0 and 2 (3 + 4 options), rank 1 question 1 (2 options)
    mine, forwards = rank_batches([3, 2, 4], 1, 2, 3)
    assert mine == [[(1, 0), (1, 1)]] and forwards == 3


# ----------------------------------------------------------------------------------------------------------------
# The held-out split and the loss set
# ----------------------------------------------------------------------------------------------------------------
def test_eval_fraction_split_is_deterministic_and_disjoint_from_training():
    rng = np.random.default_rng(0)
    distinct = [rng.integers(1, 200, size=rng.integers(3, 12)).tolist() for _ in range(300)]
    examples = distinct + distinct[:50]  # 50 rows repeated, as an amount above 1.0 would
    mixture = mixture_of(examples)
    train, held = split_held_out(mixture, 0.1, seed=3)
    again_train, again_held = split_held_out(mixture_of(examples), 0.1, seed=3)
    assert np.array_equal(train.rows, again_train.rows) and np.array_equal(held.rows, again_held.rows)
    assert set(train.rows.tolist()).isdisjoint(held.rows.tolist())
    assert sorted(train.rows.tolist() + held.rows.tolist()) == list(range(len(examples)))
    train_tokens = {tuple(x) for x in train.examples(range(len(train)))[0]}
    held_tokens = {tuple(x) for x in held.examples(range(len(held)))[0]}
    assert len(held_tokens) == 30 and train_tokens.isdisjoint(held_tokens)  # 10% of 300 distinct, no copy leaks
    # The training part keeps the mixture's order, its lengths follow its rows, and another seed holds out others.
    assert np.all(np.diff(train.rows) > 0)
    assert train.lengths.tolist() == [len(examples[r]) for r in train.rows]
    assert not np.array_equal(split_held_out(mixture, 0.1, seed=4)[1].rows, held.rows)


def test_a_changed_eval_fraction_is_another_run_on_resume():
    assert "eval_fraction" in SAME_RUN_SETTINGS
    saved = {"settings": {"eval_fraction": 0.1}, "optimization": {}, "global_batch": "8", "data_fingerprint": "x"}
    now = {**saved, "settings": {"eval_fraction": 0.2}}
    assert resume_problems(saved, now)[0] == ["--eval_fraction: checkpoint 0.1, now 0.2"]
    before_eval_existed = {**saved, "settings": {}}  # a checkpoint of a run without the flag resumes without it
    assert resume_problems(before_eval_existed, {**saved, "settings": {"eval_fraction": None}})[0] == []


def test_loss_set_sums_over_trained_tokens_and_counts_their_bytes(tokenizer):
    """Uniform logits: every trained token costs ln V, so eval_loss = ln V and bits per byte = tokens x log2 V /
    bytes, with bytes from the decoded trained tokens (eos: 0 bytes)."""
    messages = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}] for reply in ("ab", "é", "xyz")]
    encoded = [encode_messages(tokenizer, m) for m in messages]
    import datasets

    loss_set = TokenizedMixture(datasets.Dataset.from_dict({
        "input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded],
        "num_tokens": [len(e.input_ids) for e in encoded],
        "num_trained_tokens": [sum(x != IGNORE_INDEX for x in e.labels[1:]) for e in encoded]}), [])
    evaluator = Evaluator.build(eval_args("--eval_fraction", "0.1", "--eval_batch_size", "2"), tokenizer,
                                FakeAccelerator(), loss_set)
    record = evaluator.run(FixedLogitsModel(torch.zeros(len(tokenizer))), step=0)
    tokens, num_bytes = (2 + 1) + (2 + 1) + (3 + 1), 2 + 2 + 3  # each reply's byte tokens + eos; é is two bytes
    assert record["eval_loss"] == pytest.approx(math.log(len(tokenizer)))
    assert record["eval_bits_per_byte"] == pytest.approx(tokens * math.log2(len(tokenizer)) / num_bytes)
    assert "eval/centered_accuracy" not in record


def test_eval_sources_default_to_test_splits_and_local_files_whole(tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]}])
    items = eval_mixer_items(eval_args("--eval_dataset_mixer_list", "synthetic:spelling", "1.0", data, "1.0"))
    assert [item.split for item in items] == ["test", "train"]
    given = eval_args("--eval_dataset_mixer_list", "synthetic:spelling", "10", "--eval_dataset_mixer_list_splits",
                      "train")
    assert [item.split for item in eval_mixer_items(given)] == ["train"]
    with pytest.raises(DataError, match="--eval_dataset_mixer_list: .*pairs"):
        eval_mixer_items(eval_args("--eval_dataset_mixer_list", "synthetic:spelling"))


def test_eval_summary_reads_the_first_last_and_best_evaluation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    base = {"eval/spelling_majority_baseline": 0.25}
    rows = [{"step": 0, "eval_loss": 3.0, "eval/spelling_accuracy": 0.0, **base, "eval_seconds": 1.0},
            {"step": 1, "train_loss": 2.9, "epoch": 0.1},
            {"step": 5, "eval_loss": 0.8, "eval/spelling_accuracy": 0.75, **base, "eval_seconds": 1.0},
            {"step": 9, "eval_loss": 1.0, "eval/spelling_accuracy": 0.5, **base, "eval_seconds": 1.0}]
    write_jsonl(path, rows)
    assert eval_summary(path) == {"initial_eval_loss": 3.0, "initial_eval_spelling_accuracy": 0.0,
                                  "initial_eval_spelling_majority_baseline": 0.25,
                                  "final_eval_loss": 1.0, "final_eval_spelling_accuracy": 0.5,
                                  "final_eval_spelling_majority_baseline": 0.25,
                                  "best_eval_loss": 0.8, "best_eval_loss_step": 5,
                                  "best_eval_spelling_accuracy": 0.75, "best_eval_spelling_accuracy_step": 5}
    assert eval_summary(tmp_path / "missing.jsonl") == {}


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--eval_every", "5"], "--eval_every has no effect without an eval set"),
    (["--eval_max_examples", "5"], "--eval_max_examples has no effect without an eval set"),
    (["--eval_batch_size", "5"], "--eval_batch_size has no effect without an eval set"),
    (["--eval_fraction", "0.1", "--eval_dataset_mixer_list", "synthetic:spelling", "1.0"], "two eval loss sets"),
    (["--eval_fraction", "1.0"], "--eval_fraction must be between 0 and 1"),
    (["--eval_fraction", "0"], "--eval_fraction must be between 0 and 1"),
    (["--eval_tasks", "spelling", "--eval_every", "0"], "--eval_every must be at least 1"),
    (["--eval_dataset_mixer_list_splits", "test"], "--eval_dataset_mixer_list_splits has no effect without"),
    (["--eval_tasks", "hellaswag"], "--eval_tasks 'hellaswag': use a synthetic task"),
    (["--eval_tasks", "spelling", "spelling"], "names a task twice"),
])
def test_eval_flag_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args([*BASE, *flags])
    assert message in capsys.readouterr().err


def test_eval_flags_parse():
    args = parse_args([*BASE, "--eval_tasks", "spelling", "mc:data/arc.jsonl", "--eval_fraction", "0.05",
                       "--eval_every", "100", "--eval_max_examples", "200", "--eval_batch_size", "8"])
    assert args.eval_tasks == ["spelling", "mc:data/arc.jsonl"] and args.eval_fraction == 0.05
    assert (args.eval_every, args.eval_max_examples, args.eval_batch_size) == (100, 200, 8)
    with pytest.raises(ArgumentError):
        type(args)(**{**vars(args), "eval_every": -1})


# ----------------------------------------------------------------------------------------------------------------
# Tiny-model runs
# ----------------------------------------------------------------------------------------------------------------
EVAL_KEYS = {"eval_loss", "eval_bits_per_byte", "eval/spelling_accuracy", "eval/centered_accuracy"}


def eval_records(output_dir) -> list[dict]:
    return [m for m in read_metrics(output_dir) if "eval_seconds" in m]


@pytest.mark.integration
def test_training_run_evaluates_before_every_n_steps_and_at_the_end_and_resumes(tiny_model_dir, tmp_path):
    """Evaluations at 0, 5 and the last step (6); a rerun with more steps resumes from the step-5 checkpoint, keeps
    the step-0 and step-5 evaluations (no second step-0 one) and adds 10; the summary has initial_ and final_."""
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
            "--dataset_mixer_list", "synthetic:spelling", "160", "--per_device_train_batch_size", "8",
            "--learning_rate", "2e-3", "--seed", "1", "--eval_tasks", "spelling", "--eval_fraction", "0.1",
            "--eval_every", "5", "--eval_max_examples", "8", "--checkpointing_steps", "5"]
    first = finetune([*args, "--max_train_steps", "6"])
    assert "16 examples held out for evaluation, 144 left to train on" in first.stderr
    records = eval_records(out)
    assert [r["step"] for r in records] == [0, 5, 6]
    assert all(EVAL_KEYS <= set(r) for r in records)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert re.search(r"step +0 \| eval_loss [\d.]+ \| eval_bits_per_byte", first.stdout + first.stderr)

    second = finetune([*args, "--max_train_steps", "10"])
    assert "Resumed" in second.stderr
    records = eval_records(out)
    assert [r["step"] for r in records] == [0, 5, 10]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial_eval_loss"] == records[0]["eval_loss"]
    assert summary["final_eval_loss"] == records[-1]["eval_loss"]
    assert summary["final_eval_spelling_accuracy"] == records[-1]["eval/spelling_accuracy"]
    assert summary["final_eval_spelling_majority_baseline"] == records[-1]["eval/spelling_majority_baseline"]
    assert [m["step"] for m in read_metrics(out) if "train_loss" in m] == list(range(1, 11))


@pytest.mark.integration
def test_eval_dataset_mixer_list_and_mc_file_leave_training_unchanged(tiny_model_dir, tmp_path):
    """A separate eval set and an mc file (with the chunked loss): evaluated at 0 and the end, and training is
    bitwise the run without evaluation (no random numbers drawn, train mode restored)."""
    mc = write_jsonl(tmp_path / "arc_toy.jsonl", [{"question": "Spell the word: cat", "choices": ["c a t", "t a c"],
                                                   "answer": 0}] * 3)
    train = ["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list", "synthetic:spelling", "32",
             "--per_device_train_batch_size", "8", "--max_train_steps", "2", "--use_liger_kernel"]
    out, plain = tmp_path / "run", tmp_path / "plain"
    finetune([*train, "--output_dir", str(out), "--eval_dataset_mixer_list", "synthetic:spelling", "20",
              "--eval_tasks", f"mc:{mc}", "reverse", "--eval_max_examples", "4"])
    records = eval_records(out)
    assert [r["step"] for r in records] == [0, 2]
    assert {"eval_loss", "eval_bits_per_byte", "eval/arc_toy_accuracy", "eval/reverse_accuracy"} <= set(records[0])
    assert records[0]["eval/arc_toy_accuracy"] in (0.0, 1.0)  # three copies of one question
    assert records[0]["eval/arc_toy_majority_baseline"] == 1.0  # ... whose correct choice is always A
    finetune([*train, "--output_dir", str(plain)])
    losses = [[m["train_loss"] for m in read_metrics(d) if "train_loss" in m] for d in (out, plain)]
    assert losses[0] == losses[1]
    bad = finetune(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "bad"),
                    "--dataset_mixer_list", "synthetic:spelling", "32", "--eval_tasks", "mc:nowhere.jsonl"],
                   check=False)
    assert bad.returncode == 2 and "--eval_tasks mc:nowhere.jsonl: no such file" in bad.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["zero3", "ddp"])
def test_two_processes_give_the_one_process_eval_metrics(tiny_model_dir, tmp_path, layout):
    """2-process ZeRO-3 (and DDP) evaluates exactly what 1 process does: 17 held-out examples in batches of 4 leave
    rank 1 a forward short, the mc questions have different numbers of options, so ranks run dummy forwards and
    generate calls; a mismatch would hang ZeRO-3 (the timeout) or change the sums. eval_loss within 1e-5 relative
    (summation order and the 2-process training's own 1e-7-level differences), accuracies equal."""
    # options per question 4, 2, 4, 2, 3: rank 0 holds 11 (3 forwards of 4), rank 1 holds 4 (1, then 2 dummies)
    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": f"Spell the word: {w}", "choices": [" ".join(w), " ".join(w[::-1]), w, w.upper()][:n],
         "answer": i % n} for i, (w, n) in enumerate(zip(["cat", "dog", "bird", "fish", "mouse"], [4, 2, 4, 2, 3]))])
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list", "synthetic:spelling", "200",
            "--global_batch_size", "8", "--max_train_steps", "3", "--learning_rate", "1e-3", "--seed", "3",
            "--eval_tasks", "spelling", f"mc:{mc}", "--eval_fraction", "0.1", "--eval_max_examples", "17",
            "--eval_batch_size", "4", "--eval_every", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune([*args, "--output_dir", str(one)])
    env = clean_env(PATH=f"{Path(sys.executable).parent}:{clean_env()['PATH']}")
    if layout == "zero3":
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
                    "--use_deepspeed", "--deepspeed_config_file", str(REPO / ZERO3)]
    else:  # accelerate's launcher starts one process on a CPU-only machine; torchrun starts both (gloo DDP)
        launcher, env["ACCELERATE_USE_CPU"] = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], "true"
    run([*launcher, "-m", "open_instruct.finetune", *with_cache_dir([*args, "--output_dir", str(two)])], env=env,
        timeout=420)
    single, double = eval_records(one), eval_records(two)
    assert [r["step"] for r in single] == [r["step"] for r in double] == [0, 2, 3]
    for a, b in zip(single, double):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["eval_bits_per_byte"] == pytest.approx(a["eval_bits_per_byte"], rel=1e-5)
        for key in ("eval/spelling_accuracy", "eval/mc_accuracy", "eval/centered_accuracy"):
            assert b[key] == a[key], key


def test_generation_task_scoring_literals():
    from open_instruct.generation_tasks import GenerationTask, after_reasoning, call_matches, parse_tool_call

    expected_call = '{"name": "calculator", "arguments": {"expression": "3 * 4"}}'
    assert call_matches('<tool_call>\n{"name": "calculator", "arguments": {"expression": "3 * 4"}}\n</tool_call>',
                        expected_call)
    assert call_matches('{"name": "calculator", "parameters": {"expression": "3 * 4"}}', expected_call)  # Llama JSON
    assert not call_matches('<tool_call>{"name": "calculator", "arguments": {"expression": "3 * 5"}}', expected_call)
    assert not call_matches('<tool_call>{"name": "calc", "arguments": {"expression": "3 * 4"}}', expected_call)
    assert not call_matches('<tool_call>{"name": "calculator", "arguments": {"expr', expected_call)
    assert parse_tool_call("no call {here} {\"name\": \"f\", \"arguments\": {}}") == ("f", {})
    assert after_reasoning("<think>\nb 1, a 1\n</think>\n1", "1") and not after_reasoning("b 1</think>2", "1")
    assert after_reasoning("1", "1")
    task = GenerationTask("t", [[1]], ["12"], 4, end_text="<|im_end|>")
    assert task.correct("12<|im_end|>\n<|im_start|>user", "12") and not task.correct("123<|im_end|>", "12")


def test_end_text_of_templates():
    import copy

    from open_instruct.chat_templates import get_chat_template
    from open_instruct.generation_tasks import end_text

    base = build_tokenizer()
    expected = {"tulu": "", "hermes": "<|im_end|>", "olmo3_think": "<|im_end|>", "llama3_tools": "<|eot_id|>"}
    for name, text in expected.items():
        tokenizer = copy.deepcopy(base)
        tokenizer.chat_template = get_chat_template(name)
        assert end_text(tokenizer) == text, name
