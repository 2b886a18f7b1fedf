"""chunked_linear_cross_entropy_sum: the same loss sum and gradients as the naive path, without the full logits."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from open_instruct.loss import chunked_linear_cross_entropy_sum, token_loss_sum
from open_instruct.tokenization import IGNORE_INDEX


def _naive(hidden, lm_head, targets):
    return token_loss_sum(lm_head(hidden), targets)


def _loss_and_grads(loss_fn, hidden, lm_head, targets, upstream=None):
    """(loss, {name: grad}) for one fresh forward + backward; `upstream` makes `hidden` the output of that layer."""
    leaves = {"hidden": hidden, **{f"lm_head.{k}": p for k, p in lm_head.named_parameters()}}
    if upstream is not None:
        leaves.update({f"upstream.{k}": p for k, p in upstream.named_parameters()})
    for leaf in leaves.values():
        leaf.grad = None
    inputs = upstream(hidden) if upstream is not None else hidden
    loss = loss_fn(inputs, lm_head, targets)
    loss.backward()
    return loss.detach(), {name: leaf.grad.clone() for name, leaf in leaves.items()}


def _case(bias: bool, ignored_fraction: float = 0.4, shape=(2, 37), hidden_size=64, vocab=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen, requires_grad=True)
    torch.manual_seed(seed)
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=bias)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < ignored_fraction] = IGNORE_INDEX
    return hidden, lm_head, targets


def _assert_same(got, expected):
    loss, grads = got
    ref_loss, ref_grads = expected
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_naive_value_and_gradients(chunk_size, bias):
    hidden, lm_head, targets = _case(bias)
    assert 0 < (targets == IGNORE_INDEX).sum() < targets.numel()
    chunked = lambda h, m, t: chunked_linear_cross_entropy_sum(h, m, t, chunk_size=chunk_size)  # noqa: E731
    _assert_same(_loss_and_grads(chunked, hidden, lm_head, targets), _loss_and_grads(_naive, hidden, lm_head, targets))


def test_matches_naive_when_every_position_is_trained():
    hidden, lm_head, targets = _case(bias=True, ignored_fraction=0.0, seed=1)
    assert (targets != IGNORE_INDEX).all()
    chunked = lambda h, m, t: chunked_linear_cross_entropy_sum(h, m, t, chunk_size=10)  # noqa: E731
    _assert_same(_loss_and_grads(chunked, hidden, lm_head, targets), _loss_and_grads(_naive, hidden, lm_head, targets))


def test_matches_naive_with_fixed_num_chunks_including_empty_ones():
    hidden, lm_head, targets = _case(bias=True, shape=(1, 9))
    trained = int((targets != IGNORE_INDEX).sum())
    calls = []
    lm_head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    chunked = lambda h, m, t: chunked_linear_cross_entropy_sum(h, m, t, num_chunks=trained + 3)  # noqa: E731
    got = _loss_and_grads(chunked, hidden, lm_head, targets)
    # One call per chunk, empty ones too, on the forward and again on the backward's recomputation.
    assert len(calls) == 2 * (trained + 3) and calls.count(0) == 2 * 3
    _assert_same(got, _loss_and_grads(_naive, hidden, lm_head, targets))


def test_all_targets_ignored_gives_exact_zero_and_zero_gradients():
    hidden, lm_head, targets = _case(bias=True, ignored_fraction=1.0)
    calls = []
    lm_head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    loss, grads = _loss_and_grads(chunked_linear_cross_entropy_sum, hidden, lm_head, targets)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert calls and all(n == 0 for n in calls)  # the output layer is still called (ZeRO-3 / DDP), on no rows
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name  # zero, not None and not NaN
    _assert_same((loss, grads), _loss_and_grads(_naive, hidden, lm_head, targets))


def test_gradients_reach_upstream_parameters():
    hidden, lm_head, targets = _case(bias=False, seed=3)
    torch.manual_seed(4)
    upstream = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    chunked = lambda h, m, t: chunked_linear_cross_entropy_sum(h, m, t, chunk_size=5)  # noqa: E731
    got = _loss_and_grads(chunked, hidden, lm_head, targets, upstream=upstream)
    assert got[1]["upstream.0.weight"].abs().sum() > 0
    _assert_same(got, _loss_and_grads(_naive, hidden, lm_head, targets, upstream=upstream))


def test_low_precision_hidden_gives_fp32_loss_close_to_naive():
    hidden, lm_head, targets = _case(bias=True, seed=5)
    hidden, lm_head = hidden.detach().bfloat16(), lm_head.bfloat16()
    got = chunked_linear_cross_entropy_sum(hidden, lm_head, targets, chunk_size=7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _naive(hidden, lm_head, targets), rtol=1e-3, atol=1e-2)


def test_rejects_bad_arguments():
    hidden, lm_head, targets = _case(bias=False)
    with pytest.raises(ValueError):
        chunked_linear_cross_entropy_sum(hidden, lm_head, targets, chunk_size=0)
    with pytest.raises(ValueError):
        chunked_linear_cross_entropy_sum(hidden, lm_head, targets, num_chunks=0)
    with pytest.raises(ValueError):
        chunked_linear_cross_entropy_sum(hidden, lm_head, targets[:, :-1])


# Memory, measured deterministically (tensor sizes, no timing, no RSS).
N, H, V, CHUNK = 512, 32, 8192, 64


def _memory_case():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (N,), generator=gen)
    return hidden, lm_head, targets


def _saved_tensor_sizes(loss_fn):
    """Element counts of the tensors autograd saves for the backward during the forward."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    hidden, lm_head, targets = _memory_case()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(hidden, lm_head, targets)
    loss.backward()
    return sizes


