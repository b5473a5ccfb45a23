"""Read, validate and normalise data files (JSON, JSONL, gzipped, CSV, Parquet, Arrow; see files.py) into typed samples.

Every problem names its file and line (or row), all problems are collected before anything is
returned (one run shows everything to fix), and samples are never dropped or altered:
text is kept byte for byte. What is normalised: roles (seed `from` -> OpenAI `role`, seed
`function_call` / `observation` -> assistant `tool_calls` / `tool` messages), tool-call arguments
(a JSON string is parsed into the object it means), bare tool definitions (wrapped as
`{"type": "function", "function": ...}`), and images (content blocks, or a top-level `images` list taken by the
`<image>` placeholders of the text, become `{"type": "image", "image": ABSOLUTE_PATH_OR_DATA_URI}` blocks; a relative
path starts at the data file's directory; see messages.py, images.py). Unknown fields are errors, never dropped. No
tokenization here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import DataError, UserError
from .files import data_suffix, is_tokens_dir, iter_records, located_by_row, record_stem, resolve_files, resolve_sources, show
from .hub import HubDataset
from .messages import SampleImages, parse_tool, parse_tools, parse_turns
from .mixture import mix

SFT_FORMAT = (
    'expected SFT data like {"conversations": [{"from": "user", "value": "..."}, '
    '{"from": "assistant", "value": "..."}]} or {"messages": [{"role": "user", "content": "..."}, ...]}'
)
PREFERENCE_FORMAT = (
    'expected preference data like {"conversations": [{"from": "user", "value": "..."}], '
    '"chosen": "...", "rejected": "..."} or {"prompt": [{"role": "user", "content": "..."}], '
    '"chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}'
)
UNPAIRED_FORMAT = (
    'expected unpaired replies like {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", '
    '"content": "..."}], "label": true} or {"prompt": "...", "completion": "...", "label": false} (true: a desirable '
    'reply, false: an undesirable one)'
)
PROMPT_FORMAT = (
    'expected prompts like {"messages": [{"role": "user", "content": "..."}]} ending with a user turn '
    '(or {"conversations": [...]}, or {"prompt": "..."})'
)


@dataclass
class Conversation:
    id: str  # the sample's "id" if present, else f"{file_stem}-{index}"
    # OpenAI / HF messages: role, content (a string, or text and image blocks if it carries an image), and
    # tool_calls / reasoning_content / tool_call_id / name
    messages: list[dict]
    source: str  # "path:LINE" where the sample starts ("path:row N" in Parquet / Arrow, row 1 the first)
    tools: list[dict] | None = None  # the conversation's top-level function definitions
    columns: dict = field(default_factory=dict)  # prompts: the record's other fields (e.g. "answer"), for reward functions


@dataclass
class PreferencePair:
    id: str
    prompt: list[dict]  # messages, the last one a user turn
    chosen: list[dict]  # the assistant message(s) continuing the prompt (normally one)
    rejected: list[dict]
    source: str
    tools: list[dict] | None = None


def _pick(obj: dict, keys: tuple[str, ...], expected: str, images: SampleImages, errs: list[str]) -> list[dict]:
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
        return [{"role": "user", "content": images.place(obj[key], key, "user", errs)}]
    return parse_turns(obj[key], key, key == "conversations", images, errs)


DISTILL_FORMAT = (
    'expected prompts like {"messages": [{"role": "user", "content": "..."}]}, optionally with the reply as the last, '
    'assistant turn, or {"prompt": "...", "completion": "..."} (completion optional)'
)


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


def _parse_sft(obj: dict, base_dir: Path, errs: list[str]) -> tuple[list[dict], list[dict] | None]:
    if _wrong_kind(obj, SFT_FORMAT, errs):
        return [], None
    before = len(errs)
    images = SampleImages(obj, base_dir, errs)
    messages = _pick(obj, ("conversations", "messages"), SFT_FORMAT, images, errs)
    images.check_count(errs)
    if len(errs) == before and not any(m["role"] == "assistant" for m in messages):
        errs.append("no assistant turn, so nothing to learn from; SFT data needs at least one")
    return messages, parse_tools(obj, errs)


PROMPT_KEYS = ("conversations", "messages", "prompt")


def _parse_prompt(obj: dict, base_dir: Path, errs: list[str]) -> tuple[list[dict], list[dict] | None, dict]:
    if _wrong_kind(obj, PROMPT_FORMAT, errs):
        return [], None, {}
    before = len(errs)
    images = SampleImages(obj, base_dir, errs)
    messages = _pick(obj, PROMPT_KEYS, PROMPT_FORMAT, images, errs)
    images.check_count(errs)
    if len(errs) == before:
        _ends_with_user(messages, next(k for k in PROMPT_KEYS if k in obj), errs)
    columns = {k: v for k, v in obj.items() if k not in PROMPT_KEYS + ("id", "tools", "images")}
    return messages, parse_tools(obj, errs), columns


@dataclass
class UnpairedReply:
    """One reply labelled desirable or not (KTO's data): no second reply to compare it with."""

    id: str
    prompt: list[dict]  # messages, the last one a user turn (or a tool result)
    reply: list[dict]  # the assistant message(s) continuing the prompt (normally one)
    desirable: bool
    source: str
    tools: list[dict] | None = None

    @property
    def messages(self) -> list[dict]:
        return self.prompt + self.reply


@dataclass
class PromptAndReply:
    """A prompt and, where the data has one, its reply (distillation's data: the student answers the prompt)."""

    id: str
    prompt: list[dict]  # messages, the last one a user turn (or a tool result)
    reply: list[dict]  # the assistant message(s) continuing the prompt; [] if the data has none
    source: str
    tools: list[dict] | None = None

    @property
    def messages(self) -> list[dict]:
        return self.prompt + self.reply


def _reply(obj: dict, key: str, seed: bool, images: SampleImages, errs: list[str]) -> list[dict]:
    """chosen/rejected: a string, or a list of assistant messages."""
    value = obj[key]
    if isinstance(value, str):
        if not value.strip():
            errs.append(f"{key} is empty")
        return [{"role": "assistant", "content": images.place(value, key, "assistant", errs)}]
    if not isinstance(value, list):
        errs.append(f"{key} is {show(value)}; expected a string or a list of assistant messages")
        return []
    messages = parse_turns(value, key, seed, images, errs)
    for i, m in enumerate(messages):
        if m["role"] not in (None, "assistant"):
            errs.append(f"{key}[{i}] is a {m['role']} turn; {key} must hold assistant messages only")
    return messages


def _parse_pair(obj: dict, base_dir: Path, errs: list[str]) -> tuple[list[dict], list[dict], list[dict], list[dict] | None]:
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if len(missing) == 2:
        looks = " (this looks like SFT data)" if "conversations" in obj or "messages" in obj else ""
        errs.append(f'missing "chosen" and "rejected"{looks}; {PREFERENCE_FORMAT}')
        return [], [], [], None
    for k in missing:
        errs.append(f'missing "{k}"; {PREFERENCE_FORMAT}')
    keys = ("prompt", "conversations", "messages")
    before = len(errs)
    images = SampleImages(obj, base_dir, errs)
    prompt = _pick(obj, keys, PREFERENCE_FORMAT, images, errs)
    if len(errs) == before:
        _ends_with_user(prompt, next(k for k in keys if k in obj), errs)
    seed = "conversations" in obj
    chosen = _reply(obj, "chosen", seed, images, errs) if "chosen" in obj else []
    rejected = _reply(obj, "rejected", seed, images, errs) if "rejected" in obj else []
    images.check_count(errs)
    if chosen and chosen == rejected:  # nothing to prefer: the pair would train on noise
        errs.append('"chosen" and "rejected" are the same reply; a pair needs two different replies')
    return prompt, chosen, rejected, parse_tools(obj, errs)


def _parse_unpaired(obj: dict, base_dir: Path, errs: list[str]) -> tuple[list[dict], list[dict], bool, list[dict] | None]:
    """{"messages": [..., assistant], "label": bool} (the trailing assistant turns are the reply), or TRL's
    {"prompt": ..., "completion": ..., "label": bool}."""
    if "chosen" in obj or "rejected" in obj:
        errs.append('this is a preference pair (it has "chosen"/"rejected"): train on pairs with qwen-tune dpo, orpo '
                    f"or simpo; {UNPAIRED_FORMAT}")
        return [], [], False, None
    label = obj.get("label")
    if "label" not in obj:
        errs.append(f'missing "label"; {UNPAIRED_FORMAT}')
    elif not isinstance(label, bool):
        errs.append(f"label is {show(label)}; expected true (a desirable reply) or false (an undesirable one)")
    images = SampleImages(obj, base_dir, errs)
    prompt, reply = _prompt_and_reply(obj, images, UNPAIRED_FORMAT, 'the reply that "label" judges', errs)
    images.check_count(errs)
    return prompt, reply, label is True, parse_tools(obj, errs)


def _prompt_and_reply(obj: dict, images: SampleImages, expected: str, missing_reply: str | None,
                      errs: list[str]) -> tuple[list[dict], list[dict]]:
    """(prompt, reply) of {"messages": [..., assistant]} (the trailing assistant turns are the reply) or TRL's
    {"prompt": ..., "completion": ...}; `missing_reply`: what the missing reply would have been (None: the reply is
    optional, and a prompt ending with a user turn has none)."""
    before = len(errs)
    if "completion" in obj or "prompt" in obj:
        keys = PROMPT_KEYS
        prompt = _pick(obj, keys, expected, images, errs)
        if len(errs) == before:
            _ends_with_user(prompt, next(k for k in keys if k in obj), errs)
        if "completion" in obj:
            return prompt, _reply(obj, "completion", "conversations" in obj, images, errs)
        if missing_reply is not None:
            errs.append(f'missing "completion", {missing_reply}; {expected}')
        return prompt, []
    messages = _pick(obj, ("conversations", "messages"), expected, images, errs)
    start = next((i + 1 for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] != "assistant"), 0)
    prompt, reply = messages[:start], messages[start:]
    if len(errs) == before and not reply and missing_reply is not None:
        key = next(k for k in ("conversations", "messages") if k in obj)
        errs.append(f"{key} ends with a {messages[-1]['role'] if messages else 'user'} turn; {missing_reply} is the "
                    "assistant turn at the end")
    elif len(errs) == before and not prompt:
        errs.append("no turn before the assistant's; the reply needs a prompt to answer")
    return prompt, reply


