"""Build the embedded tiny model: a Llama-architecture causal LM from a config shipped in the package, and a
byte-level tokenizer made locally (no merges: every UTF-8 byte is a token) with role tokens, distinct pad and eos
tokens and the tulu chat template. Both are saved as a normal Hugging Face model directory, so the trainer loads
them through the same `from_pretrained` code path as a hub model.

    python -m open_instruct.tiny_model output/tiny-llama
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from open_instruct.chat_templates import TULU

EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|bos|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def default_config_path() -> Path:
    return Path(__file__).parent / "assets" / "tiny_llama.json"  # shipped as package data


def build_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=1024,
    )
    tokenizer.chat_template = TULU
    return tokenizer


def build_model(tokenizer, config_path: Path, seed: int) -> LlamaForCausalLM:
    values = json.loads(Path(config_path).read_text())
    config = LlamaConfig(**values)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{config_path}: vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)}).")
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def build_tiny_model(output_dir: str | Path, config_path: str | Path | None = None, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to output_dir and return it."""
    output = Path(output_dir)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, Path(config_path) if config_path else default_config_path(), seed)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("output_dir", help="Directory to write the model and tokenizer to.")
    parser.add_argument("--config", default=None, help="Model config JSON (default: the shipped tiny_llama.json).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random initialisation.")
    args = parser.parse_args(argv)
    output = build_tiny_model(args.output_dir, args.config, args.seed)
    params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(output).parameters())
    print(f"Tiny model ({params / 1e6:.2f}M parameters) and tokenizer written to {output}")


if __name__ == "__main__":
    main()
