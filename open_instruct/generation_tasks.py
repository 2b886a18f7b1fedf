"""Generation tasks for in-loop evaluation: prompts from a synthetic task's held-out split, greedy replies, and how
a reply is scored. Pure text functions; evaluation.py runs the generation.

    spelling, reverse, letter_count, arithmetic   exact match of the reply with the answer
    reasoning        the text after the reply's last </think> (the whole reply without one) equals the answer
    tool_calc        two tasks: tool_calc_call (the reply's first JSON object parses, names the called tool and has
                     exactly the expected arguments) and tool_calc_answer (given the expected call and the tool's
                     result, the final reply equals the result)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from open_instruct import synthetic
from open_instruct.tokenization import bos_prefix, render
from open_instruct.turn_spans import template_shape

GENERATION_SLACK = 8  # new tokens allowed beyond the longest expected reply: room for the end-of-turn marker


def exact(reply: str, expected: str) -> bool:
    return reply == expected.strip()


def after_reasoning(reply: str, expected: str) -> bool:
    return reply.rpartition("</think>")[2].strip() == expected.strip()


def first_json_object(text: str) -> dict | None:
    """The first JSON object in the text (None when none parses)."""
    decoder = json.JSONDecoder()
    at = text.find("{")
    while at >= 0:
        try:
            value, _ = decoder.raw_decode(text, at)
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
        at = text.find("{", at + 1)
    return None


def parse_tool_call(text: str) -> tuple[str, dict] | None:
    """(name, arguments) of the first JSON call in a reply, whatever tags the template wraps it in; arguments may be
    under "arguments" or "parameters" (Llama's JSON calls)."""
    call = first_json_object(text)
    if call is None or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters"))
    return (call["name"], arguments) if isinstance(arguments, dict) else None


def call_matches(reply: str, expected: str) -> bool:
    """The reply's call names the expected tool with exactly the expected arguments (`expected` is the JSON of
    {"name", "arguments"})."""
    want = json.loads(expected)
    return parse_tool_call(reply) == (want["name"], want["arguments"])


@dataclass
class GenerationTask:
    """Greedy generation from each prompt, scored by `score(reply, expected)`. Chance is 0."""

    name: str
    prompts: list[list[int]]  # the rendered conversation so far plus the assistant header, tokenized
    answers: list[str]
    max_new_tokens: int
    score: Callable[[str, str], bool] = field(default=exact)
    end_text: str = ""  # the template's end-of-turn text before its stop token (e.g. <|im_end|>): the reply ends there
    chance: float = 0.0

    def __len__(self) -> int:
        return len(self.answers)

    def correct(self, reply: str, expected: str) -> bool:
        if self.end_text:
            reply = reply.split(self.end_text)[0].strip()
        return self.score(reply, expected)


def end_text(tokenizer) -> str:
    """What an assistant turn ends with before the first special token, stripped: "<|im_end|>" for ChatML on a
    tokenizer without such a token, "" when the turn ends with a special token (eos, <|eot_id|>)."""
    marker = template_shape(tokenizer).end_marker
    cuts = [marker.find(token) for token in tokenizer.all_special_tokens if token and token in marker]
    return marker[: min(cuts)].strip() if cuts else marker.strip()


def _prompt_ids(tokenizer, messages: list[dict], tools, add_bos: bool) -> list[int]:
    text = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    return tokenizer(bos_prefix(tokenizer, text, add_bos) + text, add_special_tokens=False).input_ids


def _reply_length(tokenizer, messages: list[dict], tools, reply_index: int) -> int:
    """Tokens the template renders for the reply at `reply_index` (its reasoning and calls included)."""
    whole = render(tokenizer, messages[: reply_index + 1], tools=tools)
    before = render(tokenizer, messages[:reply_index], add_generation_prompt=True, tools=tools)
    return max(1, len(tokenizer(whole, add_special_tokens=False).input_ids)
               - len(tokenizer(before, add_special_tokens=False).input_ids))


def _task(name, tokenizer, items, add_bos, score) -> GenerationTask:
    """items: (messages, tools, index of the reply to generate, expected)."""
    prompts = [_prompt_ids(tokenizer, messages[:index], tools, add_bos) for messages, tools, index, _ in items]
    longest = max(_reply_length(tokenizer, messages, tools, index) for messages, tools, index, _ in items)
    return GenerationTask(name, prompts, [expected for *_, expected in items], longest + GENERATION_SLACK, score,
                          end_text(tokenizer))


def generation_tasks(name: str, tokenizer, limit: int | None, add_bos: bool) -> list[GenerationTask]:
    """The task(s) of a synthetic task's first `limit` held-out rows (fixed order, independent of the seed)."""
    rows = synthetic.load_task(name, "test")[:limit]
    if name == "tool_calc":
        calls, answers = [], []
        for row in rows:
            messages, tools = row["messages"], row.get("tools")
            call = messages[1]["tool_calls"][0]["function"]
            calls.append((messages, tools, 1, json.dumps({"name": call["name"], "arguments": call["arguments"]})))
            answers.append((messages, tools, 3, messages[3]["content"]))
        return [_task("tool_calc_call", tokenizer, calls, add_bos, call_matches),
                _task("tool_calc_answer", tokenizer, answers, add_bos, exact)]
    score = after_reasoning if name == "reasoning" else exact
    items = [(row["messages"], row.get("tools"), 1, row["messages"][1]["content"]) for row in rows]
    return [_task(name, tokenizer, items, add_bos, score)]
