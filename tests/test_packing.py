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
