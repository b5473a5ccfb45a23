"""ChatML rendering and encoding with labels: the masking contract the whole toolkit relies on.

Every message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`. Control tokens are inserted by
id; `{role}\\n` and `{content}` are encoded separately as plain text, so text that merely
contains `<|im_end|>` stays text. Supervised (label = token id): exactly each assistant
message's content tokens and its closing `<|im_end|>`. Everything else is IGNORE (-100).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .tokenizer import DEFAULT_SYSTEM_MESSAGE, ENDOFTEXT, IM_END, IM_START, encode_plain

IGNORE = -100

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class Encoded:
    """One tokenized conversation. `truncated` says tokens past `max_length` were cut off."""

    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def with_system(messages: list[Message], system_message: str | None = DEFAULT_SYSTEM_MESSAGE) -> list[Message]:
    """Prepend the default system turn when a conversation has none ("" or None means: no system turn)."""
    if messages and messages[0]["role"] == "system":
        return messages
    if not system_message:
        return messages
    return [{"role": "system", "content": system_message}] + list(messages)


class ChatMLEncoder:
    """Encodes many conversations with one batched tokenizer call (fast: no per-string Python loop)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_message: str | None = DEFAULT_SYSTEM_MESSAGE):
        self.tokenizer = tokenizer
        self.system_message = system_message
        ids = tokenizer.convert_tokens_to_ids([IM_START, IM_END, ENDOFTEXT])
        self.im_start, self.im_end, self.endoftext = ids
        (self.newline,) = encode_plain(tokenizer, ["\n"])
        self._role_cache: dict[str, list[int]] = {}

    def _role(self, role: str) -> list[int]:
        if role not in self._role_cache:
            self._role_cache[role] = encode_plain(self.tokenizer, [role + "\n"])[0]
        return self._role_cache[role]

    def encode_many(
        self,
        conversations: list[list[Message]],
        ids: list[str] | None = None,
        max_length: int | None = None,
        add_generation_prompt: bool = False,
    ) -> list[Encoded]:
        """Encode conversations; keep the head when longer than `max_length` (and flag it)."""
        convs = [with_system(c, self.system_message) for c in conversations]
        contents = encode_plain(self.tokenizer, [m["content"] for c in convs for m in c])
        out, k = [], 0
        for i, conv in enumerate(convs):
            input_ids: list[int] = []
            labels: list[int] = []
            for m in conv:
                content = contents[k]
                k += 1
                header = [self.im_start] + self._role(m["role"])
                input_ids += header + content + [self.im_end] + self.newline
                if m["role"] == "assistant":
                    labels += [IGNORE] * len(header) + content + [self.im_end] + [IGNORE] * len(self.newline)
                else:
                    labels += [IGNORE] * (len(header) + len(content) + 1 + len(self.newline))
            if add_generation_prompt:
                prompt = [self.im_start] + self._role("assistant")
                input_ids += prompt
                labels += [IGNORE] * len(prompt)
            truncated = max_length is not None and len(input_ids) > max_length
            if truncated:
                input_ids, labels = input_ids[:max_length], labels[:max_length]
            out.append(Encoded(ids[i] if ids else str(i), input_ids, labels, truncated))
        return out

    def encode(self, messages: list[Message], max_length: int | None = None, add_generation_prompt: bool = False) -> Encoded:
        return self.encode_many([messages], max_length=max_length, add_generation_prompt=add_generation_prompt)[0]

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids that ask the model for the next assistant reply (for generation)."""
        return self.encode(messages, add_generation_prompt=True).input_ids


def render(messages: list[Message], system_message: str | None = DEFAULT_SYSTEM_MESSAGE, add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation (what the saved chat_template produces)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in with_system(messages, system_message))
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")
