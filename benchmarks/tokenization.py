"""Tokenization throughput: our full prepare path vs TRL's SFTTrainer dataset preparation, side by side.

    .venv/bin/pip install --no-deps trl          # TRL only for this benchmark (--no-deps keeps our pinned stack)
    .venv/bin/python benchmarks/tokenization.py --rows 100000 [--num_proc 2] [--trl_num_proc 2]

Both sides read the same generated JSONL of multi-turn conversations with the same 32k-vocab byte-level BPE
tokenizer, trained here on the same text, and the same tulu chat template (with `{% generation %}` markers, which
TRL's assistant_only_loss needs; our masks do not need them). Timed for us: `data_cache.get_mixture` (read the
JSONL, sample, convert, render, tokenize, mask, write the Arrow cache). Timed for TRL: `load_dataset("json")` plus
`SFTTrainer._prepare_dataset` with assistant_only_loss=True (render, tokenize, assistant masks, labels). The script
also checks that both produce the same input_ids and the same trained positions on a sample of examples.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from open_instruct.chat_templates import TULU_GENERATION  # noqa: E402  (after the path set-up above)

SPECIAL = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]


def make_words(rng: random.Random, count: int = 20000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ing", "er", "an", "st"]
    return ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))) for _ in range(count)]


def sentence(rng: random.Random, words: list[str], weights: list[float], n_words: int) -> str:
    picked = rng.choices(words, weights=weights, k=n_words)
    text, start = [], 0
    while start < len(picked):  # sentences of 5-20 words with punctuation, like prose
        end = start + rng.randint(5, 20)
        chunk = picked[start:end]
        chunk[0] = chunk[0].capitalize()
        text.append(" ".join(chunk) + rng.choice(".?!."))
        start = end
    return " ".join(text)


def generate_conversations(rows: int, seed: int = 0) -> list[dict]:
    """Multi-turn chats: 1-4 exchanges, optional system prompt, Zipf-distributed vocabulary."""
    rng = random.Random(seed)
    words = make_words(rng)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    conversations = []
    for _ in range(rows):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": sentence(rng, words, weights, rng.randint(8, 30))})
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            messages.append({"role": "user", "content": sentence(rng, words, weights, rng.randint(8, 80))})
            messages.append({"role": "assistant", "content": sentence(rng, words, weights, rng.randint(20, 250))})
        conversations.append({"messages": messages})
    return conversations


def train_tokenizer(conversations: list[dict], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator((m["content"] for c in conversations[:30000] for m in c["messages"]), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        additional_special_tokens=SPECIAL[2:])
    tokenizer.chat_template = TULU_GENERATION
    tokenizer.save_pretrained(out)
    return tokenizer


def run_ours(data: Path, tokenizer, cache: Path, num_proc: int, max_seq_length: int):
    from open_instruct import data_cache

    args = SimpleNamespace(dataset_mixer_list=[str(data), "1.0"], dataset_mixer_list_splits=["train"],
                           dataset_mixer_file=None, max_seq_length=max_seq_length, train_on="assistant", train_reasoning="all_turns",
                           truncation="whole_turns", add_bos=False, skip_bad_rows=False, max_unmaskable_fraction=0.01,
                           dataset_local_cache_dir=str(cache), dataset_skip_cache=False, dataset_num_proc=num_proc,
                           dataset_cache_on_damage="rebuild", seed=0)
    start = time.perf_counter()
    mixture, _ = data_cache.get_mixture(args, tokenizer, log=lambda _: None)
    return time.perf_counter() - start, mixture


def run_trl(data: Path, tokenizer, num_proc: int | None, max_seq_length: int, workdir: Path):
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    config = SFTConfig(output_dir=str(workdir / "trl"), assistant_only_loss=True, max_length=max_seq_length,
                       packing=False, dataset_num_proc=num_proc, report_to=[], use_cpu=not torch.cuda.is_available())
    warm = datasets.Dataset.from_list(generate_conversations(4, seed=1))
    trainer = SFTTrainer(model=tiny, args=config, train_dataset=warm, processing_class=tokenizer)
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train",
                                    cache_dir=str(workdir / "hf-cache"))
    prepared = trainer._prepare_dataset(dataset, tokenizer, config, False, None, "train")
    return time.perf_counter() - start, prepared


def compare_masks(mixture, prepared, sample: int = 500) -> tuple[int, int]:
    """Same ids and the same trained positions (ours: labels != -100 after our shift-free labels)."""
    same = 0
    count = min(sample, len(mixture), len(prepared))
    for i in range(count):
        ids, labels = mixture.examples([i])
        theirs = prepared[i]
        ours_trained = [int(label) != -100 for label in labels[0]]
        their_trained = [label != -100 for label in theirs["labels"]]
        same += list(map(int, ids[0])) == theirs["input_ids"] and ours_trained == their_trained
    return same, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--vocab_size", type=int, default=32_000)
    parser.add_argument("--max_seq_length", type=int, default=4096)
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="our tokenization processes")
    parser.add_argument("--trl_num_proc", type=int, default=None, help="TRL's dataset_num_proc (default: its own)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        conversations = generate_conversations(args.rows)
        data = work / "chats.jsonl"
        data.write_text("".join(json.dumps(c) + "\n" for c in conversations))
        tokenizer = train_tokenizer(conversations, args.vocab_size, work / "tokenizer")
        print(f"{args.rows} conversations, {data.stat().st_size / 1e6:.0f} MB, tokenizer vocab {len(tokenizer)}, "
              f"{os.cpu_count()} cores")
        ours_seconds, mixture = run_ours(data, tokenizer, work / "cache", args.num_proc, args.max_seq_length)
        trl_seconds, prepared = run_trl(data, tokenizer, args.trl_num_proc, args.max_seq_length, work)
        tokens = sum(s.tokens for s in mixture.stats)
        same, checked = compare_masks(mixture, prepared)
        print(f"ours (num_proc={args.num_proc}):      {ours_seconds:7.1f} s  {len(mixture) / ours_seconds:8.0f} "
              f"examples/s  {tokens / ours_seconds:10.0f} tokens/s")
        print(f"TRL (dataset_num_proc={args.trl_num_proc}): {trl_seconds:7.1f} s  {len(prepared) / trl_seconds:8.0f} "
              f"examples/s  {tokens / trl_seconds:10.0f} tokens/s")
        print(f"speed-up ours / TRL: {trl_seconds / ours_seconds:.2f}x")
        print(f"identical ids and trained positions: {same}/{checked} sampled examples")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
