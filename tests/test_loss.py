"""token_loss_sum and scale_for_backward: the objective is the token mean over the whole global batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from open_instruct.loss import scale_for_backward, token_loss_sum
from open_instruct.tokenization import IGNORE_INDEX


def test_token_loss_sum_matches_per_token_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=gen)
    targets = torch.randint(0, 11, (2, 7), generator=gen)
    targets[0, :3] = IGNORE_INDEX
    targets[1, -1] = IGNORE_INDEX
    expected = 0.0
    for b in range(2):
        for t in range(7):
            if targets[b, t] != IGNORE_INDEX:
                expected += F.cross_entropy(logits[b, t][None], targets[b, t][None]).item()
    got = token_loss_sum(logits, targets)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("trained", ["some", "all"])
def test_token_loss_sum_gradient_equals_ignore_index_cross_entropy(trained):
    """Only the trained rows go through the softmax: same value and logits gradient as the masked cross-entropy."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, 13, generator=gen)
    targets = torch.randint(0, 13, (2, 9), generator=gen)
    if trained == "some":
        targets[torch.rand(2, 9, generator=gen) < 0.6] = IGNORE_INDEX
    ours, reference = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = token_loss_sum(ours, targets)
    expected = F.cross_entropy(reference.reshape(-1, 13), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    got.backward()
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=0, atol=1e-7)


def test_token_loss_sum_literal():
    # Uniform logits over 4 classes: each trained token costs log(4).
    logits = torch.zeros(1, 3, 4)
    targets = torch.tensor([[1, IGNORE_INDEX, 3]])
    assert token_loss_sum(logits, targets).item() == pytest.approx(2 * math.log(4))


def test_token_loss_sum_is_fp32_for_low_precision_logits():
    logits = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    targets = torch.tensor([[0, 1, 2, 3, IGNORE_INDEX]])
    loss = token_loss_sum(logits, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(token_loss_sum(logits.float(), targets).item(), rel=1e-6)


def test_all_ignored_gives_zero_and_zero_gradient():
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    targets = torch.full((1, 4), IGNORE_INDEX)
    loss = token_loss_sum(logits, targets)
    assert loss.item() == 0.0
    scaled = scale_for_backward(loss, 0, num_processes=2, grad_accum=2)
    assert scaled.item() == 0.0
    scaled.backward()
    assert not torch.isnan(logits.grad).any()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_scale_for_backward_literal():
    assert scale_for_backward(torch.tensor(10.0), 20, num_processes=2, grad_accum=3).item() == pytest.approx(3.0)
    assert scale_for_backward(torch.tensor(10.0), 0, num_processes=1, grad_accum=1).item() == 10.0


def _micro_batches():
    """2 ranks x 2 micro-steps of (inputs, targets) with deliberately different trained-token counts."""
    gen = torch.Generator().manual_seed(0)
    trained_counts = [[1, 7], [3, 12]]  # per rank, per micro-step
    batches = []
    for rank_counts in trained_counts:
        rank_batches = []
        for count in rank_counts:
            x = torch.randn(12, 5, generator=gen)
            y = torch.randint(0, 3, (12,), generator=gen)
            y[count:] = IGNORE_INDEX
            rank_batches.append((x, y))
        batches.append(rank_batches)
    return batches


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def test_scaled_micro_batches_give_the_global_token_mean_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    batches = _micro_batches()
    num_processes, grad_accum = 2, 2
    global_tokens = sum(int((y != IGNORE_INDEX).sum()) for rank in batches for _, y in rank)
    assert global_tokens == 23

    # Each rank accumulates its micro-steps; accelerate divides each backward by grad_accum, DDP averages ranks.
    rank_grads = []
    for rank in batches:
        model.zero_grad()
        for x, y in rank:
            loss = scale_for_backward(token_loss_sum(model(x), y), global_tokens, num_processes, grad_accum)
            (loss / grad_accum).backward()
        rank_grads.append(_grads(model))
    applied = [sum(g) / num_processes for g in zip(*rank_grads)]

    # Reference: every trained token of the global batch weighed equally, in one go.
    model.zero_grad()
    xs = torch.cat([x for rank in batches for x, _ in rank])
    ys = torch.cat([y for rank in batches for _, y in rank])
    (token_loss_sum(model(xs), ys) / global_tokens).backward()
    reference = _grads(model)
    # The same thing through F.cross_entropy's own token mean.
    model.zero_grad()
    F.cross_entropy(model(xs), ys, ignore_index=IGNORE_INDEX).backward()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_grads(model), reference))

    for got, want in zip(applied, reference):
        assert torch.allclose(got, want, atol=1e-6, rtol=0)

    # A mean of per-micro-batch means would weigh the 1-token micro-batch like the 12-token one: different.
    model.zero_grad()
    means = [F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX) for rank in batches for x, y in rank]
    (sum(means) / len(means)).backward()
    mean_of_means = _grads(model)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(mean_of_means, reference))


def test_scale_does_not_depend_on_layout():
    """The same global batch split as 1x4, 2x2 or 4x1 (processes x accumulation) gives the same gradient."""
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)
    flat = [mb for rank in _micro_batches() for mb in rank]
    global_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in flat)
    results = []
    for processes, accum in [(1, 4), (2, 2), (4, 1)]:
        rank_grads = []
        for r in range(processes):
            model.zero_grad()
            for x, y in flat[r * accum:(r + 1) * accum]:
                (scale_for_backward(token_loss_sum(model(x), y), global_tokens, processes, accum) / accum).backward()
            rank_grads.append(_grads(model))
        results.append([sum(g) / processes for g in zip(*rank_grads)])
    for other in results[1:]:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0], other))
