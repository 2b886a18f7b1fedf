"""The training loss, normalized over the trained tokens of the whole global batch.

objective = sum of token cross-entropies over every micro-batch of every process / trained tokens in the global batch

This weighs every trained token equally, whatever the example lengths, the number of processes or the accumulation
steps (the per-micro-batch mean that HF and open-instruct use weighs short examples more). This module is the only
place that computes it; the trainer calls `token_loss_sum` (or, chunked, `chunks_per_micro_step`) and
`scale_for_backward`.

Which loss sum the trainer uses when: `token_loss_sum`, on the model's logits, by default.
`chunked_linear_cross_entropy_sum`, on the last hidden states and the output layer, with `--use_liger_kernel` when
Liger cannot run (no CUDA): the same sum and gradients without ever holding the full [tokens x vocab] logits.
Either sum goes through `scale_for_backward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from open_instruct.tokenization import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the trained positions (targets != IGNORE_INDEX), in fp32.

    A micro-batch with no trained token gives exactly 0 (with a gradient of 0), never NaN.

    Only the trained rows of the logits go through the softmax (forward and backward): the same sum and gradients as
    cross_entropy(ignore_index=IGNORE_INDEX) over every position, without the [tokens x vocab] log-softmax of the
    untrained ones (measured 0.37 -> 0.15 s per step at 1,600 tokens, vocabulary 32,768, 13% trained; one CPU thread).
    """
    rows, targets = _trained_rows(logits, target_ids)
    return F.cross_entropy(rows.float(), targets, reduction="sum")


def scale_for_backward(loss_sum: torch.Tensor, normalizer: int, num_processes: int, grad_accum: int) -> torch.Tensor:
    """The tensor to pass to `accelerator.backward` so the applied gradient is d(objective)/d(params).

    accelerate (and DeepSpeed) divide each backward by `grad_accum`, and DDP / ZeRO average gradients over the
    `num_processes` data-parallel ranks; multiplying by both undoes that. `normalizer` is the global batch's count of
    trained tokens (--loss_reduction mean), or 1 for the raw token sum (--loss_reduction sum). A global batch with no
    trained token at all contributes a zero gradient.
    """
    return loss_sum * (num_processes * grad_accum) / max(normalizer, 1)


