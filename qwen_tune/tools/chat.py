"""`qwen-tune chat --model OUT`: talk to a trained model, streamed, multi-turn; `--prompt TEXT` for scripts.

Loads a full or merged model, or a LoRA output directory (adapter_config.json) on its base, as its own class
(models/trained.load_trained). Prompts are rendered by the chat template saved with the model (the one
training used), so the model sees exactly the layout it learned; generation stops at `<|im_end|>`.
In the REPL: /reset forgets the conversation, /system TEXT sets the system message (and resets), /exit quits.
`--tools FILE`: the functions are rendered by the template as training renders a conversation's `tools`, and the tool
calls of each reply are read back (data/replies.py) and shown as JSON; in the REPL, /tool TEXT answers them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from ..errors import UserError
from ..options import FormatOptions, Method, load, set_chat_format
from ..options.groups import Frozen
from ..options.tools import TrustOptions

HELP = "commands: /reset (new conversation), /system TEXT (set the system message and reset), /exit (or Ctrl-D)"
TOOL_HELP = "/tool TEXT (a tool's result: the model answers it)"


def load_for_inference(path: str, trust_remote_code: bool = False):
    """(model, tokenizer) from a full/merged model directory or a LoRA adapter directory; eval mode, no grads."""
    import torch

    from ..models.trained import load_trained
    from ..models.model import is_adapter, resolve_model_path
    from ..models.tokenizer import load_tokenizer

    if not is_adapter(path):
        path = resolve_model_path(path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)  # checks the checkpoint first
    model = load_trained(path, trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    torch.set_grad_enabled(False)
    return model, tokenizer


class Chat:
    """One conversation: its messages, the system message, and how to answer the next user turn."""

    def __init__(self, model, tokenizer, fmt, max_new_tokens: int, temperature: float, tools: list[dict] | None = None):
        from ..models.tokenizer import ENDOFTEXT, IM_END

        self.model, self.tokenizer, self.format, self.tools = model, tokenizer, fmt, tools
        self.stop_ids = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.messages: list[dict] = []
        self.replies = None
        if tools:
            from ..data.replies import ReplyParser

            self.replies = ReplyParser(fmt)

    def set_system(self, text: str) -> None:
        self.format.system_message = text
        self.messages = []

    def prompt_ids(self) -> list[int]:
        """What the model is given for its next turn: the conversation and the tools, rendered by the template."""
        return self.format.prompt_ids(self.messages, self.tools)

    def answer(self, text: str, stream: bool, images: tuple[str, ...] = (), role: str = "user") -> dict:
        """The reply as a message (with --tools: its tool calls read back). `images`: pictures the user turn shows,
        before its text (a vision-language model); `role` "tool": `text` is a tool's result."""
        import torch
        from transformers import TextStreamer

        from ..data.images import image_refs

        content = [{"type": "image", "image": ref} for ref in images] + [{"type": "text", "text": text}] if images else text
        self.messages.append({"role": role, "content": content})
        ids = torch.tensor([self.prompt_ids()])
        refs = image_refs(self.messages)
        pictures = self.format.images.model_inputs(ids, refs) if refs else {}
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
            eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[1],
            streamer=streamer, top_p=None, top_k=None, **sampling, **pictures,
        )
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        message = {"role": "assistant", "content": reply}
        if self.replies is not None:
            prompt = self.format.render(self.messages, self.tools, add_generation_prompt=True)
            message, why = self.replies.parse(reply, prompt, self.tools)
            if why:
                print(f"(the reply's tool call could not be read, {why}; it is kept as text)", file=sys.stderr, flush=True)
        self.messages.append(message)
        return message


def tool_call_lines(message: dict) -> list[str]:
    """Each tool call of a reply as one line of JSON: {"name": ..., "arguments": {...}}."""
    return [json.dumps(call["function"], ensure_ascii=False) for call in message.get("tool_calls") or ()]