def _parse_distill(obj: dict, base_dir: Path, errs: list[str]) -> tuple[list[dict], list[dict], list[dict] | None]:
    """A prompt, with or without a reply: {"messages": [...]} ending with a user turn or with the assistant's reply,
    or {"prompt": ..., "completion": ...} (completion optional)."""
    if _wrong_kind(obj, DISTILL_FORMAT, errs):
        return [], [], None
    for key in ("label", "answer"):
        if key in obj:
            errs.append(f'unknown field "{key}"; {DISTILL_FORMAT}')
    images = SampleImages(obj, base_dir, errs)
    prompt, reply = _prompt_and_reply(obj, images, DISTILL_FORMAT, None, errs)
    images.check_count(errs)
    return prompt, reply, parse_tools(obj, errs)


# ---------------------------------------------------------------- loading


def _validate(path, parse, expected: str, seen: dict, problems: list[str]) -> Iterator[tuple[str, object, str]]:
    """(id, parsed, source) for each valid record of one file, as it is read; its problems go to `problems`, its ids
    to `seen`. `sample N` and default ids count records from 0 within their file (blank JSONL lines are not records).
    """
    in_list = data_suffix(path) in (".json", ".json.gz")
    # relative image paths start at the data file's directory (a cached dataset's: its snapshot)
    base_dir = path.base_dir if isinstance(path, HubDataset) else path.parent
    invalid: list[str] = []  # listed after what reading the file found, as when files were read whole
    for index, (line, obj) in enumerate(iter_records(path, problems)):
        source = f"{path}:{line}"
        raw_id = obj.get("id") if isinstance(obj, dict) else None
        valid_id = type(raw_id) is int or (isinstance(raw_id, str) and bool(raw_id.strip()))
        sid = str(raw_id) if valid_id else f"{record_stem(path)}-{index}"
        tags = ([f"sample {index}"] if in_list else []) + ([f'id "{sid}"'] if valid_id else [])
        where = source + (f" ({', '.join(tags)})" if tags else "")
        errs: list[str] = []
        if not isinstance(obj, dict):
            errs.append(f"sample is {show(obj)}, not an object; {expected}")
        else:
            if raw_id is not None and not valid_id:
                errs.append(f"id is {show(raw_id)}; expected a non-empty string or an integer")
            parsed = parse(obj, base_dir, errs)
        if sid in seen:
            errs.append(f'duplicate id "{sid}" (first at {seen[sid]})')
        seen.setdefault(sid, source)
        invalid += [f"{where}: {e}" for e in errs]
        if not errs:
            yield sid, parsed, source
    problems += invalid


