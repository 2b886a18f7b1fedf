"""BatchPlan (layout-independent global batches) and collation (packed and padded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from open_instruct.batching import (
    BatchPlan,
    collate,
    collate_packed,
    collate_padded,
    micro_batches_for_rank,
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


@pytest.mark.parametrize("processes, accum", [(1, 4), (2, 2), (4, 1)])
def test_union_of_micro_batches_is_the_global_batch(processes, accum):
    per_device = 2
    plan = BatchPlan(num_examples=50, global_batch_size=per_device * processes * accum, seed=7)
    for step in range(2 * plan.steps_per_epoch + 1):
        global_batch = plan.global_batch(step)
        pieces = []
        for rank in range(processes):
            micro = micro_batches_for_rank(global_batch, rank, processes, accum)
            assert len(micro) == accum
            assert all(len(m) == per_device for m in micro)
            pieces.extend(micro)
        # In order: rank-major, then micro-step.
        assert np.concatenate(pieces).tolist() == global_batch.tolist()


def test_examples_of_a_step_do_not_depend_on_layout():
    layouts = [(1, 4), (2, 2), (4, 1)]
    plan = BatchPlan(num_examples=50, global_batch_size=8, seed=7)
    for step in range(plan.steps_per_epoch * 2):
        seen = []
        for processes, accum in layouts:
            examples = [
                sorted(np.concatenate(micro_batches_for_rank(plan.global_batch(step), r, processes, accum)).tolist())
                for r in range(processes)
            ]
            seen.append(sorted(sum(examples, [])))
        assert seen[0] == seen[1] == seen[2] == sorted(plan.global_batch(step).tolist())


def test_micro_batches_split_literal():
    batch = np.arange(8)
    assert [m.tolist() for m in micro_batches_for_rank(batch, 1, 2, 2)] == [[4, 5], [6, 7]]
    assert [m.tolist() for m in micro_batches_for_rank(batch, 0, 4, 1)] == [[0, 1]]
    assert [m.tolist() for m in micro_batches_for_rank(batch, 0, 1, 4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


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
