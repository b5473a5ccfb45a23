"""Read, validate and normalise data files (JSON lists and JSONL) into typed samples.

Every problem names its file and line, all problems are collected before anything is
returned (one run shows everything to fix), and samples are never dropped or altered:
content is kept byte for byte. What is normalised: roles (seed `from` -> OpenAI `role`, seed
`function_call` / `observation` -> assistant `tool_calls` / `tool` messages), tool-call arguments
(a JSON string is parsed into the object it means), and bare tool definitions (wrapped as
`{"type": "function", "function": ...}`). Unknown fields are errors, never dropped. No tokenization here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, UserError

SFT_FORMAT = (
    'expected SFT data like {"conversations": [{"from": "user", "value": "..."}, '
    '{"from": "assistant", "value": "..."}]} or {"messages": [{"role": "user", "content": "..."}, ...]}'
)
PREFERENCE_FORMAT = (
    'expected preference data like {"conversations": [{"from": "user", "value": "..."}], '
    '"chosen": "...", "rejected": "..."} or {"prompt": [{"role": "user", "content": "..."}], '
    '"chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}'
)
PROMPT_FORMAT = (
    'expected prompts like {"messages": [{"role": "user", "content": "..."}]} ending with a user turn '
    '(or {"conversations": [...]}, or {"prompt": "..."})'
)
SEED_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "human": "user", "gpt": "assistant",
              "function_call": "assistant", "observation": "tool", "tool": "tool"}


@dataclass
class Conversation:
    id: str  # the sample's "id" if present, else f"{file_stem}-{index}"
    messages: list[dict]  # OpenAI / HF messages: role, content, and tool_calls / reasoning_content / tool_call_id / name
    source: str  # "path:LINE" where the sample starts
    tools: list[dict] | None = None  # the conversation's top-level function definitions


@dataclass
class PreferencePair:
    id: str
    prompt: list[dict]  # messages, the last one a user turn
    chosen: list[dict]  # the assistant message(s) continuing the prompt (normally one)
    rejected: list[dict]
    source: str
    tools: list[dict] | None = None


# ---------------------------------------------------------------- files


def resolve_files(paths: str | os.PathLike | list) -> list[Path]:
    """Expand files, directories (their *.json/*.jsonl, sorted) and comma-separated lists."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    pieces = [p for item in items for p in (item.split(",") if isinstance(item, str) else [item])]
    files: list[Path] = []
    for piece in pieces:
        if isinstance(piece, str) and not piece.strip():
            continue
        path = Path(piece.strip() if isinstance(piece, str) else piece)
        if not path.exists():
            raise UserError(f"data path not found: {path}")
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in (".json", ".jsonl"))
            if not found:
                raise UserError(f"no .json or .jsonl files in directory {path}")
            files += found
        elif path.suffix.lower() in (".json", ".jsonl"):
            files.append(path)
        else:
            raise UserError(f"{path}: unsupported data file type; expected .json (a list) or .jsonl (an object a line)")
    if not files:
        raise UserError(f"no data files given ({paths!r})")
    return files


_SKIP = re.compile(r"[\s,]*")


def _json_list_lines(text: str, count: int) -> list[int]:
    """Line where each element of a valid top-level JSON list starts, in one linear pass."""
    decode = json.JSONDecoder().raw_decode
    pos, last, line, lines = text.index("[") + 1, 0, 1, []
    for _ in range(count):
        pos = _SKIP.match(text, pos).end()
        line += text.count("\n", last, pos)
        last = pos
        lines.append(line)
        pos = decode(text, pos)[1]
    return lines


def _read(path: Path, problems: list[str]) -> list[tuple[int, object]]:
    """(line, record) for each sample in a file; file-level problems go to `problems`."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        problems.append(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8")
        return []
    if not text.strip():
        problems.append(f"{path}:1: the file is empty (no samples)")
        return []
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})")
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        problems.append(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}){hint}")
        return []
    if not isinstance(data, list):
        line = text[: len(text) - len(text.lstrip())].count("\n") + 1
        problems.append(f"{path}:{line}: top level is {_show(data)}; expected a list of samples [{{...}}, ...]")
        return []
    if not data:
        problems.append(f"{path}:1: the list is empty (no samples)")
    return list(zip(_json_list_lines(text, len(data)), data))


# ---------------------------------------------------------------- records


def _show(value) -> str:
    """A short JSON rendering of a value for messages."""
    s = json.dumps(value, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


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
        errs.append(f"{at} is {_show(value)}; expected an object (or a JSON string of one)")
        return {}
    return value


def _tool_call(call, at: str, errs: list[str]) -> dict:
    """One call as `{"type": "function", "function": {"name", "arguments": {...}}}` (plus its "id", if any)."""
    example = '{"type": "function", "function": {"name": "...", "arguments": {...}}}'
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        errs.append(f"{at} is {_show(call)}; expected a tool call like {example}")
        return {}
    fn = call["function"]
    unknown = sorted(set(call) - {"type", "id", "function"}) + [f"function.{k}" for k in sorted(set(fn) - {"name", "arguments"})]
    if unknown:
        errs.append(f"{at} has unknown field(s) {', '.join(unknown)}; expected {example}")
    if call.get("type", "function") != "function":
        errs.append(f"{at}.type is {_show(call['type'])}; expected \"function\"")
    if not isinstance(fn.get("name"), str) or not fn["name"].strip():
        errs.append(f"{at}.function.name is {_show(fn.get('name'))}; expected the function's name")
    out = {"type": "function", "function": {"name": fn.get("name"), "arguments": _arguments(fn.get("arguments", {}), f"{at}.function.arguments", errs)}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def _tool_calls(value, at: str, errs: list[str]) -> list[dict]:
    if not isinstance(value, list) or not value:
        errs.append(f"{at} is {_show(value)}; expected a non-empty list of tool calls")
        return []
    return [_tool_call(call, f"{at}[{i}]", errs) for i, call in enumerate(value)]


def _message(turn: dict, at: str, errs: list[str]) -> dict:
    """An OpenAI / HF message, checked field by field; unknown fields are errors, never dropped."""
    role = turn.get("role")
    if not isinstance(role, str) or role not in MESSAGE_FIELDS:
        errs.append(f"{at}.role is {_show(role)}; expected one of {', '.join(MESSAGE_FIELDS)}")
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
        errs.append(f"{at}.content is {_show(content)}; expected a string")
    elif not content.strip() and not message.get("tool_calls") and role != "tool":
        errs.append(f"{at}.content is empty")
    message["content"] = content if isinstance(content, str) else ""
    for key in ("reasoning_content", "name", "tool_call_id"):
        if key in turn and key in MESSAGE_FIELDS[role]:
            if not isinstance(turn[key], str):
                errs.append(f"{at}.{key} is {_show(turn[key])}; expected a string")
            message[key] = turn[key]
    return message


def _seed_turns(turn: dict, at: str, previous: dict | None, errs: list[str]) -> list[dict]:
    """A seed / ShareGPT turn as messages; `function_call` joins the assistant text right before it."""
    unknown = [k for k in turn if k not in SEED_TURN_FIELDS]
    for k in unknown:
        errs.append(f'{at} has an unknown field "{k}"; a turn has "from", "value" (and "reasoning_content" for the assistant)')
    source, value = turn["from"], turn["value"]
    if not isinstance(source, str) or source not in SEED_ROLES:
        errs.append(f"{at}.from is {_show(source)}; expected one of user, assistant, system, function_call, observation "
                    "(or human, gpt)")
        if not isinstance(value, str):
            errs.append(f"{at}.value is {_show(value)}; expected a string")
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
        errs.append(f"{at}.value is {_show(value)}; expected a string")
    elif not value.strip() and role != "tool":
        errs.append(f"{at}.value is empty")
    if "reasoning_content" in turn:
        if role != "assistant" or not isinstance(turn["reasoning_content"], str):
            errs.append(f"{at}.reasoning_content must be a string on an assistant turn")
        message["reasoning_content"] = turn["reasoning_content"]
    return [message]


def _turns(value, field: str, seed: bool, errs: list[str]) -> list[dict]:
    """Validate a list of turns; return them as OpenAI / HF messages (roles normalised, content byte for byte)."""
    role_key, content_key = ("from", "value") if seed else ("role", "content")
    if not isinstance(value, list) or not value:
        errs.append(f"{field} is {_show(value)}; expected a non-empty list of turns")
        return []
    out: list[dict] = []
    where: list[str] = []  # where each message came from, for the order checks
    for i, turn in enumerate(value):
        at = f"{field}[{i}]"
        example = f'{{"{role_key}": "user", "{content_key}": "..."}}'
        if not isinstance(turn, dict):
            errs.append(f"{at} is {_show(turn)}; expected an object like {example}")
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


def _tools(obj: dict, errs: list[str]) -> list[dict] | None:
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
        errs.append(f"tools is {_show(value)}; expected a list of functions")
        return None
    out = []
    for i, tool in enumerate(value):
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict) or not tool["function"].get("name"):
            errs.append(f'tools[{i}] is {_show(tool)}; expected {{"type": "function", "function": {{"name": "...", '
                        '"description": "...", "parameters": {...}}}')
            continue
        out.append(tool)
    return out


def _pick(obj: dict, keys: tuple[str, ...], expected: str, errs: list[str]) -> list[dict]:
    """Find the one key holding the (prompt) turns, in whichever format, and validate it."""
    present = [k for k in keys if k in obj]
    if len(present) != 1:
        if present:
            errs.append(f"has both {' and '.join(map(json.dumps, present))}; use one")
        else:
            errs.append(f"missing {' or '.join(map(json.dumps, keys))}; {expected}")
        return []
    key = present[0]
    if key == "prompt" and isinstance(obj[key], str):
        if not obj[key].strip():
            errs.append("prompt is empty")
        return [{"role": "user", "content": obj[key]}]
    return _turns(obj[key], key, key == "conversations", errs)


def _ends_with_user(messages: list[dict], field: str, errs: list[str]) -> None:
    """The model writes the next turn, so a prompt must end with the user's (or a tool's result)."""
    role = messages[-1]["role"] if messages else "user"
    if role not in ("user", "tool", None):
        article = "an" if role == "assistant" else "a"
        errs.append(f"{field} ends with {article} {role} turn; a prompt must end with a user turn (or a tool result)")


def _wrong_kind(obj: dict, expected: str, errs: list[str]) -> bool:
    """A preference record given where SFT data or prompts are expected."""
    if "chosen" in obj or "rejected" in obj:
        errs.append(f'this is a preference pair (it has "chosen"/"rejected"); {expected}')
        return True
    return False


def _parse_sft(obj: dict, errs: list[str]) -> tuple[list[dict], list[dict] | None]:
    if _wrong_kind(obj, SFT_FORMAT, errs):
        return [], None
    before = len(errs)
    messages = _pick(obj, ("conversations", "messages"), SFT_FORMAT, errs)
    if len(errs) == before and not any(m["role"] == "assistant" for m in messages):
        errs.append("no assistant turn, so nothing to learn from; SFT data needs at least one")
    return messages, _tools(obj, errs)


def _parse_prompt(obj: dict, errs: list[str]) -> tuple[list[dict], list[dict] | None]:
    if _wrong_kind(obj, PROMPT_FORMAT, errs):
        return [], None
    before = len(errs)
    messages = _pick(obj, ("conversations", "messages", "prompt"), PROMPT_FORMAT, errs)
    if len(errs) == before:
        _ends_with_user(messages, next(k for k in ("conversations", "messages", "prompt") if k in obj), errs)
    return messages, _tools(obj, errs)


def _reply(obj: dict, key: str, seed: bool, errs: list[str]) -> list[dict]:
    """chosen/rejected: a string, or a list of assistant messages."""
    value = obj[key]
    if isinstance(value, str):
        if not value.strip():
            errs.append(f"{key} is empty")
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        errs.append(f"{key} is {_show(value)}; expected a string or a list of assistant messages")
        return []
    messages = _turns(value, key, seed, errs)
    for i, m in enumerate(messages):
        if m["role"] not in (None, "assistant"):
            errs.append(f"{key}[{i}] is a {m['role']} turn; {key} must hold assistant messages only")
    return messages


def _parse_pair(obj: dict, errs: list[str]) -> tuple[list[dict], list[dict], list[dict], list[dict] | None]:
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if len(missing) == 2:
        looks = " (this looks like SFT data)" if "conversations" in obj or "messages" in obj else ""
        errs.append(f'missing "chosen" and "rejected"{looks}; {PREFERENCE_FORMAT}')
        return [], [], [], None
    for k in missing:
        errs.append(f'missing "{k}"; {PREFERENCE_FORMAT}')
    keys = ("prompt", "conversations", "messages")
    before = len(errs)
    prompt = _pick(obj, keys, PREFERENCE_FORMAT, errs)
    if len(errs) == before:
        _ends_with_user(prompt, next(k for k in keys if k in obj), errs)
    seed = "conversations" in obj
    chosen = _reply(obj, "chosen", seed, errs) if "chosen" in obj else []
    rejected = _reply(obj, "rejected", seed, errs) if "rejected" in obj else []
    return prompt, chosen, rejected, _tools(obj, errs)


# ---------------------------------------------------------------- loading


def _load(paths, parse, expected: str, max_problems: int) -> list[tuple[str, object, str]]:
    """Validate every record of every file: (id, parsed, source) for each, or one DataError with all problems.

    `sample N` and default ids count records from 0 within their file (blank JSONL lines are not records).
    """
    problems: list[str] = []
    out, seen = [], {}
    for path in resolve_files(paths):
        in_list = path.suffix.lower() == ".json"
        for index, (line, obj) in enumerate(_read(path, problems)):
            source = f"{path}:{line}"
            raw_id = obj.get("id") if isinstance(obj, dict) else None
            valid_id = type(raw_id) is int or (isinstance(raw_id, str) and bool(raw_id.strip()))
            sid = str(raw_id) if valid_id else f"{path.stem}-{index}"
            tags = ([f"sample {index}"] if in_list else []) + ([f'id "{sid}"'] if valid_id else [])
            where = source + (f" ({', '.join(tags)})" if tags else "")
            errs: list[str] = []
            if not isinstance(obj, dict):
                errs.append(f"sample is {_show(obj)}, not an object; {expected}")
            else:
                if raw_id is not None and not valid_id:
                    errs.append(f"id is {_show(raw_id)}; expected a non-empty string or an integer")
                parsed = parse(obj, errs)
            if sid in seen:
                errs.append(f'duplicate id "{sid}" (first at {seen[sid]})')
            seen.setdefault(sid, source)
            problems += [f"{where}: {e}" for e in errs]
            if not errs:
                out.append((sid, parsed, source))
    if problems:
        raise DataError(problems[:max_problems], total=len(problems))
    return out


def load_conversations(paths, max_problems: int = 20) -> list[Conversation]:
    """SFT data: conversations with at least one assistant turn (seed or OpenAI format)."""
    return [Conversation(i, m, s, t) for i, (m, t), s in _load(paths, _parse_sft, SFT_FORMAT, max_problems)]


def load_prompts(paths, max_problems: int = 20) -> list[Conversation]:
    """PPO prompts: conversations that end with a user turn or a tool result (the policy writes the reply)."""
    return [Conversation(i, m, s, t) for i, (m, t), s in _load(paths, _parse_prompt, PROMPT_FORMAT, max_problems)]


def load_preference_pairs(paths, max_problems: int = 20) -> list[PreferencePair]:
    """Preference pairs, Qwen-style (conversations + chosen/rejected text) or TRL-style (prompt/chosen/rejected)."""
    return [PreferencePair(i, prompt, chosen, rejected, s, tools)
            for i, (prompt, chosen, rejected, tools), s in _load(paths, _parse_pair, PREFERENCE_FORMAT, max_problems)]


def detect_kind(paths) -> str:
    """"preference" if the first record has chosen/rejected, else "sft" (lets `score` pick a loader)."""
    problems: list[str] = []
    records = _read(resolve_files(paths)[0], problems)
    if not records:
        raise DataError(problems)
    obj = records[0][1]
    return "preference" if isinstance(obj, dict) and ("chosen" in obj or "rejected" in obj) else "sft"
