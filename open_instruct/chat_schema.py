"""The canonical conversation every format converts to, reasoning and tool calls included, and its validation.

A conversation is ``(messages, tools)``, in the Hugging Face / OpenAI convention that chat templates read:

    {"role": "system" | "user", "content": str}
    {"role": "assistant", "content": str,                       # "" when the turn only calls tools
     ["reasoning_content": str],                                # the thinking before the answer
     ["tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}, ["id": str]}]]}
    {"role": "tool", "content": str, ["tool_call_id": str], ["name": str]}
    tools: None or [{"type": "function", "function": {"name": str, ["description": str], ["parameters": dict]}}]

Normalisation (so that every template sees one shape): tool-call arguments given as a JSON string are parsed into an
object, a bare ``{"name", "arguments"}`` call or ``{"name", "description", "parameters"}`` tool is wrapped as
``{"type": "function", "function": ...}``, and a ``<think>...</think>`` block that opens an assistant's content moves
to ``reasoning_content`` (the newlines around the reasoning and before the answer are dropped; templates put back
their own). Errors raise RowError (formats.py adds the file and line).
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RowError(ValueError):
    """What is wrong with one row, without its location (the caller adds source/file/line)."""


def _short(value) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)}"
    return f"{type(value).__name__} ({value!r:.60})"


def parse_json_field(value, what: str):
    """A JSON string decoded (anything else returned as is); a string that is not JSON -> RowError."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos}): {value!r:.80}") from None


# --------------------------------------------------------------------------------------------------------------------
# Tools and tool calls


def normalize_tools(value) -> list[dict] | None:
    """The row's `tools` (a list or its JSON text; None or [] -> None) as wrapped function schemas."""
    value = parse_json_field(value, "tools")
    if value is None or value == [] or value == "":
        return None
    if not isinstance(value, list):
        raise RowError(f"tools must be a list of function schemas, got {_short(value)}")
    tools = []
    for index, tool in enumerate(value):
        tool = parse_json_field(tool, f"tool {index}")
        if not isinstance(tool, dict):
            raise RowError(f"tool {index} must be an object, got {_short(tool)}")
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError(f"tool {index} has no function name; a tool is {{\"type\": \"function\", \"function\": "
                           f"{{\"name\": ..., \"parameters\": {{...}}}}}} or {{\"name\": ..., \"parameters\": ...}}")
        tools.append({"type": "function", "function": dict(function)})
    return tools


def tool_names(tools: list[dict] | None) -> set[str]:
    return {tool["function"]["name"] for tool in tools or []}


def normalize_tool_call(call, where: str) -> dict:
    """One call as {"type": "function", "function": {"name", "arguments": dict}} (+ "id" when given)."""
    call = parse_json_field(call, where)
    if not isinstance(call, dict):
        raise RowError(f"{where} must be an object with a function name and arguments, got {_short(call)}")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RowError(f"{where} has no function name (keys: {', '.join(sorted(map(str, call)))})")
    raw = function.get("arguments", function.get("parameters", {}))
    arguments = parse_json_field(raw, f"{where} arguments of {function['name']!r}")
    if not isinstance(arguments, dict):
        raise RowError(f"{where} arguments of {function['name']!r} must be a JSON object, got {_short(arguments)}")
    normalized = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        normalized["id"] = call["id"]
    return normalized


