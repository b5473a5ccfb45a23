"""One conversation's turns, validated and normalised to OpenAI messages (seed `from`/`value` turns,
`function_call` / `observation`, tool calls with parsed arguments, `tools`, images); each problem names where.

A message's content is a string, or, when it carries an image, a list of `{"type": "text", "text": ...}` and
`{"type": "image", "image": REF}` blocks (the Hugging Face chat-template form; REF an absolute path or a data URI).
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import show
from .images import ImageError, resolve_image

SEED_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "human": "user", "gpt": "assistant",
              "function_call": "assistant", "observation": "tool", "tool": "tool"}

MESSAGE_FIELDS = {
    "user": ("role", "content"),
    "assistant": ("role", "content", "tool_calls", "reasoning_content"),
    "system": ("role", "content"),
    "tool": ("role", "content", "name", "tool_call_id"),
}
SEED_TURN_FIELDS = ("from", "value", "reasoning_content")
BLOCK_FIELDS = {"text": ("type", "text"), "image": ("type", "image", "path", "url"), "image_url": ("type", "image_url")}
BLOCK_EXAMPLE = '{"type": "text", "text": "..."} or {"type": "image", "image": "path"}'
IMAGE_EXAMPLES = {"image": '{"type": "image", "image": "path"}',
                  "image_url": '{"type": "image_url", "image_url": {"url": "path"}}'}
NO_IMAGES = {"assistant": "an assistant turn cannot carry an image: the model only generates text",
             "system": "the Qwen chat templates refuse images in the system turn; put it in a user turn"}
PLACEHOLDER = "<image>"
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


class SampleImages:
    """A sample's images: references resolve from its data file's directory, and its top-level `images` list
    (ShareGPT / LLaMA-Factory form) is given out in order to the `<image>` placeholders of its turns' text."""

    def __init__(self, obj: dict, base_dir: Path, errs: list[str]):
        self.base_dir = base_dir
        self.listed: list[str | None] | None = None  # resolved, None where a reference is bad
        self.placed = 0
        if "images" in obj:
            if isinstance(obj["images"], list):
                self.listed = [self.resolve(ref, f"images[{i}]", errs) for i, ref in enumerate(obj["images"])]
            else:
                errs.append(f"images is {show(obj['images'])}; expected a list of image paths, one per <image> in the text")

    def resolve(self, ref, at: str, errs: list[str]) -> str | None:
        """The reference as messages keep it, or None after naming the problem at `at`."""
        try:
            return resolve_image(ref, self.base_dir)
        except ImageError as e:
            errs.append(f"{at} is {show(ref)}: {e}")
            return None

    def place(self, text: str, at: str, role: str, errs: list[str]) -> str | list[dict]:
        """Text whose `<image>` placeholders take the listed images, as blocks (empty text left out, the rest byte
        for byte); without placeholders, or in a sample with no `images` list, the text as it is."""
        if self.listed is None or PLACEHOLDER not in text:
            return text
        if role in NO_IMAGES:
            errs.append(f"{at} has an {PLACEHOLDER} placeholder in {_a(role)} turn; {NO_IMAGES[role]}")
        blocks = []
        for i, piece in enumerate(text.split(PLACEHOLDER)):
            if i:
                ref = self.listed[self.placed] if self.placed < len(self.listed) else None
                self.placed += 1
                if ref:
                    blocks.append({"type": "image", "image": ref})
            if piece:
                blocks.append({"type": "text", "text": piece})
        return blocks

    def check_count(self, errs: list[str]) -> None:
        """One listed image per placeholder: a missing or extra one means the text and the pictures disagree."""
        if self.listed is None or self.placed == len(self.listed):
            return
        listed = f"images lists {_count(len(self.listed), 'image')}"
        if not self.placed:
            errs.append(f"{listed} but no turn has an {PLACEHOLDER} placeholder; put {PLACEHOLDER} in the user's text "
                        "where each image goes")
        else:
            errs.append(f"{listed} but the turns have {_count(self.placed, PLACEHOLDER + ' placeholder')}; "
                        f"each {PLACEHOLDER} takes the next image of the list")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _block(block, at: str, role: str, images: SampleImages, errs: list[str]) -> dict | None:
    """One content block as `{"type": "text", "text"}` or `{"type": "image", "image": REF}` (from HF's image / path
    / url keys or OpenAI's image_url); unknown types and fields are errors, never dropped."""
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        errs.append(f"{at} is {show(block)}; expected a block like {BLOCK_EXAMPLE}")
        return None
    kind = block["type"]
    if kind in ("video", "video_url"):
        errs.append(f"{at} is a video; video is not supported yet (images are)")
        return None
    if kind not in BLOCK_FIELDS:
        errs.append(f"{at}.type is {show(kind)}; expected one of {', '.join(BLOCK_FIELDS)}")
        return None
    for k in block:
        if k not in BLOCK_FIELDS[kind]:
            errs.append(f"{at} has an unknown field \"{k}\" for {_a(kind)} block; {_a(kind)} block has "
                        f"{', '.join(BLOCK_FIELDS[kind])}")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            errs.append(f"{at}.text is {show(block.get('text'))}; expected a string")
            return None
        return {"type": "text", "text": block["text"]}
    keys = [k for k in BLOCK_FIELDS[kind][1:] if k in block]
    if len(keys) != 1:
        errs.append(f"{at} has both {' and '.join(map(json.dumps, keys))}; use one" if keys else
                    f"{at} has no \"{BLOCK_FIELDS[kind][1]}\"; expected {IMAGE_EXAMPLES[kind]}")
        return None
    ref, ref_at = block[keys[0]], f"{at}.{keys[0]}"
    if kind == "image_url" and isinstance(ref, dict):  # OpenAI: {"url": ...}
        for k in ref:
            if k != "url":
                errs.append(f'{ref_at} has an unknown field "{k}"; expected {{"url": "..."}}')
        ref, ref_at = ref.get("url"), f"{ref_at}.url"
    if role in NO_IMAGES:
        errs.append(f"{at} is an image in {_a(role)} turn; {NO_IMAGES[role]}")
    ref = images.resolve(ref, ref_at, errs)
    return {"type": "image", "image": ref} if ref else None