def stream(sources: list, parse, expected: str, problems: list[str]) -> Iterator[tuple[int, tuple[str, object, str]]]:
    """(source number, (id, parsed, where)) for each valid record of `sources` (see files.resolve_sources), one at a
    time; every problem goes to `problems`. Raise `data_error(...)` once it is exhausted if there were any."""
    seen: dict = {}
    for k, item in enumerate(sources):
        for path in item.files:
            for sample in _validate(path, parse, expected, seen, problems):
                yield k, sample


def data_error(problems: list[str], sources: list, max_problems: int = 20) -> DataError:
    """One DataError listing the problems (the first `max_problems`), saying how table rows count if one is cited."""
    tables = [str(f) for s in sources for f in s.files if located_by_row(f)]
    by_row = any(p.startswith(t + ":") for p in problems for t in tables)
    return DataError(problems[:max_problems], total=len(problems), note="table rows count from 1" if by_row else "")


def _load(paths, parse, expected: str, max_problems: int, seed: int = 0,
          log: Callable[[str], None] | None = None) -> list[tuple[str, object, str]]:
    """Validate every record of every file: (id, parsed, source) for each, or one DataError with all problems.

    A weighted `--data_path` (`a.jsonl:0.7,b.parquet:0.3`) is then mixed (see mixture.py) with `seed`, and
    `log` receives the lines saying what the mixture took from each source. Unweighted: every sample, in order.
    """
    problems: list[str] = []
    items = resolve_sources(paths)
    sources = [(str(item.path), item.weight, []) for item in items]
    for k, sample in stream(items, parse, expected, problems):
        sources[k][2].append(sample)
    if problems:
        raise data_error(problems, items, max_problems)
    if sources[0][1] is None:
        return [sample for _, _, samples in sources for sample in samples]
    mixture, lines = mix(sources, seed)
    if log:
        for line in lines:
            log(line)
    return mixture


