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


def _loss_and_grads(loss_fn, hidden, lm_head, targets, upstream=None, scale=1.0, initial_grad=None):
    """(loss, {name: grad}) for one fresh forward + backward; `upstream` makes `hidden` the output of that layer;
    the backward starts from `scale` (as after scale_for_backward); `initial_grad` pre-fills every leaf's .grad (an
    earlier micro-batch under gradient accumulation)."""
    leaves = {"hidden": hidden, **{f"lm_head.{k}": p for k, p in lm_head.named_parameters()}}
    if upstream is not None:
        leaves.update({f"upstream.{k}": p for k, p in upstream.named_parameters()})
    for leaf in leaves.values():
        leaf.grad = None if initial_grad is None else torch.full_like(leaf, initial_grad)
    inputs = upstream(hidden) if upstream is not None else hidden
    loss = loss_fn(inputs, lm_head, targets)
    (loss * scale).backward()
    return loss.detach(), {name: leaf.grad.clone() for name, leaf in leaves.items() if leaf.grad is not None}


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
    # One call per chunk, empty ones too, all in the forward (the backward recomputes nothing).
    assert len(calls) == trained + 3 and calls.count(0) == 3
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




def _chunked(chunk_size=None, num_chunks=None):
    return lambda h, m, t: chunked_linear_cross_entropy_sum(h, m, t, chunk_size or 4096, num_chunks=num_chunks)


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_follow_the_upstream_scale_and_accumulate_onto_existing_grads(bias):
    hidden, lm_head, targets = _case(bias, seed=6)
    for scale, initial in [(3.7, None), (1.0, 0.5), (-0.25, 2.0)]:
        got = _loss_and_grads(_chunked(7), hidden, lm_head, targets, scale=scale, initial_grad=initial)
        expected = _loss_and_grads(_naive, hidden, lm_head, targets, scale=scale, initial_grad=initial)
        _assert_same(got, expected)


def test_two_losses_in_one_graph_each_get_their_own_gradients():
    hidden, lm_head, targets = _case(bias=True, seed=7)
    two = lambda h, m, t: 2.0 * _chunked(5)(h, m, t) + _chunked(11)(h[:, :20], m, t[:, :20])  # noqa: E731
    reference = lambda h, m, t: 2.0 * _naive(h, m, t) + _naive(h[:, :20], m, t[:, :20])  # noqa: E731
    _assert_same(_loss_and_grads(two, hidden, lm_head, targets), _loss_and_grads(reference, hidden, lm_head, targets))


def test_frozen_output_layer_or_frozen_hidden_states():
    hidden, lm_head, targets = _case(bias=True, seed=8)
    lm_head.requires_grad_(False)  # e.g. LoRA elsewhere: only the hidden states get a gradient
    got = _loss_and_grads(_chunked(6), hidden, lm_head, targets)
    assert got[1].keys() == {"hidden"}
    _assert_same(got, _loss_and_grads(_naive, hidden, lm_head, targets))

    lm_head.requires_grad_(True)
    frozen_hidden = hidden.detach()
    got = _loss_and_grads(_chunked(6), frozen_hidden, lm_head, targets)
    assert got[1].keys() == {"lm_head.weight", "lm_head.bias"}
    _assert_same(got, _loss_and_grads(_naive, frozen_hidden, lm_head, targets))


def test_no_grad_mode_gives_the_value_without_a_graph():
    hidden, lm_head, targets = _case(bias=True, seed=9)
    with torch.no_grad():
        got = chunked_linear_cross_entropy_sum(hidden, lm_head, targets, chunk_size=8)
    assert got.grad_fn is None and not got.requires_grad
    torch.testing.assert_close(got, _naive(hidden, lm_head, targets).detach(), rtol=1e-5, atol=1e-4)


def test_second_backward_is_refused_not_silently_wrong():
    hidden, lm_head, targets = _case(bias=False, seed=10)
    loss = chunked_linear_cross_entropy_sum(hidden, lm_head, targets, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_low_precision_weights_give_gradients_close_to_naive():
    hidden, lm_head, targets = _case(bias=True, seed=11)
    hidden, lm_head = hidden.detach().bfloat16().requires_grad_(), lm_head.bfloat16()
    got = _loss_and_grads(_chunked(7), hidden, lm_head, targets)
    expected = _loss_and_grads(_naive, hidden, lm_head, targets)
    assert all(got[1][name].dtype == torch.bfloat16 for name in got[1])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-2)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name].float(), grad.float(), rtol=2e-2, atol=2e-3, msg=name)


