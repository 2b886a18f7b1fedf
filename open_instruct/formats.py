"""Row -> canonical messages: pure converters for the common SFT dataset layouts.

Canonical form: a conversation ``(messages, tools)`` as open_instruct/chat_schema.py defines it: system, user,
assistant and tool messages, an assistant's reasoning and tool calls, and the row's tool schemas.

    fmt = detect_format(first_row.keys())                 # or the source's `format` in the mixer file
    messages, tools = to_chat(row, fmt, columns={"output": "answer"})

Formats and their columns (``[x]`` = optional):

    messages           messages, [tools]                 messages may carry reasoning_content, tool_calls, tool role
    xlam               query, tools, answers             xLAM function calling: answers are the calls (JSON)
    sharegpt           conversations, [tools]            also function_call / observation turns (LLaMA-Factory, glaive)
    hermes             conversations, [tools]            sharegpt turns whose text holds <tool_call>/<tool_response>
                                                         tags and <tools> in the system turn (Hermes function calling)
    openorca           [system_prompt], question, response
    dolly              instruction, [context], response
    alpaca             instruction, [input], output
    prompt_completion  prompt, completion

Errors about one row raise `RowError` (a ValueError) that says what is wrong and, for a message, its index, but not
where the row is: the caller adds the source, file and line. Mistakes in the arguments themselves (an unknown format,
a `columns` key that is no field of the format) raise a plain ValueError, since no row is at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

from open_instruct import chat_schema
from open_instruct.chat_schema import RowError, normalize_tool_call, normalize_tools, parse_json_field

FORMATS = ("messages", "xlam", "alpaca", "dolly", "openorca", "sharegpt", "hermes", "prompt_completion")

# The order in which detect_format tries the formats: the most specific column sets first, so that a dataset that
# carries several (say `messages` next to `prompt`/`completion`) is read by its chat column.
# `hermes` has sharegpt's columns, so it is never detected: name it as the source's format.
DETECTION_ORDER = ("messages", "xlam", "sharegpt", "openorca", "dolly", "alpaca", "prompt_completion")

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
    "openorca": ("question", "response"),
    "sharegpt": ("conversations",),
    "hermes": ("conversations",),
    "xlam": ("query", "tools", "answers"),
    "prompt_completion": ("prompt", "completion"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("tools",),
    "alpaca": ("input",),
    "dolly": ("context",),
    "openorca": ("system_prompt",),
    "sharegpt": ("tools",),
    "hermes": ("tools",),
    "xlam": (),
    "prompt_completion": (),
}
ALL_FIELDS = tuple(sorted({c for f in FORMATS for c in REQUIRED_COLUMNS[f] + OPTIONAL_COLUMNS[f]}))

# ShareGPT `from` values (compared after strip + lower-case) -> canonical role.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


# --------------------------------------------------------------------------------------------------------------------
# Detection and column mapping


def _describe_formats() -> str:
    parts = []
    for fmt in DETECTION_ORDER:
        cols = list(REQUIRED_COLUMNS[fmt]) + [f"[{c}]" for c in OPTIONAL_COLUMNS[fmt]]
        parts.append(f"{fmt}: {', '.join(cols)}")
    return "; ".join(parts)


def detect_format(columns: Iterable[str]) -> str:
    """The first format, in DETECTION_ORDER (messages, sharegpt, openorca, dolly, alpaca, prompt_completion), whose
    required columns are all present; extra columns are ignored.

    No match -> ValueError listing the columns found and, for each format, the columns it needs (optional ones in
    brackets), and saying that a per-source `format`/`columns` in the mixer file can override the detection.
    """
    present = set(columns)
    for fmt in DETECTION_ORDER:
        if all(c in present for c in REQUIRED_COLUMNS[fmt]):
            return fmt
    found = ", ".join(sorted(map(str, present))) or "(none)"
    raise ValueError(
        f"Cannot detect the dataset format from its columns: {found}. Formats and the columns they need "
        f"([optional]): {_describe_formats()}. Set `format` for this source in the mixer file to choose one, and "
        "`columns` to map canonical fields to this dataset's column names (e.g. {\"output\": \"answer\"})."
    )


def rename_columns(row: dict, columns: dict[str, str] | None) -> dict:
    """A copy of `row` in which each canonical field of `columns` (canonical field -> the source's column name, e.g.
    ``{"messages": "conversation"}`` or ``{"instruction": "prompt", "output": "answer"}``) holds the value of its
    source column. All renames read the original row, so swapping two names works; source columns are kept.

    A mapped source column that is missing from the row -> RowError naming it. A key that is no canonical field of
    any format -> ValueError (a mistake in the mapping, not in the row). The input row is not modified.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object (dict), got {type(row).__name__}")
    if not columns:
        return dict(row)
    unknown = [field for field in columns if field not in ALL_FIELDS]
    if unknown:
        raise ValueError(
            f"`columns` maps unknown field(s) {', '.join(map(repr, unknown))}; the keys are canonical fields "
            f"({', '.join(ALL_FIELDS)}) and the values are this dataset's column names."
        )
    renamed = dict(row)
    for field, source in columns.items():
        if source not in row:
            raise RowError(
                f"missing column {source!r} (mapped to {field!r} by `columns`); "
                f"columns: {', '.join(sorted(map(str, row))) or '(none)'}"
            )
        renamed[field] = row[source]
    return renamed


