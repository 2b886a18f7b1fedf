"""The embedded tiny model: built from the shipped config, saved as a normal HF directory, reloadable."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from open_instruct.tiny_model import EOS, PAD, ROLE_TOKENS, build_tiny_model, default_config_path


def test_tiny_model_directory_is_a_normal_hf_model(tiny_model_dir):
    shipped = json.loads(default_config_path().read_text())
    saved = json.loads((tiny_model_dir / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["hidden_size"] == shipped["hidden_size"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == PAD and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert all(len(tokenizer(t, add_special_tokens=False).input_ids) == 1 for t in ROLE_TOKENS)
    assert tokenizer.chat_template and "<|assistant|>" in tokenizer.chat_template
    assert len(tokenizer) <= model.config.vocab_size
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    text = "héllo wörld 12+3"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text  # byte-level: lossless


def test_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a, b = build_tiny_model(tmp_path / "a"), build_tiny_model(tmp_path / "b")
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all((weights_a[k] == weights_b[k]).all() for k in weights_a)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
