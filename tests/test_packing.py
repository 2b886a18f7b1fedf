"""Packed rows never let one example see another: packed logits equal each example's logits computed alone."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from open_instruct.batching import collate_packed


def tiny_llama(attn_implementation: str, dtype=torch.float32, device="cpu") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def examples(lengths=(5, 9, 3, 7)):
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 64, size=n).astype(np.int32) for n in lengths]
    return ids, [x.copy() for x in ids]


def assert_packed_equals_separate(model, device="cpu", atol=1e-5):
    ids, labels = examples()
    batch = collate_packed(ids, labels)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                       use_cache=False).logits[0]
        start = 0
        for x in ids:
            alone = model(input_ids=torch.from_numpy(x.astype(np.int64))[None].to(device)).logits[0]
            torch.testing.assert_close(packed[start : start + len(x)].float(), alone.float(), atol=atol, rtol=0)
            start += len(x)


@pytest.mark.parametrize("attn, short_row", [("packed_sdpa", 1024), ("packed_sdpa", 0), ("sdpa", None),
                                             ("eager", None)], ids=["packed_sdpa-masked", "packed_sdpa-per-example",
                                                                    "sdpa", "eager"])
def test_packed_logits_equal_per_example_logits(attn, short_row, monkeypatch):
    import open_instruct.attention as attention  # registers packed_sdpa

    if short_row is not None:  # both branches of packed_sdpa: one masked call, or one call per example
        monkeypatch.setattr(attention, "SHORT_ROW", short_row)
    assert_packed_equals_separate(tiny_llama(attn))


@pytest.mark.parametrize("short_row", [1024, 0], ids=["masked", "per-example"])
def test_packed_sdpa_gradients_equal_sdpa_with_block_mask(short_row, monkeypatch):
    """packed_sdpa computes the same function as SDPA with transformers' block-diagonal mask, in both branches."""
    import open_instruct.attention as attention

    monkeypatch.setattr(attention, "SHORT_ROW", short_row)
    ids, labels = examples()
    batch = collate_packed(ids, labels)
    grads = {}
    for attn in ("packed_sdpa", "sdpa"):
        model = tiny_llama(attn).train()
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        (out.float().square().mean()).backward()
        grads[attn] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads["packed_sdpa"], grads["sdpa"], atol=1e-6, rtol=1e-4)


def test_packed_sdpa_falls_back_to_sdpa_for_padded_batches_and_decoding():
    import open_instruct.attention  # noqa: F401
    from open_instruct.batching import collate_padded

    ids, labels = examples()
    padded = collate_padded(ids, labels, pad_token_id=0)
    ours, reference = tiny_llama("packed_sdpa"), tiny_llama("sdpa")
    with torch.no_grad():
        a = ours(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        b = reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        prompt = torch.from_numpy(ids[1].astype(np.int64))[None]
        generated = ours.generate(prompt, max_new_tokens=5, do_sample=False)
        expected = reference.generate(prompt, max_new_tokens=5, do_sample=False)
    mask = padded["attention_mask"].bool()
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=0)
    assert generated.tolist() == expected.tolist()


def test_without_restarting_positions_examples_would_mix():
    """The check above has teeth: the same row with continuous positions (plain concatenation) differs."""
    model = tiny_llama("sdpa")
    ids, labels = examples()
    batch = collate_packed(ids, labels)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        # transformers only derives example boundaries when no KV cache exists: with one, examples mix too.
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
    assert not torch.allclose(packed[5:], mixed[5:], atol=1e-3)
    assert not torch.allclose(packed[5:], cached[5:], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_packed_logits_flash_attention_bf16():
    model = tiny_llama("flash_attention_2", dtype=torch.bfloat16, device="cuda")
    assert_packed_equals_separate(model, device="cuda", atol=2e-2)


@pytest.mark.gpu
def test_packed_logits_sdpa_cuda_bf16():
    assert_packed_equals_separate(tiny_llama("sdpa", dtype=torch.bfloat16, device="cuda"), device="cuda", atol=2e-2)


@pytest.mark.gpu
def test_packed_sdpa_cuda_bf16_logits_and_gradients_match_per_example():
    """The trainer's default on a GPU without flash-attn: packed_sdpa, which takes PyTorch's flash varlen kernel in
    bf16 where it exists. Logits and gradients of a packed row equal those of each example alone (bf16 noise)."""
    from open_instruct import attention

    model = tiny_llama(attention.NAME, dtype=torch.bfloat16, device="cuda")
    assert_packed_equals_separate(model, device="cuda", atol=2e-2)
    ids, labels = examples((40, 300, 7, 1200))  # one example past SHORT_ROW-sized rows, as in real packing
    batch = collate_packed(ids, labels)
    model.zero_grad()
    model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), use_cache=False).logits.float().square().mean().backward()
    packed = {name: p.grad.float().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    total = sum(len(x) for x in ids)
    for x in ids:
        logits = model(input_ids=torch.from_numpy(x.astype(np.int64))[None].cuda(), use_cache=False).logits.float()
        (logits.square().sum() / (total * logits.shape[-1])).backward()
    for name, p in model.named_parameters():
        reference = p.grad.float()
        assert (packed[name] - reference).norm() <= 2e-2 * reference.norm() + 1e-6, name


@pytest.mark.gpu
def test_packed_sdpa_takes_the_varlen_kernel_under_autocast_with_fp32_weights(monkeypatch):
    """accelerate's bf16 mixed precision keeps fp32 weights, and Llama's RoPE then returns fp32 queries and keys: the
    varlen kernel must still run (in autocast's dtype), not the per-example fp32 fallback (about 13x slower on an H100)."""
    from open_instruct import attention

    if attention.varlen_attn is None:
        pytest.skip("this PyTorch has no torch.nn.attention.varlen")
    calls = []
    real = attention.varlen_attn
    monkeypatch.setattr(attention, "varlen_attn", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    model = tiny_llama(attention.NAME, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_packed_equals_separate(model, device="cuda", atol=3e-2)
    assert calls and set(calls) == {torch.bfloat16}


def test_varlen_dtype_follows_autocast_not_the_fp32_query(monkeypatch):
    """The decision behind the GPU test above, checkable without a GPU: an fp32 query under bf16 autocast on CUDA
    takes the varlen kernel in bf16; without autocast an fp32 query does not; off CUDA never."""
    from types import SimpleNamespace

    from open_instruct import attention

    monkeypatch.setattr(attention, "varlen_attn", object())
    cuda_fp32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device=None: True)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.bfloat16)
    assert attention.varlen_dtype(cuda_fp32) == torch.bfloat16
    assert attention.varlen_dtype(SimpleNamespace(is_cuda=False, dtype=torch.bfloat16)) is None
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device=None: False)
    assert attention.varlen_dtype(cuda_fp32) is None
    assert attention.varlen_dtype(SimpleNamespace(is_cuda=True, dtype=torch.float16)) == torch.float16