def load_conversations(paths, max_problems: int = 20, *, seed: int = 0,
                       log: Callable[[str], None] | None = None) -> list[Conversation]:
    """SFT data: conversations with at least one assistant turn (seed or OpenAI format).
    `seed`, `log`: for a weighted mixture only (see `_load`)."""
    loaded = _load(paths, _parse_sft, SFT_FORMAT, max_problems, seed, log)
    return [Conversation(i, m, s, t) for i, (m, t), s in loaded]


def stream_conversations(sources: list, problems: list[str]) -> Iterator[tuple[int, Conversation]]:
    """(source number, conversation) for each valid SFT sample of `sources` (files.resolve_sources), one at a time;
    problems go to `problems` (raise `data_error` once it is exhausted)."""
    for k, (sid, (messages, tools), where) in stream(sources, _parse_sft, SFT_FORMAT, problems):
        yield k, Conversation(sid, messages, where, tools)


def check_conversations(paths, max_problems: int = 20) -> None:
    """Validate SFT data without keeping it (one DataError with every problem); a tokens directory is checked when used."""
    if isinstance(paths, str) and "," not in paths and is_tokens_dir(paths):
        return
    problems: list[str] = []
    sources = resolve_sources(paths)
    for _ in stream_conversations(sources, problems):
        pass
    if problems:
        raise data_error(problems, sources, max_problems)