def test_saved_for_backward_is_far_smaller_than_the_logits():
    naive = _saved_tensor_sizes(_naive)
    chunked = _saved_tensor_sizes(lambda h, m, t: chunked_linear_cross_entropy_sum(h, m, t, chunk_size=CHUNK))
    assert max(naive) >= N * V  # the naive path keeps the full log-softmax until the backward
    assert max(chunked) <= CHUNK * V
    assert max(chunked) <= CHUNK * H  # in fact only the chunks' inputs: no logits are kept at all


def test_logits_never_exceed_one_chunk_forward_or_backward():
    hidden, lm_head, targets = _memory_case()
    outputs = []
    lm_head.register_forward_hook(lambda mod, args, out: outputs.append(tuple(out.shape)))
    chunked_linear_cross_entropy_sum(hidden, lm_head, targets, chunk_size=CHUNK).backward()
    # N / CHUNK calls on the forward, as many recomputations on the backward, each one chunk's logits.
    assert outputs == [(CHUNK, V)] * (2 * N // CHUNK)


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage created by ops under the mode (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if id(storage) not in self._seen:  # views and in-place results allocate nothing new
                    self._seen.add(id(storage))
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _peak_live_bytes(loss_fn):
    hidden, lm_head, targets = _memory_case()
    with _PeakLiveBytes() as mode:
        loss_fn(hidden, lm_head, targets).backward()
    return mode.peak


def test_peak_live_memory_forward_and_backward():
    naive = _peak_live_bytes(_naive)
    chunked = _peak_live_bytes(lambda h, m, t: chunked_linear_cross_entropy_sum(h, m, t, chunk_size=CHUNK))
    logits_bytes = N * V * 4
    assert naive >= 2 * logits_bytes  # logits-sized fp32 tensors alive together (log-softmax and its gradients)
    assert chunked * 4 <= naive
    # A few chunk-sized fp32 tensors, the weight and its gradients (autograd sums the chunks' contributions out of
    # place: up to three weight-sized buffers at once), and some [N, H] rows and their gradients.
    assert chunked <= 4 * CHUNK * V * 4 + 4 * V * H * 4 + 4 * N * H * 4