def repl(chat: Chat, images: tuple[str, ...] = ()) -> None:
    """`images`: shown with the first message."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    commands = f"{HELP}, {TOOL_HELP}" if chat.tools else HELP
    print(f"qwen-tune chat. {commands}", flush=True)
    while True:
        try:
            line = input("\nuser> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            chat.messages = []
            print("(conversation reset)")
        elif line == "/system" or line.startswith("/system "):
            chat.set_system(line[len("/system"):].strip())
            print(f"(system message set to {chat.format.system_message!r}; conversation reset)")
        elif chat.tools and line.startswith("/tool "):
            print("assistant> ", end="", flush=True)
            show_calls(chat.answer(line[len("/tool "):].strip(), stream=True, role="tool"))
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}; {commands})")
        else:
            print("assistant> ", end="", flush=True)
            show_calls(chat.answer(line, stream=True, images=images if not chat.messages else ()))


def show_calls(message: dict) -> None:
    for line in tool_call_lines(message):
        print(f"tool call> {line}", flush=True)


@dataclass
class ChatOptions(Frozen):
    _argument_group_name = "chat"
    model: str | None = field(default=None, metadata={"help": "An output directory (full, merged or LoRA adapter) or a model (unset: the embedded model)."})
    prompt: str | None = field(default=None, metadata={"help": "Answer this one message, print only the answer, and exit (for scripts)."})
    image: str | None = field(default=None, metadata={"help": "A picture shown with --prompt, or with the first message (a "
                                                               "vision-language model; comma-separated for several)."})
    tools: str | None = field(default=None, metadata={"help": "A JSON file listing functions the model may call (OpenAI's "
                                                               '[{"type": "function", "function": {...}}], or the bare '
                                                               "functions): rendered by the chat template as in training; the "
                                                               "replies' tool calls are shown as JSON."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest answer, in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 = greedy (deterministic)."})


def check_options(values: dict) -> None:
    if values["chat"]["max_new_tokens"] < 1 or values["chat"]["temperature"] < 0:
        raise UserError("--max_new_tokens must be >= 1 and --temperature >= 0")


METHOD = Method("chat", groups={"chat": ChatOptions, "trust": TrustOptions, "format": FormatOptions}, resolve=check_options)


def main(argv: list[str] | None = None) -> None:
    config = load(METHOD, argv)
    a = config.chat
    from ..data.image_inputs import image_inputs_for
    from ..data.read import load_tools

    images = tuple(checked_images(a.image)) if a.image else ()
    tools = load_tools(a.tools) if a.tools else None  # a bad file fails here, line by line, before the model loads
    model, tokenizer = load_for_inference(a.model, config.trust.trust_remote_code)
    pictures = image_inputs_for(a.model, tokenizer, config=model.config) if images and a.model else None
    if images and pictures is None:
        raise UserError(f"--image: {a.model or 'the embedded model'} is not a vision-language model; it reads text only")
    fmt = set_chat_format(tokenizer, config.format, source=a.model or "the embedded model", images=pictures)
    if tools and (missing := fmt.problems([{"role": "user", "content": a.prompt or "q"}], tools)):
        raise UserError(f"--tools {a.tools}: the conversation {missing[0]}")
    chat = Chat(model, tokenizer, fmt, a.max_new_tokens, a.temperature, tools)
    if a.prompt is not None:
        message = chat.answer(a.prompt, stream=False, images=images)
        print(json.dumps(message, ensure_ascii=False) if tools else message["content"])  # with tools: the message, for scripts
        sys.stdout.flush()
    else:
        repl(chat, images)


def checked_images(value: str) -> list[str]:
    """--image's files, each an existing, readable picture (one clear line otherwise)."""
    import os

    from ..data.images import image_size

    paths = [os.path.abspath(p.strip()) for p in value.split(",") if p.strip()]
    for path in paths:
        try:
            image_size(path)
        except (OSError, ValueError) as e:
            raise UserError(f"--image {path}: {'no such file' if not os.path.exists(path) else f'not a readable image ({e})'}") from e
    return paths
