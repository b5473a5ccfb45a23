"""The page's chat: `qwen-tune chat` (tools/chat.py) with the conversation kept by the page and sent with each turn.
One model is loaded at a time, as chat loads it (full, merged or a LoRA output on its base)."""

from __future__ import annotations

import threading

from ..errors import UserError
from ..options import FormatOptions, set_chat_format
from .roots import Roots

MAX_NEW_TOKENS = 256
ROLES = ("user", "assistant", "tool")
_loaded: dict[str, tuple] = {}  # model path -> (model, tokenizer); one at a time
_lock = threading.Lock()  # one reply at a time: the model is not shared between threads


def load(roots: Roots, body: dict) -> dict:
    path = _model_path(roots, body)
    with _lock:
        _, tokenizer = _model(path)
    template = tokenizer.chat_template or ""
    return {"ok": True, "model": path or "the embedded model", "thinking": "enable_thinking" in template,
            "tools": "tools" in template}


def answer(roots: Roots, body: dict) -> dict:
    """The model's reply to the page's conversation plus the new user text, as a message (tool calls read back)."""
    from ..tools.chat import Chat

    path = _model_path(roots, body)
    text = (body.get("text") or "").strip()
    if not text:
        raise UserError("type a message")
    history = _history(body.get("messages") or [])
    tools = _tools(body.get("tools") or "")
    thinking = body.get("thinking")
    options = FormatOptions(system_message=(body.get("system") or None),
                            enable_thinking=thinking if isinstance(thinking, bool) else None)
    with _lock:
        model, tokenizer = _model(path)
        fmt = set_chat_format(tokenizer, options, source=path or "the embedded model")
        if tools and (missing := fmt.problems([{"role": "user", "content": text}], tools)):
            raise UserError(f"tools: the conversation {missing[0]}")
        chat = Chat(model, tokenizer, fmt, int(body.get("max_new_tokens") or MAX_NEW_TOKENS), 0.0, tools)
        chat.messages = history
        message = chat.answer(text, stream=False)
    return {"ok": True, "message": _with_reasoning(message)}


def _model_path(roots: Roots, body: dict) -> str | None:
    value = (body.get("model") or "").strip()
    return roots.model(value, "model") if value else None


def _model(path: str | None):
    from ..tools.chat import load_for_inference

    if path not in _loaded:
        _loaded.clear()
        _loaded[path] = load_for_inference(path)
    return _loaded[path]


def _history(messages: list) -> list[dict]:
    """The page's conversation so far, each turn checked (it came over the network)."""
    history = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content", ""), str):
            raise UserError(f"messages[{i}]: expected a user, assistant or tool turn with text content")
        history.append({k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "reasoning_content")})
    return history


def _tools(text: str) -> list[dict] | None:
    """Tool definitions typed into the page (a JSON list of functions), checked as a data file's `tools` are."""
    from ..data.messages import parse_tools

    if not text.strip():
        return None
    problems: list[str] = []
    tools = parse_tools({"tools": text}, problems)
    if problems:
        raise UserError("tools: " + "; ".join(problems))
    return tools


def _with_reasoning(message: dict) -> dict:
    """A reply's `<think>...</think>` as reasoning_content, as the tool-call parser returns it."""
    content = message.get("content") or ""
    if "reasoning_content" not in message and "</think>" in content:
        reasoning, _, content = content.partition("</think>")
        message = {**message, "reasoning_content": reasoning.replace("<think>", "").strip(), "content": content.strip()}
    return message
