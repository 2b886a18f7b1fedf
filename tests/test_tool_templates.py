"""Reasoning and tool-call conversations through every built-in template for them (open_instruct/tool_templates.py)
and through three test templates of our own in other families' shapes (tests/third_party_shapes.py): the exact
render, and exactly which text is trained, between ⟦ and ⟧.

The expected renders below were written out from each template's layout (the docstrings of tool_templates.py and
third_party_shapes.py) and checked line by line: an assistant turn trains what follows its header (reasoning where
rendered, content, tool calls, end-of-turn marker); tool results, user and system turns and the tools' schemas are
never trained. qwen3, r1_shape and mistral_shape are not prefix-stable (earlier reasoning dropped; tools moved in
front of the last user turn) and still get exact masks.
"""

from __future__ import annotations

import copy
import json

import pytest

from open_instruct.tiny_model import build_tokenizer
from open_instruct.tokenization import IGNORE_INDEX, assistant_char_spans, encode_messages, render, trained_spans
from open_instruct.tool_templates import TOOL_TEMPLATES
from third_party_shapes import SHAPE_TEMPLATES

TEMPLATES = {**TOOL_TEMPLATES, **SHAPE_TEMPLATES}

ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
def call(a, b):
    return {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
CONVERSATIONS = {
    "plain": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], None),
    "reasoning": ([{"role": "user", "content": "hi"},
                   {"role": "assistant", "reasoning_content": "greet", "content": "hello"}], None),
    "multi_turn_reasoning": ([{"role": "user", "content": "hi"},
                              {"role": "assistant", "reasoning_content": "greet", "content": "hello"},
                              {"role": "user", "content": "bye"},
                              {"role": "assistant", "reasoning_content": "part", "content": "ciao"}], None),
    "tool_call": ([{"role": "user", "content": "1+2?"},
                   {"role": "assistant", "content": "", "tool_calls": [call(1, 2)]},
                   {"role": "tool", "content": "3"},
                   {"role": "assistant", "content": "It is 3."}], [ADD]),
    "parallel_calls": ([{"role": "user", "content": "1+2, 3+4?"},
                        {"role": "assistant", "content": "", "tool_calls": [call(1, 2), call(3, 4)]},
                        {"role": "tool", "content": "3"},
                        {"role": "tool", "content": "7"},
                        {"role": "assistant", "content": "3 and 7."}], [ADD]),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}], None),
    "tools_listed": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}], [ADD]),
}


ADD_JSON = json.dumps(ADD, ensure_ascii=False)
ADD_INDENTED = json.dumps(ADD, ensure_ascii=False, indent=4)

