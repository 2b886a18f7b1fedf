"""Global batches first, then micro-batches: the examples in an optimizer step depend only on the seed, the data
and the global batch definition (a number of examples, or a token budget), never on how the batch is split over
processes and accumulation steps.

`split_global_batch` then gives every process an equal share of trained tokens, and cuts each process's share into
micro-batches: `grad_accum` token-balanced micro-batches, or (padding-free with a token budget) packed rows of at most
`micro_batch_tokens` tokens filled by best-fit-decreasing. Every process runs the same number of micro-steps
(ZeRO-3 gathers weights collectively in each forward); a process with fewer rows runs empty ones.

Collation turns a micro-batch into model inputs plus `target_ids`: the labels shifted left by one *within each
example*, so a packed row never asks one example to predict the next example's first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from open_instruct.tokenization import IGNORE_INDEX


class BatchPlan:
    """Which examples form optimizer step `step`: a seeded shuffle per epoch, cut into global batches of
    `global_batch_size` examples, or of as many examples as fit in `global_batch_tokens` tokens.

    The last partial global batch of each epoch is dropped (a token-budget batch is partial when the epoch ends
    before the budget is reached), so every step is a full global batch. With a token budget the number of steps
    differs a little from epoch to epoch; `steps_in_epoch` says how many.
    """

    def __init__(self, num_examples: int, global_batch_size: int | None, seed: int, *,
                 global_batch_tokens: int | None = None, lengths: np.ndarray | None = None):
        if (global_batch_size is None) == (global_batch_tokens is None):
            raise ValueError("give exactly one of global_batch_size and global_batch_tokens")
        if global_batch_tokens is not None and (lengths is None or len(lengths) != num_examples):
            raise ValueError("a token budget per step needs the length of every example")
        self.num_examples, self.seed = num_examples, seed
        self.global_batch_size, self.global_batch_tokens = global_batch_size, global_batch_tokens
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self._bounds: dict[int, np.ndarray] = {}

    def epoch_bounds(self, epoch: int) -> np.ndarray:
        """Positions in the epoch's shuffled order where global batches start, plus where the last one ends."""
        if epoch not in self._bounds:
            if self.global_batch_size is not None:
                steps = self.num_examples // self.global_batch_size
                self._bounds[epoch] = np.arange(steps + 1) * self.global_batch_size
            else:
                order = _permutation(self.num_examples, self.seed, epoch)
                self._bounds[epoch] = _token_budget_bounds(self.lengths[order], self.global_batch_tokens)
        return self._bounds[epoch]

    def steps_in_epoch(self, epoch: int = 0) -> int:
        return len(self.epoch_bounds(epoch)) - 1

    @property
    def steps_per_epoch(self) -> int:
        """Steps in the first epoch (every epoch, for a batch counted in examples)."""
        return self.steps_in_epoch(0)

    def dropped_per_epoch(self, epoch: int = 0) -> int:
        return self.num_examples - int(self.epoch_bounds(epoch)[-1])

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within that epoch) of a global step."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def epoch_of(self, step: int) -> int:
        return self.locate(step)[0]

    def epochs_done(self, step: int) -> float:
        """Epochs completed once `step` has run (fractional), for logging."""
        epoch, index = self.locate(step)
        return epoch + (index + 1) / self.steps_in_epoch(epoch)

    def ends_epoch(self, step: int) -> bool:
        epoch, index = self.locate(step)
        return index + 1 == self.steps_in_epoch(epoch)

    def global_batch(self, step: int) -> np.ndarray:
        epoch, index = self.locate(step)
        bounds = self.epoch_bounds(epoch)
        return _permutation(self.num_examples, self.seed, epoch)[bounds[index] : bounds[index + 1]]


@lru_cache(maxsize=2)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _token_budget_bounds(ordered_lengths: np.ndarray, budget: int) -> np.ndarray:
    """Greedy cut of examples in order: each batch takes examples while their tokens fit in `budget` (at least one
    example, even a longer one); a batch the epoch's end leaves short of the budget is not kept."""
    cumulative = np.concatenate([[0], np.cumsum(ordered_lengths)])
    bounds, start = [0], 0
    while start < len(ordered_lengths):
        end = max(int(np.searchsorted(cumulative, cumulative[start] + budget, side="right")) - 1, start + 1)
        if end == len(ordered_lengths) and cumulative[end] - cumulative[start] < budget:
            break  # the epoch ran out before this batch was full
        bounds.append(end)
        start = end
    return np.asarray(bounds, dtype=np.int64)


def _least_loaded_first(items: np.ndarray, weights: np.ndarray, bins: int) -> list[list[int]]:
    """Largest item first into the least-loaded bin (ties: lowest bin): balanced bins, deterministic."""
    loads = np.zeros(bins, dtype=np.int64)
    assignment: list[list[int]] = [[] for _ in range(bins)]
    for position in np.lexsort((items, -weights)):  # weight descending, then example index for determinism
        target = int(np.argmin(loads))
        assignment[target].append(int(items[position]))
        loads[target] += int(weights[position])
    return [sorted(bin_items) for bin_items in assignment]


