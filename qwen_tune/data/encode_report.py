"""What happened to the samples of a data set when they were tokenized: nothing is lost without being counted."""

from __future__ import annotations

from dataclasses import dataclass, field



@dataclass
class EncodeReport:
    """What happened to the samples of one data set: nothing is lost without being counted here."""

    samples: int = 0
    kept: int = 0
    truncated: list[str] = field(default_factory=list)  # ids cut to model_max_length (head kept)
    dropped: list[str] = field(default_factory=list)  # ids with no supervised token left after the cut
    replies_cut: list[str] = field(default_factory=list)  # ids whose cut took tokens of an assistant turn
    tokens: int = 0
    supervised_tokens: int = 0
    reasoning_not_trained: int = 0  # reasoning blocks the template leaves out by design (Qwen3: history turns)
    mixture: list[str] = field(default_factory=list)  # a weighted --data_path: what was taken from each source

    def summary(self, name: str = "data") -> str:
        line = (
            f"{name}: {self.samples} samples, {self.kept} kept, {self.tokens} tokens "
            f"({self.supervised_tokens} supervised); {len(self.truncated)} truncated, {len(self.dropped)} dropped"
        )
        if self.truncated:
            line += f"\n  truncated (longer than model_max_length, head kept): {listed_ids(self.truncated)}"
        if self.dropped:
            line += f"\n  dropped (no assistant token left after truncation): {listed_ids(self.dropped)}"
        if self.replies_cut:
            n = len(self.replies_cut)
            line += (f"\nwarning: {name}: {n} of {self.samples} conversations lost assistant tokens to the cut at "
                     f"model_max_length, so {'they train' if n > 1 else 'it trains'} on part of a reply (half a tool call, an "
                     f"answer without its end); raise --model_max_length to keep them whole: {listed_ids(self.replies_cut)}")
        if self.reasoning_not_trained:
            line += (f"\n  {self.reasoning_not_trained} reasoning block(s) not trained: the template leaves out the reasoning "
                     "of assistant turns before the last user turn; to train them, split each such conversation "
                     "into one sample per assistant turn")
        return "\n".join([line] + [f"  {m}" for m in self.mixture])


def listed_ids(ids: list[str], limit: int = 10) -> str:
    """The first `limit` sample ids, and how many more: a summary line names what it counts."""
    more = f" ... and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more