# --------------------------------------------------------------------------------------------------------------------
# Field helpers


def _columns_of(row: dict) -> str:
    return ", ".join(sorted(map(str, row))) or "(none)"


def _required_text(row: dict, column: str) -> str:
    if column not in row:
        raise RowError(f"missing column {column!r} (columns: {_columns_of(row)})")
    value = row[column]
    if not isinstance(value, str):
        raise RowError(f"column {column!r} must be a string, got {type(value).__name__} ({value!r:.60})")
    return value


def _optional_text(row: dict, column: str) -> str:
    """The column's text, or "" when it is missing or None; another non-string is an error."""
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"column {column!r} must be a string when given, got {type(value).__name__} ({value!r:.60})")
    return value


def _required_list(row: dict, column: str, what: str) -> list:
    if column not in row:
        raise RowError(f"missing column {column!r} (columns: {_columns_of(row)})")
    value = row[column]
    if not isinstance(value, list) or not value:
        raise RowError(f"column {column!r} must be a non-empty list of {what}, got {_short(value)}")
    return value


def _short(value) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)}"
    return f"{type(value).__name__} ({value!r:.60})"


def _join(first: str, second: str) -> str:
    """first, or first + blank line + second when second has any non-whitespace text."""
    return f"{first}\n\n{second}" if second.strip() else first


def _keep_role_content(message):
    """A {role, content} dict with other keys dropped; a non-dict is passed on for validation to report."""
    if not isinstance(message, dict):
        return message
    return {key: message[key] for key in ("role", "content") if key in message}


CHAT_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")


def _keep_chat_keys(message):
    """The message's role, content, reasoning and tool keys (others, such as weight, dropped)."""
    if not isinstance(message, dict):
        return message
    return {key: message[key] for key in CHAT_KEYS
            if key in message and (message[key] is not None or key in ("role", "content"))}


# --------------------------------------------------------------------------------------------------------------------
# Converters. Each maps a row (already renamed to canonical column names) to a list of messages; `to_messages` then
# validates the result, so a converter only checks what it needs to read the row.


def convert_messages(row: dict) -> tuple[list[dict], list[dict] | None]:
    """messages (+ optional tools): the `messages` column is already in the canonical form (chat_schema.py): role,
    content, reasoning_content, tool_calls, tool_call_id and name are kept, other keys (weight, ...) dropped. `tools`
    is a list of function schemas or its JSON text."""
    messages = [_keep_chat_keys(m) for m in _required_list(row, "messages", "{role, content} objects")]
    return messages, normalize_tools(row.get("tools"))


def _instruction_pair(row: dict, extra: str, answer: str) -> list[dict]:
    """user = instruction, plus a blank line and `extra` when that is a non-empty string; assistant = `answer`."""
    instruction = _required_text(row, "instruction")
    reply = _required_text(row, answer)
    return [
        {"role": "user", "content": _join(instruction, _optional_text(row, extra))},
        {"role": "assistant", "content": reply},
    ]


def convert_alpaca(row: dict) -> list[dict]:
    """alpaca: `instruction`, optional `input`, `output`.

    user = instruction, or instruction + "\\n\\n" + input when input is a non-empty string (an input that is
    missing, None, "" or only whitespace is left out); assistant = output.
    """
    return _instruction_pair(row, "input", "output")


def convert_dolly(row: dict) -> list[dict]:
    """dolly: `instruction`, optional `context`, `response`.

    user = instruction, or instruction + "\\n\\n" + context when context is a non-empty string (missing, None, ""
    or only whitespace is left out); assistant = response.
    """
    return _instruction_pair(row, "context", "response")


