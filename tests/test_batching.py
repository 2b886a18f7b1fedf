"""BatchPlan (layout-independent global batches) and collation (packed and padded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from open_instruct.batching import (
    BatchPlan,
    best_fit_decreasing,
    collate,
    collate_packed,
    collate_padded,
    split_global_batch,
    targets_for,
)

IDS = [np.array([1, 2, 3], dtype=np.int32), np.array([4, 5], dtype=np.int32)]
LABELS = [np.array([-100, 2, 3], dtype=np.int32), np.array([-100, 5], dtype=np.int32)]
PAD = 99


# --- BatchPlan -------------------------------------------------------------------------------------------------


def test_steps_per_epoch_and_dropped():
    plan = BatchPlan(num_examples=103, global_batch_size=8, seed=0)
    assert plan.steps_per_epoch == 12
    assert plan.dropped_per_epoch() == 7
    assert BatchPlan(96, 8, 0).dropped_per_epoch() == 0
    assert BatchPlan(96, 8, 0).steps_per_epoch == 12
    assert plan.epoch_of(0) == 0 and plan.epoch_of(11) == 0 and plan.epoch_of(12) == 1 and plan.epoch_of(25) == 2


def test_global_batch_has_exact_size():
    plan = BatchPlan(103, 8, seed=1)
    for step in range(3 * plan.steps_per_epoch):
        batch = plan.global_batch(step)
        assert len(batch) == 8
        assert len(set(batch.tolist())) == 8
        assert batch.min() >= 0 and batch.max() < 103


LENGTHS = np.random.default_rng(3).integers(5, 400, size=50)


@pytest.mark.parametrize("processes, accum", [(1, 4), (2, 2), (4, 1)])
def test_union_of_micro_batches_is_the_global_batch(processes, accum):
    plan = BatchPlan(num_examples=50, global_batch_size=2 * processes * accum, seed=7)
    for step in range(2 * plan.steps_per_epoch + 1):
        global_batch = plan.global_batch(step)
        split = split_global_batch(global_batch, LENGTHS, processes, accum)
        assert len(split) == processes and all(len(micro) == accum for micro in split)
        pieces = [i for micro in split for share in micro for i in share]
        assert sorted(pieces) == sorted(global_batch.tolist())  # every example exactly once


def test_examples_of_a_step_do_not_depend_on_layout():
    plan = BatchPlan(num_examples=50, global_batch_size=8, seed=7)
    for step in range(plan.steps_per_epoch * 2):
        seen = [sorted(i for micro in split_global_batch(plan.global_batch(step), LENGTHS, p, a) for share in micro
                       for i in share) for p, a in [(1, 8), (2, 4), (4, 2), (8, 1)]]
        assert seen[0] == seen[1] == seen[2] == seen[3] == sorted(plan.global_batch(step).tolist())


def test_split_balances_tokens_over_processes_and_micro_steps():
    lengths = np.array([400, 10, 10, 10, 300, 20, 250, 30, 5, 5, 100, 60])
    split = split_global_batch(np.arange(12), lengths, 2, 2)
    process_tokens = [sum(lengths[i] for share in micro for i in share) for micro in split]
    assert abs(process_tokens[0] - process_tokens[1]) <= lengths.max() // 4  # 600 vs 600 here
    micro_tokens = [sum(lengths[i] for i in share) for micro in split for share in micro]
    naive = [sum(lengths[list(chunk)]) for chunk in np.array_split(np.arange(12), 4)]  # contiguous split
    assert max(micro_tokens) < max(naive)
    assert split == split_global_batch(np.arange(12), lengths, 2, 2)  # deterministic


def test_split_literal():
    lengths = np.array([50, 40, 30, 20])
    # Process 0 gets 50 then 20 (least loaded after 50/40), process 1 gets 40 then 30; then one per micro-step.
    assert split_global_batch(np.arange(4), lengths, 2, 2) == [[[0], [3]], [[1], [2]]]
    assert split_global_batch(np.arange(4), lengths, 1, 2) == [[[0, 3], [1, 2]]]


def test_more_micro_steps_than_examples_leaves_empty_micro_batches():
    split = split_global_batch(np.arange(3), np.array([5, 6, 7]), 2, 2)
    assert sorted(len(share) for micro in split for share in micro) == [0, 1, 1, 1]
    empty = collate([], [], True, pad_token_id=0)
    assert empty["num_tokens"] == empty["num_trained_tokens"] == 0
    assert (empty["target_ids"] == -100).all() and empty["input_ids"].shape == (1, 1)


def test_epochs_are_different_permutations_covering_each_example_at_most_once():
    plan = BatchPlan(num_examples=43, global_batch_size=5, seed=3)
    epochs = []
    for epoch in range(3):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        order = np.concatenate([plan.global_batch(s) for s in steps]).tolist()
        assert len(order) == 40
        assert len(set(order)) == 40  # each example at most once per epoch
        epochs.append(order)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_plan_is_deterministic_and_seeded():
    a, b, c = BatchPlan(30, 4, seed=0), BatchPlan(30, 4, seed=0), BatchPlan(30, 4, seed=1)
    assert [a.global_batch(s).tolist() for s in range(14)] == [b.global_batch(s).tolist() for s in range(14)]
    assert [a.global_batch(s).tolist() for s in range(7)] != [c.global_batch(s).tolist() for s in range(7)]


def test_global_batch_is_the_same_when_steps_are_visited_out_of_order():
    plan = BatchPlan(30, 4, seed=5)
    forward = [plan.global_batch(s).tolist() for s in range(21)]
    backward = [plan.global_batch(s).tolist() for s in reversed(range(21))][::-1]
    assert forward == backward


# --- token budgets ----------------------------------------------------------------------------------------------


def test_token_budget_plan_literal():
    lengths = np.array([5, 3, 4, 2, 6, 1])
    plan = BatchPlan(6, None, seed=0, global_batch_tokens=8, lengths=lengths)
    order = np.random.default_rng([0, 0]).permutation(6)
    batches = [plan.global_batch(s).tolist() for s in range(plan.steps_per_epoch)]
    assert np.concatenate(batches).tolist() == order[: sum(len(b) for b in batches)].tolist()  # consecutive, in order
    for batch in batches:
        assert lengths[batch].sum() <= 8
    # Greedy: a batch stops only because the next example would not fit (or the epoch ends, and then it is dropped).
    for batch, following in zip(batches, batches[1:]):
        assert lengths[batch].sum() + lengths[following[0]] > 8


def test_token_budget_keeps_an_example_longer_than_the_budget_and_drops_a_short_tail():
    plan = BatchPlan(3, None, 0, global_batch_tokens=10, lengths=np.array([30, 4, 4]))
    batches = [plan.global_batch(s).tolist() for s in range(plan.steps_per_epoch)]
    assert [0] in batches  # 30 tokens alone: too long for the budget, still one step
    assert sum(len(b) for b in batches) + plan.dropped_per_epoch() == 3  # the rest is the dropped short tail
    assert plan.dropped_per_epoch() in (0, 1, 2)


def test_token_budget_epochs_may_differ_in_steps_and_steps_map_back():
    lengths = np.random.default_rng(1).integers(10, 500, size=200)
    plan = BatchPlan(200, None, seed=4, global_batch_tokens=2000, lengths=lengths)
    per_epoch = [plan.steps_in_epoch(e) for e in range(4)]
    assert plan.total_steps(4) == sum(per_epoch)
    step = 0
    for epoch, count in enumerate(per_epoch):
        seen = []
        for index in range(count):
            assert plan.locate(step) == (epoch, index)
            assert plan.ends_epoch(step) == (index == count - 1)
            seen += plan.global_batch(step).tolist()
            step += 1
        assert len(seen) == len(set(seen))  # each example at most once per epoch
        assert plan.epochs_done(step - 1) == epoch + 1


def test_token_budget_batches_do_not_depend_on_layout():
    lengths = np.random.default_rng(2).integers(10, 500, size=120)
    trained = lengths // 2
    plan = BatchPlan(120, None, seed=3, global_batch_tokens=3000, lengths=lengths)
    for step in range(plan.steps_per_epoch):
        batch = sorted(plan.global_batch(step).tolist())
        for processes, accum, rows in [(1, 4, None), (2, 2, None), (3, 1, None), (1, 1, 600), (4, 1, 600)]:
            split = split_global_batch(plan.global_batch(step), lengths, processes, accum, trained=trained,
                                       micro_batch_tokens=rows)
            assert sorted(i for micro in split for share in micro for i in share) == batch


def test_best_fit_decreasing_literal():
    # Sizes 6, 5, 4, 3, 2 into 10: 6 opens a bin, 5 opens one, 4 fits best into 6's (4 left), 3 into 5's (2 left),
    # 2 into the fullest bin that still has room (5+3, 2 left).
    weights = np.array([6, 5, 4, 3, 2])
    assert best_fit_decreasing(np.arange(5), weights, 10) == [[0, 2], [1, 3, 4]]
    assert best_fit_decreasing(np.arange(2), np.array([12, 3]), 10) == [[0], [1]]  # too long: a bin of its own


def test_packed_rows_respect_the_budget_and_processes_get_equal_micro_steps():
    lengths = np.random.default_rng(5).integers(10, 900, size=64)
    trained = np.random.default_rng(6).integers(1, 10, size=64) * lengths // 10
    split = split_global_batch(np.arange(64), lengths, 4, 1, trained=trained, micro_batch_tokens=1024)
    assert len({len(micro) for micro in split}) == 1  # the same number of micro-steps on every process
    for micro in split:
        for share in micro:
            assert lengths[share].sum() <= 1024
        nonempty = [share for share in micro if share]
        # best fit leaves at most one row per process under half full
        assert sum(lengths[share].sum() <= 512 for share in nonempty) <= 1


def test_padded_micro_batches_group_similar_lengths():
    lengths = np.array([400, 10, 12, 390, 11, 380, 13, 14])
    split = split_global_batch(np.arange(8), lengths, 1, 2, padded=True)
    assert split == [[[1, 2, 4, 6], [0, 3, 5, 7]]]  # the four short ones together, the long ones together
    padded_positions = sum(len(share) * lengths[share].max() for share in split[0])
    mixed = split_global_batch(np.arange(8), lengths, 1, 2)  # token-balanced: a long example in each
    assert padded_positions < sum(len(share) * lengths[share].max() for share in mixed[0])


def test_processes_get_balanced_trained_tokens():
    lengths = np.full(40, 100)
    trained = np.random.default_rng(7).integers(1, 100, size=40)
    split = split_global_batch(np.arange(40), lengths, 4, 2, trained=trained)
    per_process = [sum(trained[i] for share in micro for i in share) for micro in split]
    assert max(per_process) - min(per_process) <= trained.max()  # largest-first into the least loaded
    by_tokens = split_global_batch(np.arange(40), lengths, 4, 2)  # all lengths equal: tokens cannot balance this
    per_process_tokens = [sum(trained[i] for share in micro for i in share) for micro in by_tokens]
    assert max(per_process) - min(per_process) <= max(per_process_tokens) - min(per_process_tokens)


# --- collation -----------------------------------------------------------------------------------------------------


def test_targets_for_literal():
    assert targets_for(np.array([-100, 2, 3])).tolist() == [2, 3, -100]
    assert targets_for(np.array([7])).tolist() == [-100]


def test_collate_packed_literal():
    batch = collate_packed(IDS, LABELS)
    assert set(batch) == {"input_ids", "position_ids", "target_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The first example's last position predicts nothing: no prediction across examples.
    assert batch["target_ids"].tolist() == [[2, 3, -100, 5, -100]]
    for key in ("input_ids", "position_ids", "target_ids"):
        assert batch[key].dtype == torch.int64


def test_collate_padded_literal():
    batch = collate_padded(IDS, LABELS, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "target_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["target_ids"].tolist() == [[2, 3, -100], [5, -100, -100]]
    for key in ("input_ids", "attention_mask", "target_ids"):
        assert batch[key].dtype == torch.int64


def test_collate_packed_counts():
    batch = collate(IDS, LABELS, padding_free=True, pad_token_id=PAD)
    assert batch["num_tokens"] == 5
    assert batch["num_tokens_with_padding"] == 5
    assert batch["num_trained_tokens"] == 3
    assert batch["target_ids"].tolist() == [[2, 3, -100, 5, -100]]


def test_collate_padded_counts():
    batch = collate(IDS, LABELS, padding_free=False, pad_token_id=PAD)
    assert batch["num_tokens"] == 5
    assert batch["num_tokens_with_padding"] == 6
    assert batch["num_trained_tokens"] == 3
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, PAD]]


def test_packed_and_padded_train_the_same_targets():
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 50, size=n).astype(np.int32) for n in (4, 9, 1, 6)]
    labels = [np.where(rng.random(len(x)) < 0.5, -100, x).astype(np.int32) for x in ids]
    packed = collate(ids, labels, padding_free=True, pad_token_id=PAD)
    padded = collate(ids, labels, padding_free=False, pad_token_id=PAD)
    assert packed["num_trained_tokens"] == padded["num_trained_tokens"]
    mask = padded["attention_mask"].bool()
    assert padded["target_ids"][mask].tolist() == packed["target_ids"][0].tolist()
    assert padded["input_ids"][mask].tolist() == packed["input_ids"][0].tolist()
    assert (padded["target_ids"][~mask] == -100).all()


def test_trainer_cuts_micro_batches_into_rows_of_max_tokens_per_micro_batch():
    """The flag reaches the split: finetune.micro_batches returns packed rows of at most that many tokens, as many as
    the data needs (one micro-batch per optimizer step without it, with the default accumulation of 1)."""
    from types import SimpleNamespace

    from open_instruct.args import FinetuneArgs
    from open_instruct.finetune import micro_batches
    from open_instruct.parallel_dims import ParallelDims

    rng = np.random.default_rng(8)
    ids = [rng.integers(1, 50, size=n).astype(np.int32) for n in rng.integers(20, 200, size=40)]
    mixture = SimpleNamespace(lengths=np.array([len(x) for x in ids]), trained_lengths=np.array([len(x) - 1 for x in ids]),
                              examples=lambda indices: ([ids[i] for i in indices], [ids[i] for i in indices]))
    one_process = ParallelDims(world_size=1)
    plan = BatchPlan(40, 16, seed=0)
    common = dict(model_name_or_path="m", dataset_mixer_list=["x", "1"], max_seq_length=256, global_batch_size=16)
    rows, _ = micro_batches(mixture, plan, 0, FinetuneArgs(**common, max_tokens_per_micro_batch=256), one_process, 0)
    single, _ = micro_batches(mixture, plan, 0, FinetuneArgs(**common), one_process, 0)
    assert len(single) == 1 and single[0]["num_tokens"] > 256
    assert len(rows) > 1 and all(batch["input_ids"].shape == (1, batch["num_tokens"]) for batch in rows)
    assert all(batch["num_tokens"] <= 256 for batch in rows)
    assert sum(batch["num_tokens"] for batch in rows) == single[0]["num_tokens"]


@pytest.mark.parametrize("padding_free,processes,sp,budget", [(True, 1, 1, None), (True, 3, 1, 300), (False, 2, 1, None),
                                                             (True, 4, 2, 300), (True, 2, 2, None), (True, 6, 3, 250)])
def test_step_counts_on_the_host_equal_the_collated_batches_of_every_process(padding_free, processes, sp, budget):
    """StepCounts replaces an all-reduce of each process's collated counts: it must give exactly what that all-reduce
    gave (summed over every process, sequence-parallel pieces included) and, per micro-step, the most trained
    positions any process collated (the chunked loss's chunk count)."""
    from open_instruct.batching import StepCounts
    from open_instruct.sequence_parallel import shard_row

    rng = np.random.default_rng(processes * 10 + sp)
    ids = [rng.integers(1, 50, size=n).astype(np.int64) for n in rng.integers(2, 120, size=30)]
    labels = [np.where(rng.random(len(x)) < 0.4, -100, x) for x in ids]
    lengths = np.array([len(x) for x in ids])
    trained = np.array([(y[1:] != -100).sum() for y in labels])
    dp = processes // sp
    split = split_global_batch(np.arange(7), lengths, dp, 3, trained=trained, micro_batch_tokens=budget,
                               padded=not padding_free)
    totals, per_step = np.zeros(3, dtype=int), []
    for rank in range(processes):
        dp_rank, sp_rank = divmod(rank, sp)
        batches = [collate([ids[i] for i in share], [labels[i] for i in share], padding_free, 0) if share
                   else collate([], [], True, 0) for share in split[dp_rank]]
        if sp > 1:
            batches = [shard_row(b, sp, sp_rank, 0) for b in batches]
        totals += [sum(b[k] for b in batches) for k in ("num_trained_tokens", "num_tokens", "num_tokens_with_padding")]
        per_step.append([b["num_trained_tokens"] for b in batches])
    counts = StepCounts.of(split, lengths, trained, padding_free, rank=0, sequence_parallel=sp)
    assert (counts.trained, counts.tokens, counts.tokens_with_padding) == tuple(totals)
    if sp == 1:
        assert counts.micro_step_trained == tuple(np.max(per_step, axis=0))
        assert counts.local_trained == sum(per_step[0])
    else:
        assert counts.micro_step_trained is None


def test_micro_batches_refuse_a_cache_whose_trained_counts_disagree_with_its_labels():
    from types import SimpleNamespace

    from open_instruct.args import FinetuneArgs
    from open_instruct.data import DataError
    from open_instruct.finetune import micro_batches
    from open_instruct.parallel_dims import ParallelDims

    ids = [np.arange(1, n + 1, dtype=np.int32) for n in (10, 20, 30, 40)]
    mixture = SimpleNamespace(lengths=np.array([10, 20, 30, 40]), trained_lengths=np.array([9, 19, 29, 38]),
                              examples=lambda indices: ([ids[i] for i in indices], [ids[i] for i in indices]))
    args = FinetuneArgs(model_name_or_path="m", dataset_mixer_list=["x", "1"], max_seq_length=64, global_batch_size=4)
    with pytest.raises(DataError, match="delete the cache"):
        micro_batches(mixture, BatchPlan(4, 4, seed=0), 0, args, ParallelDims(world_size=1), 0)
