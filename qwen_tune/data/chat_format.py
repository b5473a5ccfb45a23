"""The served format: conversations rendered by the chat template, tokenized, and labelled.

The contract, for any template: `input_ids` are the ids of `tokenizer.apply_chat_template(messages,
tools=tools)`, and the labels supervise what the model generates in each assistant turn: every
token overlapping the text from just after `<|im_start|>assistant\\n` to and including that turn's
`<|im_end|>`. Labels are derived from the rendered text and the tokenizer's offsets, never from a
hand-written copy of a template, so a new Qwen release's template works unchanged.

Two deliberate differences from a plain `apply_chat_template(tokenize=True)`:
- an empty thinking block a template inserts (`<think>\\n\\n</think>\\n\\n`) is in the input but not
  supervised, so data without reasoning does not teach a hybrid model to stop thinking;
- text in a message that spells a special control token (`<|im_end|>`, ...) stays text: strings
  are escaped before rendering, so only the template itself can emit control tokens.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass, field

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from ..models.tokenizer import DEFAULT_SYSTEM_MESSAGE, IM_END, IM_START
from .image_inputs import IMAGE_TOKEN
from .images import image_refs
from .templates import chatml_template, load_template, template_name

IGNORE = -100
ASSISTANT = "assistant\n"  # what follows a template's <|im_start|> in an assistant turn
EMPTY_THINK = re.compile(r"<think>\s*</think>\n\n")
INLINE_THINK = re.compile(r"^\s*<think>(.*?)</think>", re.S)
# Private-use code points stand in for typed control tokens while the template renders.
ESCAPE_BASE = 0xF0000


@dataclass
class Encoded:
    """One tokenized conversation. `turns` are the token ranges [start, end) of each assistant turn's body."""

    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    turns: list[tuple[int, int]] = field(default_factory=list)
    reasoning_not_trained: int = 0  # reasoning blocks the template left out (Qwen3: before the last user turn)
    images: list[str] = field(default_factory=list)  # the images whose tokens are in input_ids, in order
    reply_cut: bool = False  # the cut to max_length took tokens of an assistant turn (it trains on part of a reply)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class ChatFormat:
    """Renders and encodes conversations in one chat template; built once per run by `resolve_format`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str, name: str, description: str,
                 system_message: str | None = None, template_kwargs: dict | None = None, images=None):
        self.tokenizer, self.template, self.name, self.description = tokenizer, template, name, description
        self.images = images  # data.image_inputs.ImageInputs of a vision-language checkpoint, else None
        self.system_message = system_message  # prepended to conversations without a system turn (None: the template decides)
        self.template_kwargs = dict(template_kwargs or {})
        specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
        self.specials = {s: chr(ESCAPE_BASE + i) for i, s in enumerate(specials)}
        self.unescape = {v: k for k, v in self.specials.items()}
        self._special_re = re.compile("|".join(map(re.escape, specials)))
        self._escaped_re = re.compile("[" + "".join(self.unescape) + "]")
        self._split_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        self._starts = {s[:2] for s in specials}  # a cheap test before the regex: most strings hold none
        self._renders: dict[str, bool] = {}

    # ------------------------------------------------------------ rendering

    def messages_for(self, messages: list[dict]) -> list[dict]:
        """The conversation as the template gets it: with `--system_message` added when given and missing."""
        if self.system_message and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.system_message}] + list(messages)
        return list(messages)

    def render(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
        """The text the template makes of a conversation (what a server sends the model)."""
        return self.tokenizer.apply_chat_template(
            self.messages_for(messages), tools=tools or None, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **self.template_kwargs)

    def _escape(self, value):
        """Every string with typed control tokens replaced by private-use stand-ins (restored after rendering)."""
        if isinstance(value, str):
            if any(start in value for start in self._starts):
                return self._special_re.sub(lambda m: self.specials[m.group(0)], value)
            return value
        if isinstance(value, list):
            return [self._escape(v) for v in value]
        if isinstance(value, dict):
            return {k: self._escape(v) for k, v in value.items()}
        return value

    def _pieces(self, messages, tools, add_generation_prompt: bool) -> list[str]:
        """Rendered text split at the template's control tokens: [text, special, text, special, ..., text]."""
        for s in _strings([messages, tools]):
            if self._escaped_re.search(s):
                raise UserError(f"a message contains a private-use character U+{ord(self._escaped_re.search(s).group(0)):X} "
                                "that qwen-tune reserves for escaping control tokens; remove it")
        try:
            text = self.render(self._escape(messages), self._escape(tools), add_generation_prompt)
        except TemplateError as e:  # the template's own raise_exception: a conversation it does not accept
            raise UserError(f"the chat template ({self.name}) refused a conversation: {e} "
                            f"(its first message: {str(messages[0].get('content'))[:60]!r})") from e
        pieces = self._split_re.split(text)
        return [self._escaped_re.sub(lambda m: self.unescape[m.group(0)], p) if i % 2 == 0 else p
                for i, p in enumerate(pieces)]

    def can_render(self, feature: str) -> bool:
        """Whether the template shows a feature at all (probed once with a marker): reasoning, tools, tool_calls, tool_messages."""
        if feature not in self._renders:
            mark = "qwen_tune_probe_marker"
            call = {"type": "function", "function": {"name": mark if feature == "tool_calls" else "f", "arguments": {}}}
            probes = {
                "reasoning": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": mark}], None),
                "tools": ([{"role": "user", "content": "q"}], [{"type": "function", "function": {"name": mark, "parameters": {}}}]),
                "tool_calls": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}], None),
                "tool_messages": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                                   {"role": "tool", "content": mark}], None),
                "images": ([{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": mark}]}], None),
            }
            messages, tools = probes[feature]
            try:
                text = self.render(messages, tools)
                self._renders[feature] = mark in text and (feature != "images" or text.count(IMAGE_TOKEN) == 1)
            except Exception:  # a template may raise on what it does not support
                self._renders[feature] = False
        return self._renders[feature]

    def problems(self, messages: list[dict], tools: list | None) -> list[str]:
        """What in a conversation this template cannot render: an error to show, never a silent drop."""
        has_images = bool(image_refs(messages))
        if has_images and self.images is None:
            return ["has images, which this run cannot use: images train with qwen-tune sft and dpo on a vision-language "
                    "checkpoint (Qwen3.5+, Qwen3-VL, Qwen2.5-VL)"]
        used = {
            "images": has_images,
            "reasoning": any(m.get("reasoning_content") for m in messages),
            "tools": bool(tools),
            "tool_calls": any(m.get("tool_calls") for m in messages),
            "tool_messages": any(m["role"] == "tool" for m in messages),
        }
        what = {"images": "images", "reasoning": "reasoning_content", "tools": "a tools list", "tool_calls": "tool calls",
                "tool_messages": "tool results"}
        missing = [what[f] for f, present in used.items() if present and not self.can_render(f)]
        if not missing:
            return []
        listed = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        them = "them" if len(missing) > 1 else "it"
        return [f"has {listed}, but the chat template ({self.name}) has no place for {them} (it would be silently "
                f"dropped); choose a template that renders {them}, e.g. --chat_template qwen3, or the one your model "
                "is served with"]

    # ------------------------------------------------------------ encoding

    def encode_many(self, conversations: list, ids: list[str] | None = None, max_length: int | None = None) -> list[Encoded]:
        """Encode conversations (objects with `.messages` and `.tools`, or message lists) with labels.

        One batched tokenizer call for all text pieces; samples longer than `max_length` keep their head (flagged).
        """
        items = [_messages_tools(c) for c in conversations]
        rendered = [self._pieces(messages, tools, add_generation_prompt=False) for messages, tools in items]
        cut = [False] * len(rendered)
        if max_length is not None:
            whole = rendered
            rendered, cut = zip(*(self._head(pieces, max_length) for pieces in rendered)) if rendered else ((), ())
            # a reply in text never tokenized (far past max_length) is lost too
            unread = [c and _reply_end(self._assistant_spans(w)) > sum(map(len, h)) for w, h, c in zip(whole, rendered, cut)]
        else:
            unread = cut
        encodings = self._encode_text([p for pieces in rendered for p in pieces[0::2]])
        out, k = [], 0
        for i, pieces in enumerate(rendered):
            n = (len(pieces) + 1) // 2
            encoded_texts = [(e.ids, e.offsets) for e in encodings[k:k + n]]
            k += n
            refs = image_refs(items[i][0]) if self.images is not None else []
            labelled = self._label(ids[i] if ids else str(i), pieces, encoded_texts, items[i][0],
                                   None if refs else max_length, cut[i], unread[i])  # images: cut once expanded
            out.append(self._with_images(labelled, refs, max_length, cut[i], unread[i]) if refs else labelled)
        return out

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """No token is longer than this many characters (a byte-level token's string has one character per byte)."""
        return max(map(len, self.tokenizer.get_vocab()))

    def _head(self, pieces: list[str], max_length: int) -> tuple[list[str], bool]:
        """The rendered pieces a sample of `max_length` tokens can reach, and whether any were cut. A token covers at
        most `longest_token_chars` characters, so text beyond twice that per token (plus a margin) is never reached:
        it is not tokenized, and a 50 MB line costs what its head costs. The head's tokens are unchanged."""
        budget, total = 2 * max_length * self.longest_token_chars + 4096, 0
        for i, piece in enumerate(pieces):
            total += len(piece)
            if total > budget:
                return (pieces[:i] if i % 2 else pieces[:i] + [piece[: len(piece) - (total - budget)]]), True
        return pieces, False

    def _encode_text(self, texts: list[str]):
        """Plain text (between the template's control tokens) -> `tokenizers.Encoding`s, in one batched Rust call.

        Special tokens in the text stay text (`encode_special_tokens`, as transformers' split_special_tokens sets it);
        non-special added tokens (`<tool_call>`, `<think>`) keep their single ids.
        """
        backend = self.tokenizer.backend_tokenizer
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return backend.encode_batch(texts, add_special_tokens=False)
        finally:
            backend.encode_special_tokens = before

    def encode(self, messages: list[dict], tools: list | None = None, max_length: int | None = None) -> Encoded:
        return self.encode_many([(messages, tools)], max_length=max_length)[0]

    def _label(self, sample_id, pieces, encoded_texts, messages, max_length, cut: bool = False,
               reply_unread: bool = False) -> Encoded:
        """Join the pieces' ids with their character spans in the rendered text; supervise what overlaps an assistant body.
        `reply_unread`: `pieces` are a head that leaves out (part of) an assistant turn."""
        input_ids, starts, ends = [], [], []
        text, pos = [], 0
        for i, piece in enumerate(pieces):
            if i % 2:  # a control token the template wrote
                input_ids.append(self.tokenizer.convert_tokens_to_ids(piece))
                starts.append(pos)
                ends.append(pos + len(piece))
            else:
                ids, offsets = encoded_texts[i // 2]
                input_ids += ids
                starts += [pos + a for a, _ in offsets]
                ends += [pos + b for _, b in offsets]
            text.append(piece)
            pos += len(piece)
        full = "".join(text)
        spans = self._assistant_spans(pieces, open_end=cut)
        labels = [IGNORE] * len(input_ids)
        turns = []
        for body_start, body_end in spans:
            think = EMPTY_THINK.match(full, body_start, body_end)
            supervised_start = think.end() if think else body_start
            first = bisect.bisect_right(ends, body_start)  # first token ending after the body starts
            sup_first = bisect.bisect_right(ends, supervised_start)
            last = bisect.bisect_left(starts, body_end)  # tokens starting before the body ends
            for t in range(sup_first, last):
                labels[t] = input_ids[t]
            turns.append((first, last))
        not_trained = _reasoning_not_trained(messages, [full[a:b] for a, b in spans])
        truncated = max_length is not None and len(input_ids) > max_length
        reply_cut = truncated and (reply_unread or any(b > max_length for _, b in turns))
        if truncated:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            turns = [(a, min(b, max_length)) for a, b in turns if a < max_length]
        return Encoded(sample_id, input_ids, labels, truncated, turns, not_trained, reply_cut=reply_cut)

    def _with_images(self, e: Encoded, refs: list[str], max_length: int | None, cut: bool,
                     reply_unread: bool = False) -> Encoded:
        """Each image's one `<|image_pad|>` expanded to its token count, as the Qwen-VL processors do (never supervised:
        images are only in user and tool turns). A sample longer than max_length keeps only its whole images: a cut
        through an image's tokens moves back to before its `<|vision_start|>`."""
        token = self.images.image_token_id
        positions = [i for i, t in enumerate(e.input_ids) if t == token]
        if len(positions) != len(refs) and not (cut and len(positions) < len(refs)):
            raise UserError(f"sample {e.id}: the chat template ({self.name}) wrote {len(positions)} image tokens for "
                            f"{len(refs)} images")
        counts = [self.images.num_tokens(ref) for ref in refs[:len(positions)]]
        ids, labels, starts, previous = [], [], [], 0
        for position, n in zip(positions, counts):
            ids += e.input_ids[previous:position]
            labels += e.labels[previous:position]
            starts.append(len(ids))
            ids += [token] * n
            labels += [IGNORE] * n
            previous = position + 1
        ids += e.input_ids[previous:]
        labels += e.labels[previous:]
        moved = lambda i: i + sum(n - 1 for position, n in zip(positions, counts) if position < i)  # noqa: E731
        turns = [(moved(a), moved(b)) for a, b in e.turns]
        kept, end, reply_cut = len(counts), len(ids), False
        if max_length is not None and len(ids) > max_length:
            end = max_length
            for k, (start, n) in enumerate(zip(starts, counts)):
                if start + n > max_length:  # the first image that does not fit whole
                    kept, end = k, start - (start > 0 and ids[start - 1] == self.images.vision_start_id)
                    break
            reply_cut = reply_unread or any(b > end for _, b in turns)
            turns = [(a, min(b, end)) for a, b in turns if a < end]
        return Encoded(e.id, ids[:end], labels[:end], cut or end < len(ids), turns, e.reasoning_not_trained,
                       list(refs[:kept]), reply_cut=reply_cut)

    def _assistant_spans(self, pieces: list[str], open_end: bool = False) -> list[tuple[int, int]]:
        """Character spans of each assistant body: after `<|im_start|>assistant\\n`, through the template's next `<|im_end|>`
        (`open_end`: the pieces were cut, so a body still open at their end runs to it)."""
        spans, pos, start = [], 0, None
        for i, piece in enumerate(pieces):
            if i % 2:
                if piece == IM_START and i + 1 < len(pieces) and pieces[i + 1].startswith(ASSISTANT):
                    start = pos + len(piece) + len(ASSISTANT)
                elif piece == IM_END and start is not None:
                    spans.append((start, pos + len(piece)))
                    start = None
            pos += len(piece)
        if open_end and start is not None:
            spans.append((start, pos))
        return spans

    def prompt_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """Token ids that ask the model for the next assistant turn (the template's generation prompt), each image's
        tokens expanded."""
        pieces = self._pieces(messages, tools, add_generation_prompt=True)
        texts = [e.ids for e in self._encode_text(pieces[0::2])]
        ids = []
        for i, piece in enumerate(pieces):
            ids += [self.tokenizer.convert_tokens_to_ids(piece)] if i % 2 else texts[i // 2]
        refs = image_refs(messages)
        if refs and self.images is not None:
            ids = self._with_images(Encoded("prompt", ids, [IGNORE] * len(ids)), refs, None, False).input_ids
        return ids

    def reply_ids(self, prompt: list[dict], reply: list[dict], tools: list | None = None) -> tuple[list[int], list[int]]:
        """(ids before the last assistant turn's body, that body through its `<|im_end|>`), from one encoding.

        Reward models score at the reply's `<|im_end|>`; DPO's completion is the reply.
        """
        e = self.encode(list(prompt) + list(reply), tools)
        start, end = e.turns[-1]
        return e.input_ids[:start], e.input_ids[start:end]


def _messages_tools(conversation) -> tuple[list[dict], list | None]:
    if isinstance(conversation, tuple):
        return conversation
    if isinstance(conversation, list):
        return conversation, None
    return conversation.messages, getattr(conversation, "tools", None)


def _reply_end(spans: list[tuple[int, int]]) -> int:
    return max((end for _, end in spans), default=0)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def reasoning_of(message: dict) -> str:
    """The reasoning an assistant message carries: `reasoning_content`, or an inline `<think>...</think>` lead."""
    if message.get("reasoning_content"):
        return message["reasoning_content"].strip()
    inline = INLINE_THINK.match(message.get("content") or "")
    return inline.group(1).strip() if inline else ""


def _reasoning_not_trained(messages: list[dict], bodies: list[str]) -> int:
    """How many assistant turns' reasoning the template did not render (counted, never silent)."""
    assistants = [m for m in messages if m["role"] == "assistant"]
    if len(assistants) != len(bodies):
        return 0
    return sum(1 for m, body in zip(assistants, bodies) if reasoning_of(m) and reasoning_of(m) not in body)


def check_renderable(fmt: ChatFormat, samples, max_problems: int = 20) -> None:
    """Every sample (with `.messages`/`.prompt`+replies, `.tools`, `.source`) renders in full, or one DataError naming each."""
    from ..errors import DataError

    found = []
    for s in samples:
        messages = s.messages if hasattr(s, "messages") else s.prompt + s.chosen + s.rejected
        found += [f"{s.source} (id \"{s.id}\"): {p}" for p in fmt.problems(messages, s.tools)]
    if found:
        raise DataError(found[:max_problems], total=len(found))


def resolve_format(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None, system_message: str | None = None,
                   enable_thinking: bool | None = None, template_kwargs: dict | None = None,
                   source: str = "the checkpoint", images=None) -> ChatFormat:
    """Choose the run's format and make the tokenizer carry it, so that the saved tokenizer serves what was trained.

    `--chat_template` wins; else the checkpoint's own template; else the seed's ChatML with the run's
    system message written in. `system_message` None means "not given": the template decides.
    """
    kwargs = dict(template_kwargs or {})
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if chat_template:
        template, name = load_template(chat_template)
        description = f"chat template {name} (--chat_template)"
    elif own:
        official = template_name(own)
        template, name = own, f"official {official}" if official else f"the one of {source}"
        description = f"the chat template of {source}" + (f" (official {official})" if official else "")
    else:
        default = DEFAULT_SYSTEM_MESSAGE if system_message is None else system_message
        template, name = chatml_template(default), "the seed's ChatML"
        description = f"ChatML (the seed's), default system message {default!r}" if default else "ChatML (the seed's), no system message"
        system_message = None  # written into the template
    tokenizer.chat_template = template
    if system_message:
        description += f", --system_message {system_message!r} added where a conversation has none"
    if kwargs:
        description += f", template options {kwargs}"
    return ChatFormat(tokenizer, template, name, description, system_message, kwargs, images)
