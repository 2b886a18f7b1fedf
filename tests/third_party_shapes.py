"""Test chat templates of our own that reproduce the shapes of templates users bring (written for these tests from
the shapes' descriptions; no third-party template text):

    R1_SHAPE       DeepSeek-R1: bos + system text, <｜User｜>/<｜Assistant｜> markers, reasoning rendered only for the
                   conversation's last message (dropped from history), generation prompt ending in <think>\\n, tool
                   calls in <｜tool▁calls▁begin｜> blocks, tool results in <｜tool▁output▁begin｜> blocks.
    MISTRAL_SHAPE  Mistral: [INST]...[/INST]; the tools list and the system text go in front of the *last* user
                   message (so they move as the conversation grows); calls as [TOOL_CALLS] + a JSON list; results in
                   [TOOL_RESULTS]; an assistant turn ends with eos. Reasoning not rendered.
    GEMMA_SHAPE    Gemma: no system role (its text opens the first user turn, with the tool schemas), `model` turns,
                   calls as a python-like tool_code block, tool results as user turns. Reasoning not rendered.
"""

R1_SHAPE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- endif -%}"
    "{%- if tools -%}{{ '## Tools\\n' }}{%- for tool in tools -%}{{ (tool | tojson) + '\\n' }}{%- endfor -%}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '<｜Assistant｜>' }}"
    "{%- if loop.last and m.get('reasoning_content') -%}{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{{ m['content'] }}"
    "{%- if m.get('tool_calls') -%}{{ '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in m['tool_calls'] -%}"
    "{{ '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + call['function']['name'] + '\\n```json\\n' + "
    "(call['function']['arguments'] | tojson) + '\\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor -%}{{ '<｜tool▁calls▁end｜>' }}{%- endif -%}"
    "{{ '<｜end▁of▁sentence｜>' }}"
    "{%- elif m['role'] == 'tool' -%}{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\\n' }}{%- endif -%}"
)

MISTRAL_SHAPE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.index0 == ns.last_user and tools -%}{{ '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}"
    "{%- endif -%}"
    "{{ '[INST]' }}"
    "{%- if loop.index0 == ns.last_user and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}"
    "{%- endif -%}"
    "{{ m['content'] + '[/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if m.get('tool_calls') -%}{{ m['content'] + '[TOOL_CALLS]' }}"
    "{{ m['tool_calls'] | map(attribute='function') | list | tojson }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{{ eos_token }}"
    "{%- elif m['role'] == 'tool' -%}{{ '[TOOL_RESULTS]' + ({'content': m['content']} | tojson) + '[/TOOL_RESULTS]' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

GEMMA_SHAPE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ '<start_of_turn>user\\n' }}"
    "{%- if loop.index0 == 1 and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
    "{%- if loop.first or (loop.index0 == 1 and messages[0]['role'] == 'system') -%}"
    "{%- for tool in tools or [] -%}{{ 'tool: ' + (tool | tojson) + '\\n' }}{%- endfor -%}{%- endif -%}"
    "{{ m['content'] + '<end_of_turn>\\n' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '<start_of_turn>model\\n' + m['content'] }}"
    "{%- for call in m.get('tool_calls') or [] -%}"
    "{{ '```tool_code\\n' + call['function']['name'] + '(' }}"
    "{%- for key, value in call['function']['arguments'].items() -%}"
    "{%- if not loop.first -%}{{ ', ' }}{%- endif -%}{{ key + '=' + (value | tojson) }}{%- endfor -%}"
    "{{ ')\\n```' }}"
    "{%- endfor -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{ '<start_of_turn>user\\n```tool_output\\n' + m['content'] + '\\n```<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

SHAPE_TEMPLATES = {"r1_shape": R1_SHAPE, "mistral_shape": MISTRAL_SHAPE, "gemma_shape": GEMMA_SHAPE}
