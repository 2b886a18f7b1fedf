"""Load a saved model with AutoModelForCausalLM and answer prompts greedily: a quick look at what training did.

    python -m open_instruct.sample output/debug --prompt "Spell the word: house"
    python -m open_instruct.sample output/debug --held_out synthetic:spelling synthetic:arithmetic --n 3
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from open_instruct import synthetic
from open_instruct.data import SYNTHETIC_PREFIX
from open_instruct.generation_tasks import after_reasoning, call_matches, end_text, exact


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 64, tools: list[dict] | None = None) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tools=tools, tokenize=False,
                                         add_generation_prompt=True)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    stop = end_text(tokenizer)  # a textual end of turn (<|im_end|> on a tokenizer without that token)
    return (reply.split(stop)[0] if stop else reply).strip()


def held_out_examples(sources: list[str], n: int) -> list[tuple[str, str, list | None, object]]:
    """(prompt, expected first reply, tools, scorer) of the first n test rows of each synthetic task; for a tool
    call the expected reply is the call's JSON, for reasoning the answer after it."""
    examples = []
    for source in sources:
        if not source.startswith(SYNTHETIC_PREFIX):
            raise SystemExit(f"--held_out takes synthetic:<task> sources, got {source!r}")
        task = source[len(SYNTHETIC_PREFIX):]
        for row in synthetic.load_task(task, "test")[:n]:
            reply = row["messages"][1]
            if reply.get("tool_calls"):
                call = reply["tool_calls"][0]["function"]
                expected, score = json.dumps({"name": call["name"], "arguments": call["arguments"]}), call_matches
            else:
                expected, score = reply["content"], after_reasoning if task == "reasoning" else exact
            examples.append((row["messages"][0]["content"], expected, row.get("tools"), score))
    return examples


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description="Answer prompts with a saved model.", allow_abbrev=False)
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", action="append", default=[], help="A user message (repeatable).")
    parser.add_argument("--held_out", nargs="+", default=[], help="synthetic:<task> sources to take test rows from.")
    parser.add_argument("--n", type=int, default=3, help="Held-out rows per source.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    examples = [(prompt, None, None, None) for prompt in args.prompt] + held_out_examples(args.held_out, args.n)
    correct = 0
    for prompt, expected, tools, score in examples:
        reply = answer(model, tokenizer, prompt, args.max_new_tokens, tools)
        right = expected is not None and score(reply, expected)
        correct += right
        suffix = "" if expected is None else f"   (expected {expected!r}: {'right' if right else 'wrong'})"
        print(f"user: {prompt}\nmodel: {reply}{suffix}\n")
    graded = sum(expected is not None for _, expected, _, _ in examples)
    if graded:
        print(f"held-out exact match: {correct}/{graded}")
        return correct / graded
    return None


if __name__ == "__main__":
    main()
