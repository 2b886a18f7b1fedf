"""The training loss, normalized over the trained tokens of the whole global batch.

objective = sum of token cross-entropies over every micro-batch of every process / trained tokens in the global batch

This weighs every trained token equally, whatever the example lengths, the number of processes or the accumulation
steps (the per-micro-batch mean that HF and open-instruct use weighs short examples more). This module is the only
place that computes it; the trainer calls `token_loss_sum` and `scale_for_backward`.

Which loss sum the trainer uses when: `token_loss_sum`, on the model's logits, by default.
`chunked_linear_cross_entropy_sum`, on the last hidden states and the output layer, with `--use_liger_kernel` when
Liger cannot run (no CUDA): the same sum and gradients without ever holding the full [tokens x vocab] logits.
Either sum goes through `scale_for_backward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from open_instruct.tokenization import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the trained positions (targets != IGNORE_INDEX), in fp32.

    A micro-batch with no trained token gives exactly 0 (with a gradient of 0), never NaN.
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), target_ids.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def scale_for_backward(loss_sum: torch.Tensor, normalizer: int, num_processes: int, grad_accum: int) -> torch.Tensor:
    """The tensor to pass to `accelerator.backward` so the applied gradient is d(objective)/d(params).

    accelerate (and DeepSpeed) divide each backward by `grad_accum`, and DDP / ZeRO average gradients over the
    `num_processes` data-parallel ranks; multiplying by both undoes that. `normalizer` is the global batch's count of
    trained tokens (--loss_reduction mean), or 1 for the raw token sum (--loss_reduction sum). A global batch with no
    trained token at all contributes a zero gradient.
    """
    return loss_sum * (num_processes * grad_accum) / max(normalizer, 1)


def chunked_linear_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    target_ids: torch.Tensor,
    chunk_size: int = 4096,
    *,
    num_chunks: int | None = None,
) -> torch.Tensor:
    """Sum of next-token cross-entropies over trained positions, computed from hidden states [..., H] and the output
    layer without ever materializing the full [tokens x vocab] logits: equal (value and gradients, within fp32
    rounding) to `token_loss_sum(lm_head(hidden), target_ids)`.

    Only the trained positions (target != IGNORE_INDEX) go through the output layer at all, `chunk_size` rows at a
    time. Each chunk's logits are upcast to fp32, reduced to a cross-entropy sum and freed; the chunk is checkpointed,
    so its logits are recomputed one chunk at a time in the backward. Peak memory is a few chunk-sized fp32 tensors
    (the recomputed log-softmax and its gradients) instead of all tokens', plus, when the output layer is trained,
    up to two extra copies of its weight gradient while autograd sums the chunks' contributions (out of place).
    The price is one more forward matmul per chunk (the recomputation).

    `lm_head` is called as a module (never its `.weight` read directly), so DeepSpeed ZeRO-3 gathers the weight in its
    forward hooks, on the forward and on each recomputation. It is always called at least once (on an empty chunk
    when nothing is trained), so the weight still gets a zero gradient and every process makes the call. Each call
    gathers the weight collectively under ZeRO-3, so with several processes every rank must make the same number of
    calls: pass the same `num_chunks` on every rank (e.g. ceil(max over ranks of trained positions / chunk_size));
    the trained rows are then split into exactly `num_chunks` near-equal chunks, empty ones included, and
    `chunk_size` is ignored.

    Returns a 0-dim fp32 tensor; with no trained position it is exactly 0.0 with zero gradients, never NaN.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_chunks is not None and num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = target_ids.reshape(-1).to(flat_hidden.device)
    if flat_targets.shape[0] != flat_hidden.shape[0]:
        raise ValueError(f"{flat_hidden.shape[0]} hidden positions but {flat_targets.shape[0]} targets")
    trained = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    if trained.shape[0] == flat_hidden.shape[0]:
        rows, targets = flat_hidden, flat_targets  # all trained: no copy of the rows, no scatter of their gradient
    else:
        rows = flat_hidden.index_select(0, trained)  # untrained positions never reach the output layer
        targets = flat_targets.index_select(0, trained)
    n = rows.shape[0]
    if num_chunks is None:
        sizes = [min(chunk_size, n - start) for start in range(0, n, chunk_size)] or [0]
    else:
        sizes = [n // num_chunks + (1 if i < n % num_chunks else 0) for i in range(num_chunks)]
    # torch.split's backward concatenates the chunks' gradients once, instead of a full-size zero tensor per chunk.
    total = None
    for row_chunk, target_chunk in zip(torch.split(rows, sizes), torch.split(targets, sizes)):
        chunk_sum = checkpoint(_chunk_cross_entropy_sum, lm_head, row_chunk, target_chunk, use_reentrant=False)
        total = chunk_sum if total is None else total + chunk_sum
    return total


def _chunk_cross_entropy_sum(lm_head: torch.nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # An empty chunk gives exactly 0.0 (a sum over nothing) and zero gradients.
    return F.cross_entropy(lm_head(rows).float(), targets, reduction="sum")