def best_fit_decreasing(items: np.ndarray, weights: np.ndarray, capacity: int) -> list[list[int]]:
    """Pack items into as few bins of `capacity` as best-fit-decreasing finds: largest item first, into the fullest
    bin it still fits in, else a new bin (an item larger than the capacity gets a bin of its own). Deterministic."""
    remaining: list[int] = []
    bins: list[list[int]] = []
    for position in np.lexsort((items, -weights)):
        weight = int(weights[position])
        fitting = [b for b, space in enumerate(remaining) if space >= weight]
        if fitting:
            target = min(fitting, key=lambda b: remaining[b])
        else:
            target = len(bins)
            bins.append([])
            remaining.append(capacity)
        bins[target].append(int(items[position]))
        remaining[target] -= weight
    return [sorted(b) for b in bins]


def _similar_lengths(items: np.ndarray, weights: np.ndarray, groups: int) -> list[list[int]]:
    """`groups` groups of near-equal size, consecutive in length order (ties: example index)."""
    ordered = items[np.lexsort((items, weights))]
    return [sorted(int(i) for i in group) for group in np.array_split(ordered, groups)]


def split_global_batch(global_batch: np.ndarray, lengths: np.ndarray, num_processes: int, grad_accum: int, *,
                       trained: np.ndarray | None = None, micro_batch_tokens: int | None = None,
                       padded: bool = False) -> list[list[list[int]]]:
    """[process][micro-step] -> example indices for one global batch.

    Processes get equal shares of trained tokens (`trained`; tokens when not given): largest example first into the
    least-loaded process. Each process's share is then cut into micro-batches: `grad_accum` of them balanced by
    tokens the same way, or, with `micro_batch_tokens`, as few packed rows of at most that many tokens as
    best-fit-decreasing finds, or, `padded`, `grad_accum` groups of similar lengths (a padded micro-batch costs its
    longest example times its size, so mixing long and short examples would mostly compute padding). Every process
    gets the same number of micro-steps (empty ones where a process has fewer rows): ZeRO-3 needs the same number of
    forward passes everywhere. A pure function of the global batch and
    the example lengths: every process computes the whole plan locally, without communication.
    """
    balance_by = lengths if trained is None else trained
    shares = [np.asarray(s, dtype=np.int64)
              for s in _least_loaded_first(global_batch, balance_by[global_batch], num_processes)]
    if padded:
        plan = [_similar_lengths(s, lengths[s], grad_accum) for s in shares]
    elif micro_batch_tokens is None:
        plan = [_least_loaded_first(s, lengths[s], grad_accum) for s in shares]
    else:
        plan = [best_fit_decreasing(s, lengths[s], micro_batch_tokens) for s in shares]
    micro_steps = max(len(micro) for micro in plan)
    return [micro + [[] for _ in range(micro_steps - len(micro))] for micro in plan]


@dataclass(frozen=True)
class StepCounts:
    """Token counts of one optimizer step over every process, as collate (and shard_row) count them, but computed on
    the host from the split, so the step needs no all-reduce of counts and no device-to-host copy before its loss
    can be normalized (a host sync that would stall the GPU queue at every step)."""

    trained: int  # positions with a loss, the normalizer of --loss_reduction mean
    tokens: int  # real tokens
    tokens_with_padding: int  # positions computed, padding included
    # per micro-step, the most trained positions any process has: the chunked loss's chunk count (None under
    # sequence parallelism, where each piece's count is only known where it is cut)
    micro_step_trained: tuple[int, ...] | None
    local_trained: int  # this process's share of `trained`: checked against its collated batches

    @classmethod
    def of(cls, split: list[list[list[int]]], lengths: np.ndarray, trained_lengths: np.ndarray, padding_free: bool,
           rank: int, sequence_parallel: int = 1) -> StepCounts:
        """`split`: split_global_batch's [process][micro-step] -> examples, for every data-parallel process;
        `rank`: this process's data-parallel rank."""
        def padded_size(share) -> int:
            if not padding_free:
                return len(share) * int(lengths[share].max()) if len(share) else 0
            if sequence_parallel == 1:
                return int(lengths[share].sum())
            row = max(1, int(lengths[share].sum()))  # an empty share is a one-token row, cut like the others
            return -(-row // sequence_parallel) * sequence_parallel

        trained = [[int(trained_lengths[share].sum()) for share in micro] for micro in split]
        per_step = tuple(max(column) for column in zip(*trained)) if sequence_parallel == 1 else None
        return cls(trained=sum(map(sum, trained)),
                   tokens=sum(int(lengths[share].sum()) for micro in split for share in micro),
                   tokens_with_padding=sum(padded_size(share) for micro in split for share in micro),
                   micro_step_trained=per_step, local_trained=sum(trained[rank]))


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


def pinned_for_cuda(batch: dict) -> dict:
    """On CUDA, the batch's tensors in page-locked memory: their copies to the GPU can then be asynchronous (from
    pageable memory, CUDA waits for all queued GPU work before every copy: a host sync per micro-step)."""
    if not torch.cuda.is_available():
        return batch
    return {key: value.pin_memory() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