def test_autocast_matches_naive_under_autocast():
    hidden, lm_head, targets = _case(bias=True, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(_chunked(7), hidden, lm_head, targets)
        expected = _loss_and_grads(_naive, hidden, lm_head, targets)
    assert all(grad.dtype == torch.float32 for grad in got[1].values())  # fp32 parameters get fp32 gradients
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-2)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=2e-2, atol=2e-3, msg=name)


def test_output_layer_must_be_a_linear_layer():
    hidden, lm_head, targets = _case(bias=False)
    with pytest.raises(TypeError, match="nn.Linear"):
        chunked_linear_cross_entropy_sum(hidden, torch.nn.Sequential(lm_head), targets)


class _RegatherInBackward(torch.autograd.Function):
    """What ZeRO-3 puts on a module's outputs: gather the module's parameters before its backward runs."""

    @staticmethod
    def forward(ctx, zero3, module, output):
        ctx.zero3, ctx.module = zero3, module
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        ctx.zero3.gather(ctx.module)
        return None, None, grad


class _FakeZero3:
    """One process of DeepSpeed ZeRO-3 on one module: its parameters are empty tensors except from its forward
    pre-hook (the gather) to its forward hook (the release), and again from when a gradient reaches one of its
    outputs. The hooks are registered before the loss registers its own, as DeepSpeed's are."""

    def __init__(self, module: torch.nn.Module):
        self.full = {name: p.data for name, p in module.named_parameters()}
        self.calls = 0
        module.register_forward_pre_hook(lambda m, args: self.gather(m))
        module.register_forward_hook(self.release_and_wrap)
        self.release(module)

    def gather(self, module):
        for name, p in module.named_parameters():
            p.data = self.full[name]

    def release(self, module):
        for p in module.parameters():
            p.data = torch.empty(0, dtype=p.dtype)

    def release_and_wrap(self, module, args, output):
        self.calls += 1
        self.release(module)
        return _RegatherInBackward.apply(self, module, output)


def test_zero3_like_partitioned_weight_with_gradient_accumulation():
    """The gradient math runs while the weight is gathered, and its gradient reaches AccumulateGrad while it is
    gathered again in the backward, where ZeRO-3's gradient hook takes it (reduces it and sets .grad to None)."""
    hidden, lm_head, targets = _case(bias=True, seed=13)
    halves = [targets.clone(), targets.clone()]
    halves[0][:, ::2], halves[1][:, 1::2] = IGNORE_INDEX, IGNORE_INDEX  # two micro-batches
    expected = {}
    for micro_targets in halves:
        for name, grad in _loss_and_grads(_naive, hidden, lm_head, micro_targets, scale=2.5)[1].items():
            expected[name] = expected.get(name, 0) + grad

    for leaf in (hidden, *lm_head.parameters()):
        leaf.grad = None  # under ZeRO-3 .grad is None at each backward: the hook moved the last one out
    zero3, reduced = _FakeZero3(lm_head), {}

    def reduce(param):  # ZeRO-3's post-accumulate-grad hook, with the weight still gathered
        name = next(n for n, p in lm_head.named_parameters() if p is param)
        assert param.shape == zero3.full[name].shape
        reduced[f"lm_head.{name}"] = reduced.get(f"lm_head.{name}", 0) + param.grad
        param.grad = None

    for p in lm_head.parameters():
        p.register_post_accumulate_grad_hook(reduce)
    for micro_targets in halves:
        loss = chunked_linear_cross_entropy_sum(hidden, lm_head, micro_targets, num_chunks=4)
        assert zero3.calls % 4 == 0 and lm_head.weight.numel() == 0
        (loss * 2.5).backward()
        zero3.release(lm_head)  # what DeepSpeed does at the end of the backward
    assert zero3.calls == 8  # the forwards' calls only: nothing is recomputed in the backwards
    got = {"hidden": hidden.grad, **reduced}
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# Memory, measured deterministically (tensor sizes, no timing, no RSS). A chunk's logits (CHUNK x V) are smaller
# than the weight (V x H), so a weight-sized tensor is recognizable by its size.
N, H, V, CHUNK = 512, 128, 4096, 32
WEIGHT_BYTES, LOGITS_BYTES, CHUNK_LOGITS_BYTES, ROWS_BYTES = V * H * 4, N * V * 4, CHUNK * V * 4, N * H * 4


