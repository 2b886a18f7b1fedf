"""Model/tokenizer loading and hub code paths, exercised on local paths and with recording stand-ins for the Hub."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from open_instruct import model_utils
from open_instruct.data import MixerItem, load_source


def args(**overrides):
    values = dict(model_name_or_path="org/model", model_revision=None, tokenizer_name_or_path=None,
                  tokenizer_revision=None, chat_template_name=None, use_liger_kernel=False, gradient_checkpointing=False,
                  use_lora=False, use_qlora=False)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_tokenizer_from_the_model_with_its_revision(monkeypatch, tiny_model_dir):
    from transformers import AutoTokenizer

    calls = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(model_utils.AutoTokenizer, "from_pretrained",
                        lambda name, revision=None: calls.append((name, revision)) or real(tiny_model_dir))
    model_utils.load_tokenizer(args(model_revision="abc123"))
    model_utils.load_tokenizer(args(tokenizer_name_or_path="org/tok", tokenizer_revision="v2", model_revision="abc123"))
    assert calls == [("org/model", "abc123"), ("org/tok", "v2")]


def test_named_chat_template_replaces_the_tokenizer_template(tiny_model_dir):
    from open_instruct.chat_templates import CHATML

    tokenizer = model_utils.load_tokenizer(args(model_name_or_path=str(tiny_model_dir), chat_template_name="chatml"))
    assert tokenizer.chat_template == CHATML


def test_model_loading_passes_revision_dtype_attention_and_checkpointing(tiny_model_dir):
    model = model_utils.load_model(args(model_name_or_path=str(tiny_model_dir), gradient_checkpointing=True),
                                   torch.float32, "eager")
    assert model.config._attn_implementation == "eager"
    assert model.is_activation_checkpointing and model.config.use_cache is False


def test_liger_on_cpu_keeps_pytorch_ops_and_says_so(caplog, tiny_model_dir):
    model = model_utils.load_model(args(model_name_or_path=str(tiny_model_dir), use_liger_kernel=True), torch.float32,
                                   "sdpa")
    assert "Liger needs CUDA" in caplog.text
    assert type(model.model.norm).__module__.startswith("transformers.")


@pytest.mark.gpu
def test_liger_patches_the_model_on_cuda(tiny_model_dir):
    model = model_utils.load_model(args(model_name_or_path=str(tiny_model_dir), use_liger_kernel=True), torch.bfloat16,
                                   "sdpa")
    # Liger patches instances in place (the class stays LlamaRMSNorm; forward and repr are Liger's).
    assert "Liger" in repr(model.model.norm)
    assert "liger" in model.model.layers[0].mlp.forward.__func__.__module__


def test_attention_backend_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_utils.attention_implementation() == "packed_sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_utils.importlib.util, "find_spec", lambda name: None)
    assert model_utils.attention_implementation() == "packed_sdpa"  # CUDA without flash-attn installed
    monkeypatch.setattr(model_utils.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert model_utils.attention_implementation() == "flash_attention_2"


def test_hub_dataset_is_loaded_with_its_pinned_revision_and_split(monkeypatch):
    import datasets

    calls = []
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, revision=None, split=None: calls.append((repo, revision, split)) or rows)
    assert load_source(MixerItem("org/data@v1.2", 1.0, True, "test", "hub")).dataset == rows
    assert load_source(MixerItem("org/data", 1.0, True, "train", "hub")).dataset == rows
    assert calls == [("org/data", "v1.2", "test"), ("org/data", None, "train")]


def test_packing_probe_passes_for_sdpa_and_catches_a_leaking_forward(tiny_model_dir):
    model = model_utils.load_model(args(model_name_or_path=str(tiny_model_dir)), torch.float32, "sdpa").train()
    assert model_utils.packed_examples_stay_apart(model, "cpu", model.config.vocab_size)
    assert model.training  # the probe runs in eval mode and restores training mode

    class Leaking(torch.nn.Module):
        """Drops position_ids, as a backend that ignores packing would: the examples then see each other."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    assert not model_utils.packed_examples_stay_apart(Leaking(model), "cpu", model.config.vocab_size)


def test_explicit_flash_attention_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(model_utils.ModelSetupError, match="needs CUDA"):
        model_utils.attention_implementation("flash_attention_2")
    assert model_utils.attention_implementation("eager") == "eager"


def test_trainer_turns_on_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    from open_instruct.finetune import configure_cuda_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
