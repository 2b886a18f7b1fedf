"""Chat templates by name, as Jinja strings that `tokenizer.apply_chat_template` renders, and the tokens that end an
assistant turn under a template (where generation stops). The templates for reasoning and tool calls (qwen3,
hermes, olmo3_instruct, olmo3_think, llama3_tools) live in open_instruct/tool_templates.py.

An assistant turn's trained text is what follows its role header (the generation prompt) through its end-of-turn
marker; open_instruct/turn_spans.py finds it in the full render without assuming that the template renders
prefixes of a conversation as prefixes (qwen3 does not).
"""

from __future__ import annotations

from open_instruct.tool_templates import TOOL_TEMPLATES

# Layouts (`eos` is the tokenizer's eos_token, `bos` its bos_token; "header" = what the generation prompt renders):
#     tulu         <|role|>\ncontent\n; assistant: <|assistant|>\ncontent + eos, then \n only if a message follows
#     simple_chat  Role: content\n\n; assistant: Assistant: content + eos, then \n\n only if a message follows
#     chatml       <|im_start|>role\ncontent<|im_end|>\n for every message; header <|im_start|>assistant\n
#     qwen         alias of chatml (the same string)
#     olmo         chatml, but an assistant turn ends <|im_end|> + eos + \n; header <|im_start|>assistant\n
#     llama3       bos once, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per message;
#                  header <|start_header_id|>assistant<|end_header_id|>\n\n
#     zephyr       <|role|>\ncontent + eos + \n for every message; header <|assistant|>\n
#
# Where a newline follows an assistant turn's end marker even when the turn is the last message (chatml, qwen, olmo,
# zephyr), that newline lies inside the assistant span and is trained: the model learns the full end-of-turn sequence.
# With tulu and simple_chat the separator after eos is only rendered when another message follows, so it is never
# trained. Every template renders the generation prompt after the loop, so an empty conversation with
# add_generation_prompt renders just the header (after the bos for llama3).

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

# Qwen's chat format is ChatML.
QWEN = CHATML

# OLMo-3 style ChatML: the same layout as chatml, except that an assistant turn ends with the eos token right after
# <|im_end|> (before the newline), so a model trained with it learns to stop by emitting eos:
#     <|im_start|>assistant\ncontent<|im_end|><eos>\n
OLMO = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Llama-3 instruct: bos_token once at the very start (always rendered, the model expects it), then
# <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per message. An assistant turn ends with <|eot_id|>.
LLAMA3 = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# Zephyr: <|role|>\ncontent + eos + \n for every message (system, user and assistant alike).
ZEPHYR = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# Tulu with Hugging Face `{% generation %}` markers around the trained text: renders exactly like TULU, and lets
# `apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's assistant_only_loss) find the same tokens our
# masks train. Not needed by this project's masks; used to compare with TRL.
TULU_GENERATION = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>\\n' }}"
    "{%- generation -%}{{ message['content'] + eos_token }}{%- endgeneration -%}"
    "{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "tulu": TULU,
    "simple_chat": SIMPLE_CHAT,
    "chatml": CHATML,
    "qwen": QWEN,
    "olmo": OLMO,
    "llama3": LLAMA3,
    "zephyr": ZEPHYR,
    **TOOL_TEMPLATES,
}


def unknown_template_error(name: str) -> str | None:
    """The message for a --chat_template_name that names no template here; None for a known one."""
    if name in CHAT_TEMPLATES:
        return None
    return (f"--chat_template_name {name!r} is not a known template; choose one of "
            f"{', '.join(sorted(CHAT_TEMPLATES))}, or leave it unset to use the tokenizer's own template.")


def get_chat_template(name: str) -> str:
    error = unknown_template_error(name)
    if error:
        raise ValueError(error)
    return CHAT_TEMPLATES[name]


# ----------------------------------------------------------------------------------------------------------------
# Where generation stops: the token that ends an assistant turn under the template
# ----------------------------------------------------------------------------------------------------------------
def end_of_turn_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn under the chat template (eos, and e.g. ChatML's <|im_end|>), so that
    generation stops where training taught the model to stop."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker = "\x1fend-of-answer\x1f"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # no template: eos is all there is
        return ids
    after = text[text.index(marker) + len(marker):] if marker in text else ""
    special = sorted(tokenizer.all_special_tokens + [t.content for t in tokenizer.added_tokens_decoder.values()
                                                     if t.special], key=len, reverse=True)
    first = next((token for token in special if after.startswith(token)), None)
    if first is not None:
        token_id = tokenizer.convert_tokens_to_ids(first)
        if token_id not in ids:
            ids.insert(0, token_id)
    return ids


def set_generation_stops(generation, tokenizer) -> None:
    """Generation stops at the chat template's end of turn first, keeping the base model's own stops."""
    existing = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    stop = list(dict.fromkeys(end_of_turn_token_ids(tokenizer) + [i for i in existing if i is not None]))
    if stop:
        generation.eos_token_id = stop if len(stop) > 1 else stop[0]
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