def chunks_per_micro_step(accelerator, batches: list[dict], most_trained: tuple[int, ...] | None,
                          chunk_size: int) -> list[int | None]:
    """`num_chunks` of `chunked_linear_cross_entropy_sum` for each micro-step, equal on every process: under ZeRO-3
    each output-layer call is a collective, so all processes must make the same number, sized by the process with
    the most trained positions. `most_trained`: those counts per micro-step, known on the host from the split
    (batching.StepCounts); None where only each process knows its own (sequence-parallel pieces), then gathered.
    One process needs none (`chunk_size` decides)."""
    if accelerator.num_processes == 1:
        return [None] * len(batches)
    if most_trained is None:
        local = torch.tensor([[b["num_trained_tokens"] for b in batches]], device=accelerator.device)
        most_trained = accelerator.gather(local).max(dim=0).values.tolist()
    return [max(1, -(-count // chunk_size)) for count in most_trained]


def chunked_linear_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    target_ids: torch.Tensor,
    chunk_size: int = 4096,
    *,
    num_chunks: int | None = None,
) -> torch.Tensor:
    """Sum of next-token cross-entropies over trained positions, computed from hidden states [..., H] and the output
    layer (an `nn.Linear`) without ever materializing the full [tokens x vocab] logits: equal (value and gradients,
    within fp32 rounding) to `token_loss_sum(lm_head(hidden), target_ids)`.

    Only the trained positions (target != IGNORE_INDEX) go through the output layer at all, `chunk_size` rows at a
    time. Each chunk's logits are upcast to fp32, turned in place into their gradient (softmax - one-hot), used and
    freed, all in the forward: the gradients w.r.t. the trained rows and the output layer are computed there (the
    weight's summed over the chunks in place, into one buffer), and the backward only multiplies them by the
    upstream gradient and hands them to autograd. No chunk is recomputed (three matmuls per chunk, as for the naive
    loss). Peak memory is one chunk's logits (fp32) plus the gradients, which live from the forward to the backward:
    [trained rows x H] for the hidden states and ONE weight-sized buffer, which autograd adopts as
    `lm_head.weight.grad` without a copy (or adds in place onto an existing `.grad`, as for the naive loss). The
    backward can run only once (no `retain_graph` reuse, no double backward).

    `lm_head` is called as a module (on each chunk), so DeepSpeed ZeRO-3 gathers its weight in its forward hooks.
    The math that needs the weight runs in a forward hook that this function prepends, so it runs while the weight
    is gathered (before ZeRO-3's own hook releases it). The last call's output carries the output layer's gradient:
    in the backward, ZeRO-3 gathers the weight for it once, autograd accumulates the gradient and ZeRO-3's gradient
    hook reduces it, as for any module. The output layer is always called at least once (on an empty chunk when
    nothing is trained), so the weight still gets a zero gradient and every process makes the call. Each call
    gathers the weight collectively under ZeRO-3, so with several processes every rank must make the same number of
    calls: pass the same `num_chunks` on every rank (e.g. ceil(max over ranks of trained positions / chunk_size));
    the trained rows are then split into exactly `num_chunks` near-equal chunks, empty ones included, and
    `chunk_size` is ignored. The forward makes exactly that many calls and the backward none (when the output layer
    is trained, ZeRO-3 gathers its weight once there, on every rank, for the last call's output).

    Returns a 0-dim fp32 tensor; with no trained position it is exactly 0.0 with zero gradients, never NaN.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_chunks is not None and num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not isinstance(lm_head, torch.nn.Linear):
        raise TypeError(f"lm_head must be a torch.nn.Linear (its gradients are computed by hand), got {type(lm_head)}")
    rows, targets = _trained_rows(hidden, target_ids)
    sizes = _chunk_sizes(rows.shape[0], chunk_size, num_chunks)
    grads = _ChunkGradients(rows, lm_head)
    handle = lm_head.register_forward_hook(grads.after_forward, prepend=True)  # runs before ZeRO-3's release hook
    try:
        total, start = None, 0
        for index, size in enumerate(sizes):
            grads.next_chunk(start, targets[start : start + size], last=index == len(sizes) - 1)
            # Only the last call records a graph (its output carries the output layer's gradient).
            with torch.set_grad_enabled(grads.last and bool(grads.params)):
                chunk_sum = lm_head(grads.rows[start : start + size])  # the hook returns the chunk's loss sum
            total = chunk_sum if total is None else total + chunk_sum
            start += size
    finally:
        handle.remove()
    if grads.rows_grad is not None:
        total = total + _PrecomputedGradient.apply([grads.rows_grad], rows)
    return total


def _trained_rows(hidden: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden rows [n, H] and targets [n] of the trained positions only."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = target_ids.reshape(-1).to(flat_hidden.device)
    if flat_targets.shape[0] != flat_hidden.shape[0]:
        raise ValueError(f"{flat_hidden.shape[0]} hidden positions but {flat_targets.shape[0]} targets")
    trained = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    if trained.shape[0] == flat_hidden.shape[0]:
        return flat_hidden, flat_targets  # all trained: no copy of the rows, no scatter of their gradient
    return flat_hidden.index_select(0, trained), flat_targets.index_select(0, trained)


def _chunk_sizes(n: int, chunk_size: int, num_chunks: int | None) -> list[int]:
    if num_chunks is None:
        return [min(chunk_size, n - start) for start in range(0, n, chunk_size)] or [0]
    return [n // num_chunks + (1 if i < n % num_chunks else 0) for i in range(num_chunks)]


class _ChunkGradients:
    """One chunked loss's gradients, computed chunk by chunk in the forward and not yet multiplied by the upstream
    gradient: w.r.t. the trained rows (filled chunk by chunk) and the output layer's trained parameters (summed)."""

    def __init__(self, rows: torch.Tensor, lm_head: torch.nn.Linear):
        grad_enabled = torch.is_grad_enabled()
        self.rows = rows.detach()  # the module sees detached rows: their gradient comes from rows_grad
        self.rows_grad = torch.empty_like(self.rows) if grad_enabled and rows.requires_grad else None
        # name -> gradient buffer, allocated in the first call (under ZeRO-3 the shapes are only known there)
        self.params = {name: None for name, p in lm_head.named_parameters() if grad_enabled and p.requires_grad}
        self.start, self.targets, self.last = 0, None, False

    def next_chunk(self, start: int, targets: torch.Tensor, last: bool) -> None:
        self.start, self.targets, self.last = start, targets, last

    def after_forward(self, lm_head: torch.nn.Linear, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        """Forward hook of the output layer. Its weight is gathered here even under ZeRO-3, so the gradients that
        need it are computed here. Returns the chunk's loss sum in place of the logits (freed on return)."""
        with torch.no_grad():
            chunk_sum, grad_logits = _cross_entropy_sum_and_grad(logits.detach(), self.targets)
            self._accumulate(lm_head, args[0], grad_logits, logits.dtype)
        del logits, grad_logits
        if not (self.last and self.params):
            return chunk_sum
        # The last call's output carries the parameters' gradients. The buffers leave this object, so that once
        # the backward hands them over, autograd holds the only reference and adopts them as .grad without a copy.
        named = dict(lm_head.named_parameters())
        buffers, self.params = self.params, {}
        return chunk_sum + _PrecomputedGradient.apply(list(buffers.values()), *(named[n] for n in buffers))

    def _accumulate(self, lm_head: torch.nn.Linear, rows: torch.Tensor, grad_logits: torch.Tensor, dtype) -> None:
        """Adds one chunk's gradients, given its rows and d(loss)/d(logits) (fp32, [rows x vocab]); `dtype` is the
        logits' (the weight's, or autocast's), the dtype the naive loss's backward multiplies in."""
        if self.rows_grad is not None:  # grad_logits @ W
            self.rows_grad[self.start : self.start + rows.shape[0]] = grad_logits.to(dtype) @ lm_head.weight
        weight, bias = lm_head.weight, lm_head.bias
        if "weight" in self.params:  # grad_logits^T @ rows, added in place: one buffer over all chunks, in the
            # weight's dtype (as its .grad will be), so an fp32 weight under autocast sums in fp32
            buffer = self._buffer("weight", weight)
            buffer.addmm_(grad_logits.to(weight.dtype).t(), rows.to(weight.dtype))
        if "bias" in self.params:
            self._buffer("bias", bias).add_(grad_logits.sum(0))

    def _buffer(self, name: str, param: torch.Tensor) -> torch.Tensor:
        if self.params[name] is None:
            self.params[name] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        return self.params[name]


def _cross_entropy_sum_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropies, their gradient w.r.t. the logits = softmax - one-hot), both fp32. Works in
    place: with fp32 logits, the gradient overwrites them (never a second [rows x vocab] tensor)."""
    z = logits.float()
    z.sub_(z.amax(dim=1, keepdim=True))  # shifted by the row maximum, so exp cannot overflow
    target_z = z.gather(1, targets[:, None])
    z.exp_()
    sum_exp = z.sum(dim=1, keepdim=True)
    loss_sum = (sum_exp.log() - target_z).sum()  # log-sum-exp minus the target's logit (the shift cancels)
    z.div_(sum_exp)
    z.scatter_add_(1, targets[:, None], torch.full_like(target_z, -1.0))
    return loss_sum, z


class _PrecomputedGradient(torch.autograd.Function):
    """A 0-dim zero whose gradient w.r.t. `inputs` is the upstream gradient times `grads` (computed in the forward).

    Adding it to a loss hands precomputed gradients to autograd, which then reaches the inputs' hooks (DDP, ZeRO-3)
    and accumulates into `.grad` as usual. The buffers are scaled in place and released, so a leaf's AccumulateGrad
    can take them as its `.grad` without copying; hence the backward can run only once."""

    @staticmethod
    def forward(ctx, grads: list, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return torch.zeros((), dtype=torch.float32, device=inputs[0].device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's backward can run only once (its gradients were handed over)")
        grads, ctx.grads = ctx.grads, None
        return (None, *(g.mul_(grad_output) for g in grads))
