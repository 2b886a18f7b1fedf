"""The training loss, normalized over the trained tokens of the whole global batch.

objective = sum of token cross-entropies over every micro-batch of every process / trained tokens in the global batch

This weighs every trained token equally, whatever the example lengths, the number of processes or the accumulation
steps (the per-micro-batch mean that HF and open-instruct use weighs short examples more). This module is the only
place that computes it; the trainer calls `token_loss_sum` and `scale_for_backward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from open_instruct.tokenization import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the trained positions (targets != IGNORE_INDEX), in fp32.

    A micro-batch with no trained token gives exactly 0 (with a gradient of 0), never NaN.
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), target_ids.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def scale_for_backward(loss_sum: torch.Tensor, global_trained_tokens: int, num_processes: int, grad_accum: int) -> torch.Tensor:
    """The tensor to pass to `accelerator.backward` so the applied gradient is d(objective)/d(params).

    accelerate (and DeepSpeed) divide each backward by `grad_accum`, and DDP / ZeRO average gradients over the
    `num_processes` data-parallel ranks; multiplying by both undoes that, and dividing by the global count of trained
    tokens normalizes. A global batch with no trained token at all contributes a zero gradient.
    """
    return loss_sum * (num_processes * grad_accum) / max(global_trained_tokens, 1)
