"""One conversation's turns, validated and normalised to OpenAI messages (seed `from`/`value` turns,
`function_call` / `observation`, tool calls with parsed arguments, `tools`); each problem names where."""

from __future__ import annotations

import json

from .files import show

SEED_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "human": "user", "gpt": "assistant",
              "function_call": "assistant", "observation": "tool", "tool": "tool"}

MESSAGE_FIELDS = {
    "user": ("role", "content"),
    "assistant": ("role", "content", "tool_calls", "reasoning_content"),
    "system": ("role", "content"),
    "tool": ("role", "content", "name", "tool_call_id"),
}
SEED_TURN_FIELDS = ("from", "value", "reasoning_content")
HINTS = {"thinking": "reasoning_content", "reasoning": "reasoning_content", "function_call": "tool_calls",
         "tool_call": "tool_calls", "value": "content", "from": "role"}


def _arguments(value, at: str, errs: list[str]):
    """Tool-call arguments: an object, or a JSON string of one (they mean the same call and give the same tokens)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            errs.append(f"{at} is not valid JSON ({e.msg} at column {e.colno}); expected an object or a JSON string of one")
            return {}
    if not isinstance(value, dict):
        errs.append(f"{at} is {show(value)}; expected an object (or a JSON string of one)")
        return {}
    return value


def _tool_call(call, at: str, errs: list[str]) -> dict:
    """One call as `{"type": "function", "function": {"name", "arguments": {...}}}` (plus its "id", if any)."""
    example = '{"type": "function", "function": {"name": "...", "arguments": {...}}}'
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        errs.append(f"{at} is {show(call)}; expected a tool call like {example}")
        return {}
    fn = call["function"]
    unknown = sorted(set(call) - {"type", "id", "function"}) + [f"function.{k}" for k in sorted(set(fn) - {"name", "arguments"})]
    if unknown:
        errs.append(f"{at} has unknown field(s) {', '.join(unknown)}; expected {example}")
    if call.get("type", "function") != "function":
        errs.append(f"{at}.type is {show(call['type'])}; expected \"function\"")
    if not isinstance(fn.get("name"), str) or not fn["name"].strip():
        errs.append(f"{at}.function.name is {show(fn.get('name'))}; expected the function's name")
    out = {"type": "function", "function": {"name": fn.get("name"), "arguments": _arguments(fn.get("arguments", {}), f"{at}.function.arguments", errs)}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def _tool_calls(value, at: str, errs: list[str]) -> list[dict]:
    if not isinstance(value, list) or not value:
        errs.append(f"{at} is {show(value)}; expected a non-empty list of tool calls")
        return []
    return [_tool_call(call, f"{at}[{i}]", errs) for i, call in enumerate(value)]


def _message(turn: dict, at: str, errs: list[str]) -> dict:
    """An OpenAI / HF message, checked field by field; unknown fields are errors, never dropped."""
    role = turn.get("role")
    if not isinstance(role, str) or role not in MESSAGE_FIELDS:
        errs.append(f"{at}.role is {show(role)}; expected one of {', '.join(MESSAGE_FIELDS)}")
        return {"role": None, "content": ""}
    unknown = [k for k in turn if k not in MESSAGE_FIELDS[role]]
    for k in unknown:
        hint = f" (did you mean \"{HINTS[k]}\"?)" if k in HINTS and HINTS[k] in MESSAGE_FIELDS[role] else ""
        errs.append(f"{at} has an unknown field \"{k}\" for a {role} message{hint}; "
                    f"a {role} message has {', '.join(MESSAGE_FIELDS[role])}")
    message = {"role": role}
    if "tool_calls" in turn:
        message["tool_calls"] = _tool_calls(turn["tool_calls"], f"{at}.tool_calls", errs)
    content = turn.get("content")
    if message.get("tool_calls") and content is None:
        content = ""  # a call-only turn: null, "" and a missing content mean the same
    if "content" not in turn and not message.get("tool_calls"):
        errs.append(f'{at} has no "content"; expected an object like {{"role": "user", "content": "..."}}')
    elif not isinstance(content, str):
        errs.append(f"{at}.content is {show(content)}; expected a string")
    elif not content.strip() and not message.get("tool_calls") and role != "tool":
        errs.append(f"{at}.content is empty")
    message["content"] = content if isinstance(content, str) else ""
    for key in ("reasoning_content", "name", "tool_call_id"):
        if key in turn and key in MESSAGE_FIELDS[role]:
            if not isinstance(turn[key], str):
                errs.append(f"{at}.{key} is {show(turn[key])}; expected a string")
            message[key] = turn[key]
    return message


def _seed_turns(turn: dict, at: str, previous: dict | None, errs: list[str]) -> list[dict]:
    """A seed / ShareGPT turn as messages; `function_call` joins the assistant text right before it."""
    unknown = [k for k in turn if k not in SEED_TURN_FIELDS]
    for k in unknown:
        errs.append(f'{at} has an unknown field "{k}"; a turn has "from", "value" (and "reasoning_content" for the assistant)')
    source, value = turn["from"], turn["value"]
    if not isinstance(source, str) or source not in SEED_ROLES:
        errs.append(f"{at}.from is {show(source)}; expected one of user, assistant, system, function_call, observation "
                    "(or human, gpt)")
        if not isinstance(value, str):
            errs.append(f"{at}.value is {show(value)}; expected a string")
        return [{"role": None, "content": ""}]
    role = SEED_ROLES[source]
    if source == "function_call":
        calls = value
        if isinstance(value, str):
            try:
                calls = json.loads(value)
            except json.JSONDecodeError as e:
                errs.append(f"{at}.value is not valid JSON ({e.msg} at column {e.colno}); "
                            'expected {"name": "...", "arguments": {...}} or a list of them')
                return []
        calls = calls if isinstance(calls, list) else [calls]
        calls = [{"type": "function", "function": c} if isinstance(c, dict) else c for c in calls]
        tool_calls = _tool_calls(calls, f"{at}.value", errs)
        if previous is not None and previous["role"] == "assistant" and "tool_calls" not in previous:
            previous["tool_calls"] = tool_calls  # text, then the call: one assistant turn
            return []
        return [{"role": "assistant", "content": "", "tool_calls": tool_calls}]
    message = {"role": role, "content": value}
    if not isinstance(value, str):
        errs.append(f"{at}.value is {show(value)}; expected a string")
    elif not value.strip() and role != "tool":
        errs.append(f"{at}.value is empty")
    if "reasoning_content" in turn:
        if role != "assistant" or not isinstance(turn["reasoning_content"], str):
            errs.append(f"{at}.reasoning_content must be a string on an assistant turn")
        message["reasoning_content"] = turn["reasoning_content"]
    return [message]


def parse_turns(value, field: str, seed: bool, errs: list[str]) -> list[dict]:
    """Validate a list of turns; return them as OpenAI / HF messages (roles normalised, content byte for byte)."""
    role_key, content_key = ("from", "value") if seed else ("role", "content")
    if not isinstance(value, list) or not value:
        errs.append(f"{field} is {show(value)}; expected a non-empty list of turns")
        return []
    out: list[dict] = []
    where: list[str] = []  # where each message came from, for the order checks
    for i, turn in enumerate(value):
        at = f"{field}[{i}]"
        example = f'{{"{role_key}": "user", "{content_key}": "..."}}'
        if not isinstance(turn, dict):
            errs.append(f"{at} is {show(turn)}; expected an object like {example}")
            continue
        required = (role_key, content_key) if seed else (role_key,)
        missing = [f'"{k}"' for k in required if k not in turn]
        if missing:
            errs.append(f"{at} has no {' or '.join(missing)}; expected an object like {example}")
            continue
        if seed:
            out += _seed_turns(turn, at, out[-1] if out else None, errs)
        else:
            out.append(_message(turn, at, errs))
        where += [at] * (len(out) - len(where))
    _check_order(out, where, errs)
    return out


def _check_order(messages: list[dict], where: list[str], errs: list[str]) -> None:
    """One system turn, first; a tool result only answers a tool call made before it."""
    calls_open = False
    for i, (m, at) in enumerate(zip(messages, where)):
        if m["role"] == "system" and i > 0:
            first_system = messages[0]["role"] == "system"
            errs.append(f"{at} is a second system turn; only one is allowed, as the first turn" if first_system
                        else f"{at} is a system turn; the system turn must be the first turn")
        if m["role"] == "tool" and not calls_open:
            errs.append(f"{at} is a tool result with no tool call before it; "
                        "an assistant turn with tool_calls must come first")
        if m["role"] == "assistant":
            calls_open = bool(m.get("tool_calls"))
        elif m["role"] in ("user", "system"):
            calls_open = False


def parse_tools(obj: dict, errs: list[str]) -> list[dict] | None:
    """The top-level `tools` (a list, or a JSON string of one); bare functions get the OpenAI wrapper."""
    if "tools" not in obj:
        return None
    value = obj["tools"]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            errs.append(f"tools is not valid JSON ({e.msg} at column {e.colno}); expected a list of functions")
            return None
    if not isinstance(value, list):
        errs.append(f"tools is {show(value)}; expected a list of functions")
        return None
    out = []
    for i, tool in enumerate(value):
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict) or not tool["function"].get("name"):
            errs.append(f'tools[{i}] is {show(tool)}; expected {{"type": "function", "function": {{"name": "...", '
                        '"description": "...", "parameters": {...}}}')
            continue
        out.append(tool)
    return out
