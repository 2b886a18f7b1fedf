"""Chat templates by name, as Jinja strings that `tokenizer.apply_chat_template` renders.

Every template here satisfies the property the loss mask relies on: rendering the first k messages (with the
generation prompt when the next message is the assistant's) gives a prefix of rendering all of them. The
assistant's trained span is therefore [render(messages[:i], generation prompt), render(messages[:i+1])): its
content and the end-of-turn marker, never the role header.
"""

from __future__ import annotations

# Tulu (allenai/open-instruct): <|role|>\ncontent\n; an assistant turn ends with the eos token, and a newline
# follows it only when another message comes (so the newline is never trained).
TULU = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# Plain-text roles; useful for base models whose tokenizer has no special role tokens.
SIMPLE_CHAT = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'System: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)

# ChatML (Qwen and others): <|im_start|>role\ncontent<|im_end|>\n.
CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {"tulu": TULU, "simple_chat": SIMPLE_CHAT, "chatml": CHATML}


def get_chat_template(name: str) -> str:
    if name not in CHAT_TEMPLATES:
        raise ValueError(
            f"Unknown --chat_template_name {name!r}; choose one of {', '.join(sorted(CHAT_TEMPLATES))}, "
            "or leave it unset to use the tokenizer's own template."
        )
    return CHAT_TEMPLATES[name]