def load_prompts(paths, max_problems: int = 20, *, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> list[Conversation]:
    """RL prompts: conversations that end with a user turn or a tool result (the policy writes the reply);
    the record's other fields are kept as `columns` (reward functions receive them)."""
    loaded = _load(paths, _parse_prompt, PROMPT_FORMAT, max_problems, seed, log)
    return [Conversation(i, m, s, t, c) for i, (m, t, c), s in loaded]


def load_preference_pairs(paths, max_problems: int = 20, *, seed: int = 0,
                          log: Callable[[str], None] | None = None) -> list[PreferencePair]:
    """Preference pairs, Qwen-style (conversations + chosen/rejected text) or TRL-style (prompt/chosen/rejected)."""
    loaded = _load(paths, _parse_pair, PREFERENCE_FORMAT, max_problems, seed, log)
    return [PreferencePair(i, prompt, chosen, rejected, s, tools) for i, (prompt, chosen, rejected, tools), s in loaded]


def load_distill_prompts(paths, max_problems: int = 20, *, seed: int = 0, reply_needed: str | None = None,
                         log: Callable[[str], None] | None = None) -> list[PromptAndReply]:
    """Distillation's prompts, each with the dataset's reply if it has one; `reply_needed`: why every sample needs one
    (off-policy batches train on the dataset's replies), or None."""
    loaded = _load(paths, _parse_distill, DISTILL_FORMAT, max_problems, seed, log)
    if reply_needed:
        missing = [f"{s}: no reply (the assistant turn at the end, or \"completion\"); {reply_needed}"
                   for _, (_, reply, _), s in loaded if not reply]
        if missing:
            raise DataError(missing[:max_problems], total=len(missing))
    return [PromptAndReply(i, prompt, reply, s, tools) for i, (prompt, reply, tools), s in loaded]


def load_unpaired(paths, max_problems: int = 20, *, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> list[UnpairedReply]:
    """Replies labelled desirable (true) or undesirable (false), KTO's data; both kinds must be present."""
    loaded = _load(paths, _parse_unpaired, UNPAIRED_FORMAT, max_problems, seed, log)
    labels = {desirable for _, (_, _, desirable, _), _ in loaded}
    if len(labels) == 1:
        kind = "true (desirable)" if labels.pop() else "false (undesirable)"
        raise DataError([f"{paths}: every sample is labelled {kind}; KTO learns from the contrast, so it needs both "
                         "desirable (true) and undesirable (false) replies"])
    return [UnpairedReply(i, prompt, reply, desirable, s, tools) for i, (prompt, reply, desirable, tools), s in loaded]


def load_tools(path) -> list[dict]:
    """A tools file (`chat --tools`): a JSON list, or JSONL, of function definitions, each checked as a data file's
    `tools` are (OpenAI's {"type": "function", "function": {...}} or the bare function); every problem names its line."""
    problems: list[str] = []
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a JSON list of tool definitions)")
    tools, first_line = [], {}
    for i, (line, obj) in enumerate(iter_records(path, problems)):
        errs: list[str] = []
        tool = parse_tool(obj, f"tools[{i}]", errs)
        name = tool["function"]["name"] if tool else None
        if name in first_line:  # the model could not tell the two apart
            errs.append(f'tools[{i}] is a second function named "{name}" (the first is at line {first_line[name]})')
        if name is not None:
            first_line.setdefault(name, line)
        problems += [f"{path}:{line}: {e}" for e in errs]
        tools.append(tool)
    if problems:
        raise DataError(problems[:20], total=len(problems))
    return tools


def detect_kind(paths) -> str:
    """"preference" if the first record has chosen/rejected, else "sft" (lets `score` pick a loader)."""
    problems: list[str] = []
    first = next(iter_records(resolve_files(paths)[0], problems), None)
    if first is None:
        raise DataError(problems)
    obj = first[1]
    return "preference" if isinstance(obj, dict) and ("chosen" in obj or "rejected" in obj) else "sft"