EXPECTED = {
    'qwen3': {
        'plain': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            '\n'
            '</think>\n'
            '\n'
            'hello<|im_end|>\n'
            '⟧'
        ),
        'reasoning': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            'greet\n'
            '</think>\n'
            '\n'
            'hello<|im_end|>\n'
            '⟧'
        ),
        'multi_turn_reasoning': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|>\n'
            '⟧<|im_start|>user\n'
            'bye<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            'part\n'
            '</think>\n'
            '\n'
            'ciao<|im_end|>\n'
            '⟧'
        ),
        'tool_call': (
            '<|im_start|>system\n'
            '# Tools\n'
            'To call a tool, answer with <tool_call>\n'
            '{"name": <tool name>, "arguments": <JSON object>}\n'
            '</tool_call>. The tools, one JSON schema per line:\n'
            '<tools>\n'
            + ADD_JSON +
            '\n'
            '</tools><|im_end|>\n'
            '<|im_start|>user\n'
            '1+2?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<tool_call>\n'
            '{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call><|im_end|>\n'
            '⟧<|im_start|>user\n'
            '<tool_response>\n'
            '3\n'
            '</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            '\n'
            '</think>\n'
            '\n'
            'It is 3.<|im_end|>\n'
            '⟧'
        ),
        'parallel_calls': (
            '<|im_start|>system\n'
            '# Tools\n'
            'To call a tool, answer with <tool_call>\n'
            '{"name": <tool name>, "arguments": <JSON object>}\n'
            '</tool_call>. The tools, one JSON schema per line:\n'
            '<tools>\n'
            + ADD_JSON +
            '\n'
            '</tools><|im_end|>\n'
            '<|im_start|>user\n'
            '1+2, 3+4?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<tool_call>\n'
            '{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call>\n'
            '<tool_call>\n'
            '{"name": "add", "arguments": {"a": 3, "b": 4}}\n'
            '</tool_call><|im_end|>\n'
            '⟧<|im_start|>user\n'
            '<tool_response>\n'
            '3\n'
            '</tool_response>\n'
            '<tool_response>\n'
            '7\n'
            '</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            '\n'
            '</think>\n'
            '\n'
            '3 and 7.<|im_end|>\n'
            '⟧'
        ),
        'system': (
            '<|im_start|>system\n'
            'Be brief.<|im_end|>\n'
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            '\n'
            '</think>\n'
            '\n'
            'hello<|im_end|>\n'
            '⟧'
        ),
        'tools_listed': (
            '<|im_start|>system\n'
            'Be brief.\n'
            '\n'
            '# Tools\n'
            'To call a tool, answer with <tool_call>\n'
            '{"name": <tool name>, "arguments": <JSON object>}\n'
            '</tool_call>. The tools, one JSON schema per line:\n'
            '<tools>\n'
            + ADD_JSON +
            '\n'
            '</tools><|im_end|>\n'
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            '\n'
            '</think>\n'
            '\n'
            'hello<|im_end|>\n'
            '⟧'
        ),
    },
    'hermes': {
        'plain': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|>\n'
            '⟧'
        ),
        'reasoning': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            'greet\n'
            '</think>\n'
            'hello<|im_end|>\n'
            '⟧'
        ),
        'multi_turn_reasoning': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            'greet\n'
            '</think>\n'
            'hello<|im_end|>\n'
            '⟧<|im_start|>user\n'
            'bye<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<think>\n'
            'part\n'
            '</think>\n'
            'ciao<|im_end|>\n'
            '⟧'
        ),
        'tool_call': (
            '<|im_start|>system\n'
            'You may call the functions whose signatures are in <tools></tools>:\n'
            '<tools>\n'
            '['
            + ADD_JSON +
            ']\n'
            '</tools>\n'
            'Write each call as <tool_call>\n'
            '{"name": <function name>, "arguments": <arguments object>}\n'
            '</tool_call><|im_end|>\n'
            '<|im_start|>user\n'
            '1+2?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<tool_call>\n'
            '{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call><|im_end|>\n'
            '⟧<|im_start|>tool\n'
            '<tool_response>\n'
            '3\n'
            '</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦It is 3.<|im_end|>\n'
            '⟧'
        ),
        'parallel_calls': (
            '<|im_start|>system\n'
            'You may call the functions whose signatures are in <tools></tools>:\n'
            '<tools>\n'
            '['
            + ADD_JSON +
            ']\n'
            '</tools>\n'
            'Write each call as <tool_call>\n'
            '{"name": <function name>, "arguments": <arguments object>}\n'
            '</tool_call><|im_end|>\n'
            '<|im_start|>user\n'
            '1+2, 3+4?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<tool_call>\n'
            '{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call>\n'
            '<tool_call>\n'
            '{"name": "add", "arguments": {"a": 3, "b": 4}}\n'
            '</tool_call><|im_end|>\n'
            '⟧<|im_start|>tool\n'
            '<tool_response>\n'
            '3\n'
            '</tool_response><|im_end|>\n'
            '<|im_start|>tool\n'
            '<tool_response>\n'
            '7\n'
            '</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦3 and 7.<|im_end|>\n'
            '⟧'
        ),
        'system': (
            '<|im_start|>system\n'
            'Be brief.<|im_end|>\n'
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|>\n'
            '⟧'
        ),
        'tools_listed': (
            '<|im_start|>system\n'
            'Be brief.\n'
            '\n'
            'You may call the functions whose signatures are in <tools></tools>:\n'
            '<tools>\n'
            '['
            + ADD_JSON +
            ']\n'
            '</tools>\n'
            'Write each call as <tool_call>\n'
            '{"name": <function name>, "arguments": <arguments object>}\n'
            '</tool_call><|im_end|>\n'
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|>\n'
            '⟧'
        ),
    },
    'olmo3_instruct': {
        'plain': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'reasoning': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'multi_turn_reasoning': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|><|endoftext|>\n'
            '⟧<|im_start|>user\n'
            'bye<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦ciao<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'tool_call': (
            '<|im_start|>system\n'
            'You are a helpful assistant that can call functions. <functions>['
            + ADD_JSON +
            ']</functions><|im_end|>\n'
            '<|im_start|>user\n'
            '1+2?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<function_calls>{"name": "add", "arguments": {"a": 1, "b": 2}}</function_calls><|im_end|>'
            '<|endoftext|>\n'
            '⟧<|im_start|>environment\n'
            '3<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦It is 3.<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'parallel_calls': (
            '<|im_start|>system\n'
            'You are a helpful assistant that can call functions. <functions>['
            + ADD_JSON +
            ']</functions><|im_end|>\n'
            '<|im_start|>user\n'
            '1+2, 3+4?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<function_calls>{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '{"name": "add", "arguments": {"a": 3, "b": 4}}</function_calls><|im_end|><|endoftext|>\n'
            '⟧<|im_start|>environment\n'
            '3<|im_end|>\n'
            '<|im_start|>environment\n'
            '7<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦3 and 7.<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'system': (
            '<|im_start|>system\n'
            'Be brief.<|im_end|>\n'
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'tools_listed': (
            '<|im_start|>system\n'
            'Be brief. <functions>['
            + ADD_JSON +
            ']</functions><|im_end|>\n'
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|><|endoftext|>\n'
            '⟧'
        ),
    },
    'olmo3_think': {
        'plain': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'reasoning': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '<think>⟦greet</think>hello<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'multi_turn_reasoning': (
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '<think>⟦greet</think>hello<|im_end|><|endoftext|>\n'
            '⟧<|im_start|>user\n'
            'bye<|im_end|>\n'
            '<|im_start|>assistant\n'
            '<think>⟦part</think>ciao<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'tool_call': (
            '<|im_start|>system\n'
            'You are a helpful assistant that can call functions. <functions>['
            + ADD_JSON +
            ']</functions><|im_end|>\n'
            '<|im_start|>user\n'
            '1+2?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<function_calls>{"name": "add", "arguments": {"a": 1, "b": 2}}</function_calls><|im_end|>'
            '<|endoftext|>\n'
            '⟧<|im_start|>environment\n'
            '3<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦It is 3.<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'parallel_calls': (
            '<|im_start|>system\n'
            'You are a helpful assistant that can call functions. <functions>['
            + ADD_JSON +
            ']</functions><|im_end|>\n'
            '<|im_start|>user\n'
            '1+2, 3+4?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦<function_calls>{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '{"name": "add", "arguments": {"a": 3, "b": 4}}</function_calls><|im_end|><|endoftext|>\n'
            '⟧<|im_start|>environment\n'
            '3<|im_end|>\n'
            '<|im_start|>environment\n'
            '7<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦3 and 7.<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'system': (
            '<|im_start|>system\n'
            'Be brief.<|im_end|>\n'
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|><|endoftext|>\n'
            '⟧'
        ),
        'tools_listed': (
            '<|im_start|>system\n'
            'Be brief. <functions>['
            + ADD_JSON +
            ']</functions><|im_end|>\n'
            '<|im_start|>user\n'
            'hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '⟦hello<|im_end|><|endoftext|>\n'
            '⟧'
        ),
    },
    'llama3_tools': {
        'plain': (
            '<|bos|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦hello<|eot_id|>⟧'
        ),
        'reasoning': (
            '<|bos|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦hello<|eot_id|>⟧'
        ),
        'multi_turn_reasoning': (
            '<|bos|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦hello<|eot_id|>⟧<|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'bye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦ciao<|eot_id|>⟧'
        ),
        'tool_call': (
            '<|bos|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'When a function helps, answer with a JSON call {"name": <function name>, "parameters": <ar'
            'guments>} and nothing else. The functions:\n'
            '\n'
            + ADD_INDENTED +
            '\n'
            '\n'
            '1+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦{"name": "add", "parameters": {"a": 1, "b": 2}}<|eot_id|>⟧<|start_header_id|>ipython<|end'
            '_header_id|>\n'
            '\n'
            '3<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦It is 3.<|eot_id|>⟧'
        ),
        'parallel_calls': (
            '<|bos|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'When a function helps, answer with a JSON call {"name": <function name>, "parameters": <ar'
            'guments>} and nothing else. The functions:\n'
            '\n'
            + ADD_INDENTED +
            '\n'
            '\n'
            '1+2, 3+4?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦{"name": "add", "parameters": {"a": 1, "b": 2}}\n'
            '{"name": "add", "parameters": {"a": 3, "b": 4}}<|eot_id|>⟧<|start_header_id|>ipython<|end_'
            'header_id|>\n'
            '\n'
            '3<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n'
            '\n'
            '7<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦3 and 7.<|eot_id|>⟧'
        ),
        'system': (
            '<|bos|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦hello<|eot_id|>⟧'
        ),
        'tools_listed': (
            '<|bos|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'When a function helps, answer with a JSON call {"name": <function name>, "parameters": <ar'
            'guments>} and nothing else. The functions:\n'
            '\n'
            + ADD_INDENTED +
            '\n'
            '\n'
            'hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '⟦hello<|eot_id|>⟧'
        ),
    },
    'r1_shape': {
        'plain': (
            '<|bos|><｜User｜>hi<｜Assistant｜>⟦hello<｜end▁of▁sentence｜>⟧'
        ),
        'reasoning': (
            '<|bos|><｜User｜>hi<｜Assistant｜><think>\n'
            '⟦greet\n'
            '</think>\n'
            '\n'
            'hello<｜end▁of▁sentence｜>⟧'
        ),
        'multi_turn_reasoning': (
            '<|bos|><｜User｜>hi<｜Assistant｜>⟦hello<｜end▁of▁sentence｜>⟧<｜User｜>bye<｜Assistant｜><think>\n'
            '⟦part\n'
            '</think>\n'
            '\n'
            'ciao<｜end▁of▁sentence｜>⟧'
        ),
        'tool_call': (
            '<|bos|>## Tools\n'
            + ADD_JSON +
            '\n'
            '<｜User｜>1+2?<｜Assistant｜>⟦<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n'
            '```json\n'
            '{"a": 1, "b": 2}\n'
            '```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>⟧<｜tool▁output▁begin｜>3<｜tool▁out'
            'put▁end｜><｜Assistant｜>⟦It is 3.<｜end▁of▁sentence｜>⟧'
        ),
        'parallel_calls': (
            '<|bos|>## Tools\n'
            + ADD_JSON +
            '\n'
            '<｜User｜>1+2, 3+4?<｜Assistant｜>⟦<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n'
            '```json\n'
            '{"a": 1, "b": 2}\n'
            '```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n'
            '```json\n'
            '{"a": 3, "b": 4}\n'
            '```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>⟧<｜tool▁output▁begin｜>3<｜tool▁out'
            'put▁end｜><｜tool▁output▁begin｜>7<｜tool▁output▁end｜><｜Assistant｜>⟦3 and 7.<｜end▁of▁sentence｜>⟧'
        ),
        'system': (
            '<|bos|>Be brief.<｜User｜>hi<｜Assistant｜>⟦hello<｜end▁of▁sentence｜>⟧'
        ),
        'tools_listed': (
            '<|bos|>Be brief.## Tools\n'
            + ADD_JSON +
            '\n'
            '<｜User｜>hi<｜Assistant｜>⟦hello<｜end▁of▁sentence｜>⟧'
        ),
    },
    'mistral_shape': {
        'plain': (
            '<|bos|>[INST]hi[/INST]⟦hello<|endoftext|>⟧'
        ),
        'reasoning': (
            '<|bos|>[INST]hi[/INST]⟦hello<|endoftext|>⟧'
        ),
        'multi_turn_reasoning': (
            '<|bos|>[INST]hi[/INST]⟦hello<|endoftext|>⟧[INST]bye[/INST]⟦ciao<|endoftext|>⟧'
        ),
        'tool_call': (
            '<|bos|>[AVAILABLE_TOOLS]['
            + ADD_JSON +
            '][/AVAILABLE_TOOLS][INST]1+2?[/INST]⟦[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b'
            '": 2}}]<|endoftext|>⟧[TOOL_RESULTS]{"content": "3"}[/TOOL_RESULTS]⟦It is 3.<|endoftext|>⟧'
        ),
        'parallel_calls': (
            '<|bos|>[AVAILABLE_TOOLS]['
            + ADD_JSON +
            '][/AVAILABLE_TOOLS][INST]1+2, 3+4?[/INST]⟦[TOOL_CALLS][{"name": "add", "arguments": {"a": '
            '1, "b": 2}}, {"name": "add", "arguments": {"a": 3, "b": 4}}]<|endoftext|>⟧[TOOL_RESULTS]{"'
            'content": "3"}[/TOOL_RESULTS][TOOL_RESULTS]{"content": "7"}[/TOOL_RESULTS]⟦3 and 7.<|endoftext|>⟧'
        ),
        'system': (
            '<|bos|>[INST]Be brief.\n'
            '\n'
            'hi[/INST]⟦hello<|endoftext|>⟧'
        ),
        'tools_listed': (
            '<|bos|>[AVAILABLE_TOOLS]['
            + ADD_JSON +
            '][/AVAILABLE_TOOLS][INST]Be brief.\n'
            '\n'
            'hi[/INST]⟦hello<|endoftext|>⟧'
        ),
    },
    'gemma_shape': {
        'plain': (
            '<|bos|><start_of_turn>user\n'
            'hi<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦hello<end_of_turn>\n'
            '⟧'
        ),
        'reasoning': (
            '<|bos|><start_of_turn>user\n'
            'hi<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦hello<end_of_turn>\n'
            '⟧'
        ),
        'multi_turn_reasoning': (
            '<|bos|><start_of_turn>user\n'
            'hi<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦hello<end_of_turn>\n'
            '⟧<start_of_turn>user\n'
            'bye<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦ciao<end_of_turn>\n'
            '⟧'
        ),
        'tool_call': (
            '<|bos|><start_of_turn>user\n'
            'tool: '
            + ADD_JSON +
            '\n'
            '1+2?<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦```tool_code\n'
            'add(a=1, b=2)\n'
            '```<end_of_turn>\n'
            '⟧<start_of_turn>user\n'
            '```tool_output\n'
            '3\n'
            '```<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦It is 3.<end_of_turn>\n'
            '⟧'
        ),
        'parallel_calls': (
            '<|bos|><start_of_turn>user\n'
            'tool: '
            + ADD_JSON +
            '\n'
            '1+2, 3+4?<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦```tool_code\n'
            'add(a=1, b=2)\n'
            '``````tool_code\n'
            'add(a=3, b=4)\n'
            '```<end_of_turn>\n'
            '⟧<start_of_turn>user\n'
            '```tool_output\n'
            '3\n'
            '```<end_of_turn>\n'
            '<start_of_turn>user\n'
            '```tool_output\n'
            '7\n'
            '```<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦3 and 7.<end_of_turn>\n'
            '⟧'
        ),
        'system': (
            '<|bos|><start_of_turn>user\n'
            'Be brief.\n'
            '\n'
            'hi<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦hello<end_of_turn>\n'
            '⟧'
        ),
        'tools_listed': (
            '<|bos|><start_of_turn>user\n'
            'Be brief.\n'
            '\n'
            'tool: '
            + ADD_JSON +
            '\n'
            'hi<end_of_turn>\n'
            '<start_of_turn>model\n'
            '⟦hello<end_of_turn>\n'
            '⟧'
        ),
    },
}


@pytest.fixture(scope="module")
def templated():
    base, cache = build_tokenizer(), {}

    def get(name):
        if name not in cache:
            cache[name] = copy.deepcopy(base)
            cache[name].chat_template = TEMPLATES[name]
        return cache[name]

    return get


def marked(text: str, spans) -> str:
    out, at = "", 0
    for start, end in spans:
        out += text[at:start] + "⟦" + text[start:end] + "⟧"
        at = end
    return out + text[at:]


def test_every_template_and_conversation_has_an_expectation():
    assert set(EXPECTED) == set(TEMPLATES)
    assert all(set(expected) == set(CONVERSATIONS) for expected in EXPECTED.values())


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_render_and_trained_text(templated, name, conversation):
    messages, tools = CONVERSATIONS[conversation]
    text, spans = assistant_char_spans(templated(name), messages, tools=tools)
    assert marked(text, spans) == EXPECTED[name][conversation]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_token_labels_train_exactly_the_marked_text(templated, name, conversation):
    tokenizer = templated(name)
    messages, tools = CONVERSATIONS[conversation]
    example = encode_messages(tokenizer, messages, tools=tools)
    expected = EXPECTED[name][conversation]
    assert tokenizer.decode(example.input_ids) == expected.replace("⟦", "").replace("⟧", "")
    trained = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    marked_text = "".join(part.split("⟧")[0] for part in expected.split("⟦")[1:])
    assert tokenizer.decode(trained) == marked_text


@pytest.mark.parametrize("name, conversation", [("qwen3", "multi_turn_reasoning"), ("qwen3", "tool_call"),
                                                ("r1_shape", "multi_turn_reasoning")])
def test_these_renders_are_not_prefix_stable(templated, name, conversation):
    """What the old prefix method relied on fails here, so the exact masks above come from the full render."""
    tokenizer = templated(name)
    messages, tools = CONVERSATIONS[conversation]
    first_turn = render(tokenizer, messages[:2], tools=tools)
    assert not render(tokenizer, messages, tools=tools).startswith(first_turn)


@pytest.mark.parametrize("name", ["hermes", "olmo3_think"])
def test_reasoning_of_earlier_turns_is_context_with_last_turn(templated, name):
    tokenizer = templated(name)
    messages, _ = CONVERSATIONS["multi_turn_reasoning"]
    text, every = trained_spans(tokenizer, messages, "assistant", False)
    _, last_only = trained_spans(tokenizer, messages, "assistant", False, reasoning="last_turn")
    assert "greet" in "".join(text[a:b] for a, b in every)
    trained = [text[a:b] for a, b in last_only]
    assert "greet" not in "".join(trained) and "part" in trained[-1]
    assert trained[0] == ("hello<|im_end|>\n" if name == "hermes" else "hello<|im_end|><|endoftext|>\n")
    assert trained[-1] == text[every[-1][0]:every[-1][1]]  # the last turn keeps its reasoning


def test_qwen3_renders_only_the_last_reasoning_so_both_choices_agree(templated):
    messages, _ = CONVERSATIONS["multi_turn_reasoning"]
    every = trained_spans(templated("qwen3"), messages, "assistant", False)
    assert trained_spans(templated("qwen3"), messages, "assistant", False, reasoning="last_turn") == every


def test_train_on_last_assistant_with_tool_calls(templated):
    messages, tools = CONVERSATIONS["tool_call"]
    text, spans = trained_spans(templated("hermes"), messages, "last_assistant", False, tools)
    assert [text[a:b] for a, b in spans] == ["It is 3.<|im_end|>\n"]


def test_truncation_keeps_whole_tool_turns(templated):
    tokenizer = templated("hermes")
    messages, tools = CONVERSATIONS["tool_call"]
    full = encode_messages(tokenizer, messages, tools=tools)
    short = encode_messages(tokenizer, messages, max_seq_length=len(full.input_ids) - 1, tools=tools)
    assert short.status == "whole_turns"
    assert tokenizer.decode(short.input_ids).endswith("</tool_call><|im_end|>\n")


def test_mistral_shape_moves_tools_to_the_last_user_turn_and_masks_stay_exact(templated):
    tokenizer = templated("mistral_shape")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3"}]
    assert not render(tokenizer, messages, tools=[ADD]).startswith(render(tokenizer, messages[:2], tools=[ADD]))
    text, spans = assistant_char_spans(tokenizer, messages, tools=[ADD])
    assert marked(text, spans) == (
        "<|bos|>[INST]hi[/INST]⟦hello<|endoftext|>⟧[AVAILABLE_TOOLS][" + ADD_JSON + "][/AVAILABLE_TOOLS]"
        "[INST]1+2?[/INST]⟦3<|endoftext|>⟧"
    )


def test_changed_region_literals():
    from open_instruct.turn_spans import changed_region

    # An inserted block that starts with the same character as what follows it: the turn's start decides.
    text, other = "A\n<call>x</call><end>", "A\n<end>"
    assert changed_region(text, other, prefer=2) == (2, 16)
    assert text[2:16] == "<call>x</call>"
    assert changed_region("same", "same") is None
    assert changed_region("a-X-b", "a-Y-b") == (2, 3)  # a modification, not an insertion


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", ["reasoning", "multi_turn_reasoning", "tool_call", "parallel_calls"])
def test_highlights_cover_rendered_reasoning_and_calls(templated, name, conversation):
    from open_instruct.tokenization import HIGHLIGHT_KINDS, spans_and_highlights

    messages, tools = CONVERSATIONS[conversation]
    text, spans, highlights = spans_and_highlights(templated(name), messages, tools=tools)
    shown = {kind: "".join(text[a:b] for a, b, code in highlights if code == HIGHLIGHT_KINDS[kind])
             for kind in HIGHLIGHT_KINDS}
    trained = "".join(text[a:b] for a, b in spans)
    for kind, part in shown.items():
        assert part in trained or all(text[a:b] in trained for a, b, _ in highlights)
    rendered_reasoning = [m["reasoning_content"] for m in messages
                          if m.get("reasoning_content") and m["reasoning_content"] in trained]
    assert all(r in shown["reasoning"] for r in rendered_reasoning)
    if tools:
        assert shown["tool_call"].count("add") == sum(len(m.get("tool_calls", [])) for m in messages)
        assert "It is 3." not in shown["tool_call"] and "3 and 7." not in shown["tool_call"]