def convert_openorca(row: dict) -> list[dict]:
    """openorca: optional `system_prompt`, `question`, `response`.

    [system = system_prompt], user = question, assistant = response. The system message is omitted when
    system_prompt is missing, None, "" or only whitespace; otherwise its text is kept as is.
    """
    system_prompt = _optional_text(row, "system_prompt")
    question = _required_text(row, "question")
    response = _required_text(row, "response")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": response}]


SHAREGPT_TOOL_ROLES = ("function_call", "observation", "tool")


def _sharegpt_turns(row: dict) -> list[tuple[str, object]]:
    """(from, value) of each turn; `from` stripped and lower-cased and checked."""
    accepted = ", ".join(list(SHAREGPT_ROLES) + list(SHAREGPT_TOOL_ROLES))
    turns = []
    for index, turn in enumerate(_required_list(row, "conversations", '{"from", "value"} objects')):
        if not isinstance(turn, dict):
            raise RowError(f"message {index}: a conversation turn must be an object, got {_short(turn)}")
        if "from" not in turn:
            raise RowError(f"message {index}: no 'from' key (keys: {_columns_of(turn)}); "
                           f"accepted 'from' values: {accepted}")
        source = turn["from"].strip().lower() if isinstance(turn["from"], str) else None
        if source not in SHAREGPT_ROLES and source not in SHAREGPT_TOOL_ROLES:
            raise RowError(f"message {index}: unknown 'from' value {turn['from']!r}; accepted (any case): {accepted}")
        if "value" not in turn:
            raise RowError(f"message {index}: no 'value' key (keys: {_columns_of(turn)}); the value is the content")
        turns.append((source, turn["value"]))
    return turns


def _add_tool_calls(messages: list[dict], calls: list[dict]) -> None:
    """Calls join the assistant turn just before them when it has none yet, else start an assistant turn."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
        last["tool_calls"] = calls
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})


def convert_sharegpt(row: dict) -> tuple[list[dict], list[dict] | None]:
    """sharegpt: `conversations`, a list of {"from", "value"}, and optional `tools` (schemas or their JSON text).

    role = SHAREGPT_ROLES[from.strip().lower()]: human/user -> user; gpt/assistant/chatgpt/bard/bing/model ->
    assistant; system -> system. content = value. Tool turns (LLaMA-Factory / glaive style): `function_call` (a JSON
    call {"name", "arguments"} or a list of them) becomes the tool calls of an assistant turn (of the gpt turn just
    before it, when it has none); `observation` or `tool` becomes a tool result. Any other `from` (or none) ->
    RowError naming the value and the accepted ones. Other keys in a turn are dropped.
    """
    messages: list[dict] = []
    for index, (source, value) in enumerate(_sharegpt_turns(row)):
        if source == "function_call":
            calls = parse_json_field(value, f"message {index} function_call")
            calls = calls if isinstance(calls, list) else [calls]
            _add_tool_calls(messages, [normalize_tool_call(c, f"message {index} call {n}") for n, c in enumerate(calls)])
        elif source in ("observation", "tool"):
            messages.append({"role": "tool", "content": value})
        else:
            messages.append({"role": SHAREGPT_ROLES[source], "content": value})
    return messages, normalize_tools(row.get("tools"))


TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_RESPONSE_TAG = re.compile(r"<tool_response>\s*(.*?)\s*</tool_response>", re.DOTALL)
TOOLS_TAG = re.compile(r"<tools>\s*(.*?)\s*</tools>", re.DOTALL)


def _hermes_tools(text: str) -> list:
    """The schemas inside a system turn's <tools>...</tools>: a JSON list, or one JSON object per line."""
    block = TOOLS_TAG.search(text).group(1)
    try:
        value = json.loads(block)
        return value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        return [parse_json_field(line, "a schema in <tools>") for line in block.splitlines() if line.strip()]