def split_think(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content that opens with <think>...</think>; (None, content) otherwise."""
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN) or THINK_CLOSE not in stripped:
        return None, content
    inner, _, answer = stripped[len(THINK_OPEN):].partition(THINK_CLOSE)
    return inner.strip("\n"), answer.lstrip("\n")


# --------------------------------------------------------------------------------------------------------------------
# Messages


def _content(message: dict, index: int, may_be_empty: bool) -> str:
    if "content" not in message or message["content"] is None:
        if may_be_empty:
            return ""
        if "content" not in message:
            raise RowError(f"message {index} has no 'content'; content must be a string")
    content = message["content"]
    if not isinstance(content, str):
        raise RowError(f"message {index} content must be a string, got {type(content).__name__} ({content!r:.60})")
    return content


def _assistant(message: dict, index: int, names: set[str] | None) -> dict:
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RowError(f"message {index} tool_calls must be a list of calls, got {_short(calls)}")
    tool_calls = [normalize_tool_call(call, f"message {index} tool call {n}") for n, call in enumerate(calls)]
    for n, call in enumerate(tool_calls):
        name = call["function"]["name"]
        if names is not None and name not in names:
            raise RowError(f"message {index} tool call {n} calls {name!r}, which is not in the row's tools "
                           f"({', '.join(sorted(names))})")
    content = _content(message, index, may_be_empty=bool(tool_calls))
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RowError(f"message {index} reasoning_content must be a string, got {_short(reasoning)}")
    inline, answer = split_think(content)
    if inline is not None:
        if reasoning:
            raise RowError(f"message {index} has both reasoning_content and a <think> block in its content; "
                           "keep one of them")
        reasoning, content = inline, answer
    out = {"role": "assistant", "content": content}
    if reasoning:
        out["reasoning_content"] = reasoning
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


def _tool_result(message: dict, index: int, pending: list[dict]) -> dict:
    if not pending:
        raise RowError(f"message {index} is a tool result with no preceding tool call to answer")
    out = {"role": "tool", "content": _content(message, index, may_be_empty=False)}
    call_id = message.get("tool_call_id")
    if call_id is not None:
        ids = [call.get("id") for call in pending]
        if any(ids) and call_id not in ids:
            raise RowError(f"message {index} answers tool_call_id {call_id!r}, which no pending call has "
                           f"({', '.join(map(repr, filter(None, ids)))})")
        out["tool_call_id"] = call_id
    answered = next((call for call in pending if call_id is not None and call.get("id") == call_id), pending[0])
    pending.remove(answered)
    out["name"] = message["name"] if isinstance(message.get("name"), str) else answered["function"]["name"]
    return out


def validate(messages, tools=None) -> list[dict]:
    """Check and normalise a conversation (see the module docstring); returns fresh message dicts.

    Roles are system/user/assistant/tool; a system message only comes first; at least one assistant message; an
    assistant's content may be empty or missing only when it calls tools; a call names a tool of `tools` when the
    row has tools, and its arguments are a JSON object; each tool result answers a call of an earlier assistant turn
    that no result has answered yet.
    """
    if not isinstance(messages, list) or not messages:
        raise RowError(f"messages must be a non-empty list of {{role, content}} objects, got {_short(messages)}")
    names = tool_names(tools) if tools else None
    out, pending = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"message {index} must be an object with role and content, got {_short(message)}")
        role = message.get("role")
        if role is None:
            raise RowError(f"message {index} has no 'role'; roles are {', '.join(ROLES)}")
        if role not in ROLES:
            raise RowError(f"message {index} has unknown role {role!r}; roles are {', '.join(ROLES)}")
        if role == "system" and index > 0:
            raise RowError(f"message {index} is a system message; a system message is allowed only as the first "
                           "message")
        if role == "assistant":
            out.append(_assistant(message, index, names))
            pending = list(out[-1].get("tool_calls", []))
        elif role == "tool":
            out.append(_tool_result(message, index, pending))
        else:
            out.append({"role": role, "content": _content(message, index, may_be_empty=False)})
            pending = []
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("no assistant message, so nothing would be trained")
    return out


def conversation_counts(messages: list[dict]) -> tuple[int, int, int]:
    """(has reasoning, has tool calls, number of tool results) of one conversation, for dataset_stats.json."""
    reasoning = any(m.get("reasoning_content") for m in messages)
    calls = any(m.get("tool_calls") for m in messages)
    return int(reasoning), int(calls), sum(m["role"] == "tool" for m in messages)