def _blocks(value: list, at: str, role: str, images: SampleImages, errs: list[str]) -> str | list[dict]:
    """A content list as blocks; one without an image as the text it renders (every Qwen template joins text blocks
    with nothing between), so text keeps one form however it was written and a list always carries an image."""
    blocks = [_block(block, f"{at}[{i}]", role, images, errs) for i, block in enumerate(value)]
    blocks = [b for b in blocks if b]
    if any(b["type"] == "image" for b in blocks):
        return blocks
    return "".join(b["text"] for b in blocks)


def _message(turn: dict, at: str, images: SampleImages, errs: list[str]) -> dict:
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
    may_be_empty = bool(message.get("tool_calls")) or role == "tool"
    before = len(errs)
    if "content" not in turn and not message.get("tool_calls"):
        errs.append(f'{at} has no "content"; expected an object like {{"role": "user", "content": "..."}}')
    elif isinstance(content, list):
        content = _blocks(content, f"{at}.content", role, images, errs)
        if len(errs) == before and isinstance(content, str) and not content.strip() and not may_be_empty:
            errs.append(f"{at}.content has no text and no image")
    elif not isinstance(content, str):
        errs.append(f"{at}.content is {show(content)}; expected a string or a list of blocks like {BLOCK_EXAMPLE}")
    elif not content.strip() and not may_be_empty:
        errs.append(f"{at}.content is empty")
    else:
        content = images.place(content, f"{at}.content", role, errs)
    message["content"] = content if isinstance(content, (str, list)) else ""
    for key in ("reasoning_content", "name", "tool_call_id"):
        if key in turn and key in MESSAGE_FIELDS[role]:
            if not isinstance(turn[key], str):
                errs.append(f"{at}.{key} is {show(turn[key])}; expected a string")
            message[key] = turn[key]
    return message


def _seed_turns(turn: dict, at: str, previous: dict | None, images: SampleImages, errs: list[str]) -> list[dict]:
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
    else:
        message["content"] = images.place(value, f"{at}.value", role, errs)
    if "reasoning_content" in turn:
        if role != "assistant" or not isinstance(turn["reasoning_content"], str):
            errs.append(f"{at}.reasoning_content must be a string on an assistant turn")
        message["reasoning_content"] = turn["reasoning_content"]
    return [message]


def parse_turns(value, field: str, seed: bool, images: SampleImages, errs: list[str]) -> list[dict]:
    """Validate a list of turns; return them as OpenAI / HF messages (roles normalised, text byte for byte, images
    as content blocks)."""
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
            out += _seed_turns(turn, at, out[-1] if out else None, images, errs)
        else:
            out.append(_message(turn, at, images, errs))
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
    tools = [parse_tool(tool, f"tools[{i}]", errs) for i, tool in enumerate(value)]
    return [tool for tool in tools if tool is not None]


def parse_tool(tool, at: str, errs: list[str]) -> dict | None:
    """One function definition in OpenAI's form (a bare function gets the wrapper), or None after naming the problem."""
    if isinstance(tool, dict) and "function" not in tool and "name" in tool:
        tool = {"type": "function", "function": tool}
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict) or not tool["function"].get("name"):
        errs.append(f'{at} is {show(tool)}; expected {{"type": "function", "function": {{"name": "...", '
                    '"description": "...", "parameters": {...}}}')
        return None
    return tool
