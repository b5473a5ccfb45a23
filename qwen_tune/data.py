"""Read, validate and normalise data files (JSON lists and JSONL) into typed samples.

Every problem names its file and line, all problems are collected before anything is
returned (one run shows everything to fix), and samples are never dropped or altered:
content is kept byte for byte, only roles are normalised. No tokenization here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, UserError

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
SEED_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "human": "user", "gpt": "assistant"}
ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    id: str  # the sample's "id" if present, else f"{file_stem}-{index}"
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}]
    source: str  # "path:LINE" where the sample starts


@dataclass
class PreferencePair:
    id: str
    prompt: list[dict]  # messages, the last one a user turn
    chosen: list[dict]  # the assistant message(s) continuing the prompt (normally one)
    rejected: list[dict]
    source: str


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


def _turns(value, field: str, seed: bool, errs: list[str]) -> list[dict]:
    """Validate a list of turns; return it as [{"role", "content"}] with roles normalised."""
    role_key, content_key = ("from", "value") if seed else ("role", "content")
    roles = SEED_ROLES if seed else ROLES
    if not isinstance(value, list) or not value:
        errs.append(f"{field} is {_show(value)}; expected a non-empty list of turns")
        return []
    out, has_system = [], False
    for i, turn in enumerate(value):
        at = f"{field}[{i}]"
        example = f'{{"{role_key}": "user", "{content_key}": "..."}}'
        if not isinstance(turn, dict):
            errs.append(f"{at} is {_show(turn)}; expected an object like {example}")
            continue
        missing = [f'"{k}"' for k in (role_key, content_key) if k not in turn]
        if missing:
            errs.append(f"{at} has no {' or '.join(missing)}; expected an object like {example}")
            continue
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str) or role not in roles:
            aliases = " (or human, gpt)" if seed else ""
            errs.append(f"{at}.{role_key} is {_show(role)}; expected one of user, assistant, system{aliases}")
            role = None
        if not isinstance(content, str):
            errs.append(f"{at}.{content_key} is {_show(content)}; expected a string")
        elif not content.strip():
            errs.append(f"{at}.{content_key} is empty")
        role = roles.get(role)
        if role == "system":
            if has_system:
                errs.append(f"{at} is a second system turn; only one is allowed, as the first turn")
            elif i > 0:
                errs.append(f"{at} is a system turn; the system turn must be the first turn")
            has_system = True
        out.append({"role": role, "content": content})
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
    """The model writes the next turn, so a prompt must end with the user's."""
    role = messages[-1]["role"] if messages else "user"
    if role != "user":
        article = "an" if role == "assistant" else "a"
        errs.append(f"{field} ends with {article} {role} turn; a prompt must end with a user turn")


def _wrong_kind(obj: dict, expected: str, errs: list[str]) -> bool:
    """A preference record given where SFT data or prompts are expected."""
    if "chosen" in obj or "rejected" in obj:
        errs.append(f'this is a preference pair (it has "chosen"/"rejected"); {expected}')
        return True
    return False


def _parse_sft(obj: dict, errs: list[str]) -> list[dict]:
    if _wrong_kind(obj, SFT_FORMAT, errs):
        return []
    before = len(errs)
    messages = _pick(obj, ("conversations", "messages"), SFT_FORMAT, errs)
    if len(errs) == before and not any(m["role"] == "assistant" for m in messages):
        errs.append("no assistant turn, so nothing to learn from; SFT data needs at least one")
    return messages


def _parse_prompt(obj: dict, errs: list[str]) -> list[dict]:
    if _wrong_kind(obj, PROMPT_FORMAT, errs):
        return []
    before = len(errs)
    messages = _pick(obj, ("conversations", "messages", "prompt"), PROMPT_FORMAT, errs)
    if len(errs) == before:
        _ends_with_user(messages, next(k for k in ("conversations", "messages", "prompt") if k in obj), errs)
    return messages


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


def _parse_pair(obj: dict, errs: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if len(missing) == 2:
        looks = " (this looks like SFT data)" if "conversations" in obj or "messages" in obj else ""
        errs.append(f'missing "chosen" and "rejected"{looks}; {PREFERENCE_FORMAT}')
        return [], [], []
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
    return prompt, chosen, rejected


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
    return [Conversation(i, m, s) for i, m, s in _load(paths, _parse_sft, SFT_FORMAT, max_problems)]


def load_prompts(paths, max_problems: int = 20) -> list[Conversation]:
    """PPO prompts: conversations that end with a user turn (the policy writes the reply)."""
    return [Conversation(i, m, s) for i, m, s in _load(paths, _parse_prompt, PROMPT_FORMAT, max_problems)]


def load_preference_pairs(paths, max_problems: int = 20) -> list[PreferencePair]:
    """Preference pairs, Qwen-style (conversations + chosen/rejected text) or TRL-style (prompt/chosen/rejected)."""
    return [PreferencePair(i, *p, s) for i, p, s in _load(paths, _parse_pair, PREFERENCE_FORMAT, max_problems)]


def detect_kind(paths) -> str:
    """"preference" if the first record has chosen/rejected, else "sft" (lets `score` pick a loader)."""
    problems: list[str] = []
    records = _read(resolve_files(paths)[0], problems)
    if not records:
        raise DataError(problems)
    obj = records[0][1]
    return "preference" if isinstance(obj, dict) and ("chosen" in obj or "rejected" in obj) else "sft"
