"""A model's reply read back as a message: content, reasoning and tool calls, by the parser that TRL pairs with each
official chat template (`add_response_schema`, read by transformers' `parse_response`).

Qwen templates write a call in one of two ways: Qwen2.5 / Qwen3 as JSON in `<tool_call>...</tool_call>` (Hermes), Qwen3.5+
(and Qwen3-Coder) as `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...`. A template TRL does not know word
for word (a checkpoint's own revision, a custom file) is parsed like the official template that writes calls its way.
"""

from __future__ import annotations

import copy

from ..errors import UserError
from .chat_format import ChatFormat
from .templates import official_templates

# how a template writes a tool call -> an official template that writes it so (the first mark found wins)
CALL_STYLES = (("<function=", "qwen3_8"), ("<tool_call>", "qwen3"))
PROBE_CALL = [{"role": "user", "content": "q"},
              {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}]


class ReplyParser:
    """Reads replies written in `fmt`'s template; `parse` needs the prompt text the reply continues."""

    def __init__(self, fmt: ChatFormat):
        from trl.chat_template_utils import add_response_schema

        self.tokenizer = copy.copy(fmt.tokenizer)  # carries the parser; the run's tokenizer stays as it is
        try:
            add_response_schema(self.tokenizer)
        except ValueError:  # not an official template word for word: parse as the one that writes calls the same way
            written = fmt.render(PROBE_CALL)
            style = next((name for mark, name in CALL_STYLES if mark in written), None)
            if style is None:
                raise UserError(f"the chat template ({fmt.name}) writes tool calls in no format qwen-tune can read "
                                "(<tool_call>{json}</tool_call> or <tool_call><function=...>); choose --chat_template "
                                "qwen3 or qwen3_8, or the one your model is served with") from None
            self.tokenizer.chat_template = official_templates()[style].read_text(encoding="utf-8")
            add_response_schema(self.tokenizer)

    def parse(self, reply: str, prompt: str, tools: list | None) -> tuple[dict, str | None]:
        """(the reply as a message, None), or, when its tool call cannot be read, (the text as content, why)."""
        try:
            message = self.tokenizer.parse_response(reply, prefix=prompt, tools=tools)
        except ValueError as e:
            return {"role": "assistant", "content": reply}, str(e).strip().splitlines()[0]
        return {"role": "assistant", "content": ""} | message, None  # a call-only reply has content "", as in data
