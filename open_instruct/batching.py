"""Global batches first, then micro-batches: the examples in an optimizer step depend only on the seed, the data
and the global batch size, never on how the batch is split over processes and accumulation steps. The split
balances tokens over processes and micro-steps (`split_global_batch`).

Collation turns a micro-batch into model inputs plus `target_ids`: the labels shifted left by one *within each
example*, so a packed row never asks one example to predict the next example's first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from open_instruct.tokenization import IGNORE_INDEX


@dataclass(frozen=True)
class BatchPlan:
    """Which examples form optimizer step `step`: epoch-wise seeded shuffles cut into global batches.

    The last partial global batch of each epoch is dropped, so every step has exactly `global_batch_size`
    examples and every process runs the same number of forward passes (ZeRO-3 needs that).
    """

    num_examples: int
    global_batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def dropped_per_epoch(self) -> int:
        return self.num_examples - self.steps_per_epoch * self.global_batch_size

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> np.ndarray:
        order = _permutation(self.num_examples, self.seed, self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch_size
        return order[start : start + self.global_batch_size]


@lru_cache(maxsize=2)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _least_loaded_first(items: np.ndarray, weights: np.ndarray, bins: int) -> list[list[int]]:
    """Largest item first into the least-loaded bin (ties: lowest bin): balanced bins, deterministic."""
    loads = np.zeros(bins, dtype=np.int64)
    assignment: list[list[int]] = [[] for _ in range(bins)]
    for position in np.lexsort((items, -weights)):  # weight descending, then example index for determinism
        target = int(np.argmin(loads))
        assignment[target].append(int(items[position]))
        loads[target] += int(weights[position])
    return [sorted(bin_items) for bin_items in assignment]


def split_global_batch(global_batch: np.ndarray, lengths: np.ndarray, num_processes: int,
                       grad_accum: int) -> list[list[list[int]]]:
    """[process][micro-step] -> example indices for one global batch.

    Processes get equal shares of tokens (compute), largest example first into the least-loaded process; each
    process's share is then split the same way into `grad_accum` micro-batches, so every process runs the same number
    of forward passes (ZeRO-3 needs that) and no micro-batch is much longer than the others. A pure function of the
    global batch and the example lengths: every process computes the whole plan locally, without communication.
    """
    weights = lengths[global_batch]
    shares = _least_loaded_first(global_batch, weights, num_processes)
    plan = []
    for share in shares:
        share = np.asarray(share, dtype=np.int64)
        plan.append(_least_loaded_first(share, lengths[share], grad_accum) if len(share) else [[] for _ in range(grad_accum)])
    return plan


def targets_for(labels: np.ndarray) -> np.ndarray:
    """Next-token targets of one example: position t is trained to predict labels[t + 1]."""
    return np.concatenate([labels[1:], [IGNORE_INDEX]]).astype(np.int64)


def collate_packed(input_ids: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """One row holding every example back to back; position_ids restart at 0 for each example."""
    return {
        "input_ids": torch.from_numpy(np.concatenate(input_ids).astype(np.int64))[None],
        "position_ids": torch.from_numpy(np.concatenate([np.arange(len(x)) for x in input_ids]))[None],
        "target_ids": torch.from_numpy(np.concatenate([targets_for(y) for y in labels]))[None],
    }


def collate_padded(input_ids: list[np.ndarray], labels: list[np.ndarray], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded to the longest example of the micro-batch, with an attention mask."""
    width = max(len(x) for x in input_ids)
    batch = {
        "input_ids": torch.full((len(input_ids), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(input_ids), width), dtype=torch.long),
        "target_ids": torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long),
    }
    for row, (ids, labs) in enumerate(zip(input_ids, labels)):
        batch["input_ids"][row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
        batch["attention_mask"][row, : len(ids)] = 1
        batch["target_ids"][row, : len(ids)] = torch.from_numpy(targets_for(labs))
    return batch


def collate(input_ids: list[np.ndarray], labels: list[np.ndarray], padding_free: bool, pad_token_id: int) -> dict:
    if not input_ids:
        # A process with fewer examples than micro-steps still runs the forward pass (ZeRO-3 gathers weights in it):
        # one pad token that trains nothing.
        input_ids, labels = [np.array([pad_token_id])], [np.array([IGNORE_INDEX])]
        batch = collate_packed(input_ids, labels)
        batch.update(num_tokens=0, num_tokens_with_padding=0, num_trained_tokens=0)
        return batch
    batch = collate_packed(input_ids, labels) if padding_free else collate_padded(input_ids, labels, pad_token_id)
    batch["num_tokens"] = sum(len(x) for x in input_ids)
    batch["num_tokens_with_padding"] = batch["input_ids"].numel()
    batch["num_trained_tokens"] = int((batch["target_ids"] != IGNORE_INDEX).sum())
    return batch