def _memory_case(untrained=0):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[:untrained] = IGNORE_INDEX
    return hidden, lm_head, targets


class _LiveStorage(TorchDispatchMode):
    """Tensor storage allocated by ops under the mode (forward and backward): bytes alive (now and at peak), the
    most weight-sized storages alive at once, and the largest tensor other than weight-sized ones. Storage that
    existed before is not counted."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = self.weight_sized = self.peak_weight_sized = self.largest = 0
        self._seen = {t.untyped_storage().data_ptr() for t in existing}

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self.weight_sized -= nbytes == WEIGHT_BYTES
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                if tensor.numel() != V * H:
                    self.largest = max(self.largest, tensor.numel())
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self._seen:  # views and in-place results allocate nothing new
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.weight_sized += storage.nbytes() == WEIGHT_BYTES
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        self.peak_weight_sized = max(self.peak_weight_sized, self.weight_sized)
        return out


def _measure(loss_fn, untrained=0, initial_grad=False):
    """(mode after forward + backward, bytes alive between them)."""
    hidden, lm_head, targets = _memory_case(untrained)
    if initial_grad:
        lm_head.weight.grad = torch.zeros_like(lm_head.weight)
    existing = [hidden, *lm_head.parameters(), *(p.grad for p in lm_head.parameters() if p.grad is not None)]
    with _LiveStorage(existing) as mode:
        loss = loss_fn(hidden, lm_head, targets)
        between = mode.live
        loss.backward()
    return mode, between


CHUNKED = _chunked(CHUNK)


def test_no_tensor_is_anywhere_near_the_logits_size():
    naive, _ = _measure(_naive)
    chunked, _ = _measure(CHUNKED)
    assert naive.largest >= N * V
    assert chunked.largest == CHUNK * V  # one chunk's logits (and their gradient, in place)


@pytest.mark.parametrize("initial_grad", [False, True])
def test_one_weight_sized_gradient_buffer(initial_grad):
    """The chunks' weight gradients are summed in place into one buffer, which becomes .grad without a copy (or is
    added in place onto an existing .grad): never more weight-sized tensors alive than for the naive loss."""
    naive, _ = _measure(_naive, initial_grad=initial_grad)
    chunked, _ = _measure(CHUNKED, initial_grad=initial_grad)
    assert naive.peak_weight_sized == 1
    assert chunked.peak_weight_sized == 1


def test_the_weight_gradient_buffer_becomes_grad_without_a_copy():
    hidden, lm_head, targets = _memory_case()
    allocated = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.untyped_storage().nbytes() == WEIGHT_BYTES:
                allocated.append(out.untyped_storage().data_ptr())
            return out

    with _Record():
        chunked_linear_cross_entropy_sum(hidden, lm_head, targets, chunk_size=CHUNK).backward()
    new = set(allocated) - {lm_head.weight.untyped_storage().data_ptr()}
    assert new == {lm_head.weight.grad.untyped_storage().data_ptr()}


@pytest.mark.parametrize("untrained", [0, N // 2])
def test_peak_live_memory_forward_and_backward(untrained):
    naive, naive_between = _measure(_naive, untrained)
    chunked, chunked_between = _measure(CHUNKED, untrained)
    assert naive.peak >= 2 * LOGITS_BYTES  # logits-sized fp32 tensors alive together (log-softmax and its gradient)
    # the naive loss keeps the log-softmax of its trained rows until the backward
    assert naive_between >= LOGITS_BYTES * (N - untrained) // N
    # Between forward and backward: the gradients w.r.t. the weight (one buffer) and the rows, and little else.
    assert chunked_between <= WEIGHT_BYTES + ROWS_BYTES + 64 * 1024
    # At peak: that, plus one chunk's logits and its [CHUNK x H] products, and the rows' gradient on their way.
    assert chunked.peak <= WEIGHT_BYTES + CHUNK_LOGITS_BYTES + 3 * ROWS_BYTES
    assert chunked.peak * 4 <= naive.peak