def convert_hermes(row: dict) -> tuple[list[dict], list[dict] | None]:
    """hermes: sharegpt turns (system/human/gpt/tool) in Hermes function-calling text form.

    Each <tool_call>{json}</tool_call> in a gpt turn becomes a tool call (the text outside the tags, stripped, stays
    the content); each <tool_response>...</tool_response> of a tool turn becomes one tool result (a tool turn without
    the tags is one result). The tools come from the `tools` column, else from the system turn's <tools>...</tools>
    block, which is then cut out of the system text (the chat template renders the tools its own way; a system turn
    left empty is dropped).
    """
    messages, tools = convert_sharegpt(row)
    out = []
    for index, message in enumerate(messages):
        content = message["content"]
        if not isinstance(content, str):
            out.append(message)
        elif message["role"] == "system" and TOOLS_TAG.search(content):
            if tools is None:
                tools = normalize_tools(_hermes_tools(content))
            rest = TOOLS_TAG.sub("", content).strip()
            if rest:
                out.append({"role": "system", "content": rest})
        elif message["role"] == "assistant" and TOOL_CALL_TAG.search(content):
            calls = [normalize_tool_call(m, f"message {index} <tool_call>") for m in TOOL_CALL_TAG.findall(content)]
            out.append({"role": "assistant", "content": TOOL_CALL_TAG.sub("", content).strip(), "tool_calls": calls})
        elif message["role"] == "tool":
            results = TOOL_RESPONSE_TAG.findall(content) or [content]
            out.extend({"role": "tool", "content": result} for result in results)
        else:
            out.append(message)
    return out, tools


def convert_xlam(row: dict) -> tuple[list[dict], list[dict] | None]:
    """xlam (Salesforce xLAM function calling): `query` (the user's request), `tools` and `answers` (JSON lists of
    schemas and of {"name", "arguments"} calls). -> user = query; assistant = the calls, with empty content. The
    tool results are not in this format, so the conversation ends with the calls."""
    query = _required_text(row, "query")
    tools = normalize_tools(row["tools"])
    answers = parse_json_field(row["answers"], "answers")
    if not isinstance(answers, list) or not answers:
        raise RowError(f"answers must be a non-empty list of calls, got {_short(answers)}")
    calls = [normalize_tool_call(answer, f"answer {n}") for n, answer in enumerate(answers)]
    return [{"role": "user", "content": query}, {"role": "assistant", "content": "", "tool_calls": calls}], tools


def _prompt_completion_part(row: dict, column: str, role: str) -> list:
    if column not in row:
        raise RowError(f"missing column {column!r} (columns: {_columns_of(row)})")
    value = row[column]
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return [_keep_role_content(m) for m in value]
    raise RowError(f"column {column!r} must be a string or a list of {{role, content}} messages, "
                   f"got {_short(value)}")


def convert_prompt_completion(row: dict) -> list[dict]:
    """prompt_completion: `prompt` and `completion`, each either a string or a list of {role, content} messages
    (TRL's conversational prompt/completion); the two kinds may be mixed.

    A string prompt -> one user message; a string completion -> one assistant message; a list is taken as is
    (extra keys dropped). messages = prompt messages + completion messages, so message indices in errors count the
    prompt's messages first.
    """
    prompt = _prompt_completion_part(row, "prompt", "user")
    completion = _prompt_completion_part(row, "completion", "assistant")
    return prompt + completion


CONVERTERS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": convert_messages,
    "alpaca": convert_alpaca,
    "dolly": convert_dolly,
    "openorca": convert_openorca,
    "sharegpt": convert_sharegpt,
    "hermes": convert_hermes,
    "xlam": convert_xlam,
    "prompt_completion": convert_prompt_completion,
}


# --------------------------------------------------------------------------------------------------------------------
# Validation and the entry point


def validate(messages, tools=None) -> list[dict]:
    """Check and normalise the canonical form (chat_schema.validate); RowError says what is wrong and where."""
    return chat_schema.validate(messages, tools)


def to_chat(row: dict, fmt: str, columns: dict[str, str] | None = None) -> tuple[list[dict], list[dict] | None]:
    """rename_columns, then the format's converter, then `validate` (the same checks for every format); returns the
    conversation (messages, tools).

    Unknown fmt -> ValueError listing FORMATS; a `columns` key that is no field of fmt -> ValueError listing the
    format's fields. Problems with the row -> RowError.
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"Unknown format {fmt!r}; formats: {', '.join(FORMATS)}.")
    if columns:
        fields = REQUIRED_COLUMNS[fmt] + OPTIONAL_COLUMNS[fmt]
        unknown = [field for field in columns if field not in fields]
        if unknown:
            raise ValueError(
                f"`columns` maps {', '.join(map(repr, unknown))}, which format {fmt!r} does not use; its fields: "
                f"{', '.join(fields)}."
            )
    converted = CONVERTERS[fmt](rename_columns(row, columns))
    messages, tools = converted if isinstance(converted, tuple) else (converted, None)
    return validate(messages, tools), tools


def to_messages(row: dict, fmt: str, columns: dict[str, str] | None = None) -> list[dict]:
    """The messages of `to_chat` (tools dropped)."""
    return to_chat(row, fmt, columns)[0]
