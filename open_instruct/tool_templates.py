"""Chat templates for reasoning and tool-call data (the conversation of open_instruct/chat_schema.py), written for
this project in the shapes that model families use. Registered in chat_templates.CHAT_TEMPLATES.

Layouts ("R" = reasoning_content, "C" = content, "call" = {"name": ..., "arguments": {...}} as JSON):
    qwen3           ChatML. Tools: a system turn with one JSON schema per line in <tools>. An assistant turn after
                    the last user message renders <think>\\nR\\n</think>\\n\\n before C (an empty block when the
                    turn is the conversation's last and has no R); earlier turns drop their reasoning, as Qwen3's own
                    template does, so the template is not prefix-stable. Calls: <tool_call>\\ncall\\n</tool_call>,
                    one per line after C. Tool results: consecutive ones in one user turn, each in <tool_response>.
    hermes          ChatML. Tools: a JSON list in <tools> in the system turn. Reasoning in every turn that has it
                    (<think>\\nR\\n</think>\\n). Calls as qwen3. Tool results: a `tool` turn each, in <tool_response>.
    olmo3_instruct  ChatML; an assistant turn ends <|im_end|> + eos + \\n (like `olmo`). Tools: a JSON list in
                    <functions> after the system text (a default system line when the row has none). Calls: one JSON
                    object per line in <function_calls>. Tool results: `environment` turns. Reasoning not rendered.
    olmo3_think     olmo3_instruct with reasoning: <think>R</think> before C in every turn that has it; the generation
                    prompt ends with <think>, so that token is prompt, not trained.
    llama3_tools    Llama-3.1 JSON tool calling: bos, headers as `llama3`. Tools: an instruction and one indented JSON
                    schema each at the start of the first user turn. A call turn: one {"name", "parameters"} JSON
                    object per line. Tool results: `ipython` turns. Reasoning not rendered.
"""

from __future__ import annotations

# ChatML pieces shared by the templates below.
_CHATML_USER = "{%- if m['role'] == 'user' -%}{{ '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' }}"
_CALL_JSON = "({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
# Each call on its own line after the content (no newline before the first call of a turn without content).
_TAGGED_CALLS = (
    "{%- for call in m.get('tool_calls') or [] -%}"
    "{%- if m['content'] or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n' + " + _CALL_JSON + " + '\\n</tool_call>' }}"
    "{%- endfor -%}"
)

QWEN3 = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools -%}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
    "{{ '# Tools\\nTo call a tool, answer with <tool_call>\\n{\"name\": <tool name>, \"arguments\": <JSON object>}"
    "\\n</tool_call>. The tools, one JSON schema per line:\\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\\n' + (tool | tojson) }}{%- endfor -%}"
    "{{ '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' -%}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    + _CHATML_USER +
    "{%- elif m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query and (loop.last or m.get('reasoning_content')) -%}"
    "{{ '<think>\\n' + (m.get('reasoning_content') or '') + '\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{{ m['content'] }}"
    + _TAGGED_CALLS +
    "{{ '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

HERMES = (
    "{%- if tools or messages[0]['role'] == 'system' -%}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
    "{%- if tools -%}{{ '\\n\\n' }}{%- endif -%}{%- endif -%}"
    "{%- if tools -%}{{ 'You may call the functions whose signatures are in <tools></tools>:\\n<tools>\\n' + "
    "(tools | tojson) + '\\n</tools>\\nWrite each call as <tool_call>\\n{\"name\": <function name>, \"arguments\": "
    "<arguments object>}\\n</tool_call>' }}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    + _CHATML_USER +
    "{%- elif m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if m.get('reasoning_content') -%}{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n' }}{%- endif -%}"
    "{{ m['content'] }}"
    + _TAGGED_CALLS +
    "{{ '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{ '<|im_start|>tool\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _olmo3(think: bool) -> str:
    reasoning = ("{%- if m.get('reasoning_content') -%}{{ '<think>' + m['reasoning_content'] + '</think>' }}"
                 "{%- endif -%}") if think else ""
    return (
        "{%- if tools or messages[0]['role'] == 'system' -%}{{ '<|im_start|>system\\n' }}"
        "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
        "{%- else -%}{{ 'You are a helpful assistant that can call functions.' }}{%- endif -%}"
        "{%- if tools -%}{{ ' <functions>' + (tools | tojson) + '</functions>' }}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- for m in messages -%}"
        + _CHATML_USER +
        "{%- elif m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
        + reasoning +
        "{{ m['content'] }}"
        "{%- if m.get('tool_calls') -%}"
        "{%- if m['content'] -%}{{ '\\n' }}{%- endif -%}{{ '<function_calls>' }}"
        "{%- for call in m['tool_calls'] -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
        "{{ " + _CALL_JSON + " }}{%- endfor -%}"
        "{{ '</function_calls>' }}"
        "{%- endif -%}"
        "{{ '<|im_end|>' + eos_token + '\\n' }}"
        "{%- elif m['role'] == 'tool' -%}{{ '<|im_start|>environment\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n" + ("<think>" if think else "") + "' }}"
        "{%- endif -%}"
    )


OLMO3_INSTRUCT = _olmo3(think=False)
OLMO3_THINK = _olmo3(think=True)

LLAMA3_TOOLS = (
    "{{ bos_token }}"
    "{%- set ns = namespace(tools_shown=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{%- elif m['role'] == 'user' -%}{{ '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{%- if tools and not ns.tools_shown -%}"
    "{{ 'When a function helps, answer with a JSON call {\"name\": <function name>, \"parameters\": <arguments>} "
    "and nothing else. The functions:\\n\\n' }}"
    "{%- for tool in tools -%}{{ (tool | tojson(indent=4)) + '\\n\\n' }}{%- endfor -%}"
    "{%- set ns.tools_shown = true -%}"
    "{%- endif -%}"
    "{{ m['content'] + '<|eot_id|>' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' + m['content'] }}"
    "{%- for call in m.get('tool_calls') or [] -%}"
    "{%- if m['content'] or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ {'name': call['function']['name'], 'parameters': call['function']['arguments']} | tojson }}"
    "{%- endfor -%}"
    "{{ '<|eot_id|>' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

TOOL_TEMPLATES: dict[str, str] = {
    "qwen3": QWEN3,
    "hermes": HERMES,
    "olmo3_instruct": OLMO3_INSTRUCT,
    "olmo3_think": OLMO3_THINK,
    "llama3_tools": LLAMA3_TOOLS,
}
