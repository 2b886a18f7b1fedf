"""Row -> canonical messages: pure converters for the common SFT dataset layouts.

Canonical form: a non-empty list of ``{"role": "system" | "user" | "assistant", "content": str}`` dicts with at least
one assistant message (its content may be ""), and a system message only as the first message.

    fmt = detect_format(first_row.keys())                 # or the source's `format` in the mixer file
    messages = to_messages(row, fmt, columns={"output": "answer"})

Formats and their columns (``[x]`` = optional):

    messages           messages
    sharegpt           conversations
    openorca           [system_prompt], question, response
    dolly              instruction, [context], response
    alpaca             instruction, [input], output
    prompt_completion  prompt, completion

Errors about one row raise `RowError` (a ValueError) that says what is wrong and, for a message, its index, but not
where the row is: the caller adds the source, file and line. Mistakes in the arguments themselves (an unknown format,
a `columns` key that is no field of the format) raise a plain ValueError, since no row is at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from open_instruct.tokenization import ROLES

FORMATS = ("messages", "alpaca", "dolly", "openorca", "sharegpt", "prompt_completion")

# The order in which detect_format tries the formats: the most specific column sets first, so that a dataset that
# carries several (say `messages` next to `prompt`/`completion`) is read by its chat column.
DETECTION_ORDER = ("messages", "sharegpt", "openorca", "dolly", "alpaca", "prompt_completion")

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
    "openorca": ("question", "response"),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": (),
    "alpaca": ("input",),
    "dolly": ("context",),
    "openorca": ("system_prompt",),
    "sharegpt": (),
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


class RowError(ValueError):
    """What is wrong with one row, without its location (the caller adds source/file/line)."""


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


# --------------------------------------------------------------------------------------------------------------------
# Converters. Each maps a row (already renamed to canonical column names) to a list of messages; `to_messages` then
# validates the result, so a converter only checks what it needs to read the row.


def convert_messages(row: dict) -> list[dict]:
    """messages: the `messages` column is already a list of {role, content}; keys other than role and content in a
    message (name, weight, ...) are dropped. Roles must be system/user/assistant (checked by validation)."""
    return [_keep_role_content(m) for m in _required_list(row, "messages", "{role, content} objects")]


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


def convert_sharegpt(row: dict) -> list[dict]:
    """sharegpt: `conversations`, a list of {"from", "value"}; message i comes from turn i.

    role = SHAREGPT_ROLES[from.strip().lower()]: human/user -> user; gpt/assistant/chatgpt/bard/bing/model ->
    assistant; system -> system. content = value. Any other `from` (or none) -> RowError naming the value and the
    accepted ones. Other keys in a turn are dropped.
    """
    messages = []
    for index, turn in enumerate(_required_list(row, "conversations", '{"from", "value"} objects')):
        if not isinstance(turn, dict):
            raise RowError(f"message {index}: a conversation turn must be an object, got {_short(turn)}")
        if "from" not in turn:
            raise RowError(f"message {index}: no 'from' key (keys: {_columns_of(turn)}); "
                           f"accepted 'from' values: {', '.join(SHAREGPT_ROLES)}")
        source = turn["from"]
        role = SHAREGPT_ROLES.get(source.strip().lower()) if isinstance(source, str) else None
        if role is None:
            raise RowError(f"message {index}: unknown 'from' value {source!r}; accepted (any case): "
                           f"{', '.join(SHAREGPT_ROLES)}")
        if "value" not in turn:
            raise RowError(f"message {index}: no 'value' key (keys: {_columns_of(turn)}); the value is the content")
        messages.append({"role": role, "content": turn["value"]})
    return messages


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
    "prompt_completion": convert_prompt_completion,
}


# --------------------------------------------------------------------------------------------------------------------
# Validation and the entry point


def validate(messages) -> list[dict]:
    """Check the canonical form and return fresh {role, content} dicts; RowError says what is wrong and where.

    messages must be a non-empty list of dicts; each needs a role in ROLES and string content (None or a number is
    an error; "" is allowed); a system message may only be the first message; at least one assistant message.
    """
    if not isinstance(messages, list) or not messages:
        raise RowError(f"messages must be a non-empty list of {{role, content}} objects, got {_short(messages)}")
    roles = ", ".join(ROLES)
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"message {index} must be an object with role and content, got {_short(message)}")
        if "role" not in message:
            raise RowError(f"message {index} has no 'role'; roles are {roles}")
        if message["role"] not in ROLES:
            raise RowError(f"message {index} has unknown role {message['role']!r}; roles are {roles}")
        if "content" not in message:
            raise RowError(f"message {index} has no 'content'; content must be a string")
        if not isinstance(message["content"], str):
            content = message["content"]
            raise RowError(f"message {index} content must be a string, got {type(content).__name__} "
                           f"({content!r:.60})")
        if message["role"] == "system" and index > 0:
            raise RowError(f"message {index} is a system message; a system message is allowed only as the first "
                           "message")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant message, so nothing would be trained")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_messages(row: dict, fmt: str, columns: dict[str, str] | None = None) -> list[dict]:
    """rename_columns, then the format's converter, then `validate` (the same checks for every format).

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
    return validate(CONVERTERS[fmt](rename_columns(row, columns)))
