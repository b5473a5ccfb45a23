"""Validated conversations -> tokenized training samples, with an honest count of what was cut."""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat_format import ChatFormat, Encoded, check_renderable
from .read import load_conversations


@dataclass
class EncodeReport:
    """What happened to the samples of one data set: nothing is lost without being counted here."""

    samples: int = 0
    kept: int = 0
    truncated: list[str] = field(default_factory=list)  # ids cut to model_max_length (head kept)
    dropped: list[str] = field(default_factory=list)  # ids with no supervised token left after the cut
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
            line += f"\n  truncated (longer than model_max_length, head kept): {_ids(self.truncated)}"
        if self.dropped:
            line += f"\n  dropped (no assistant token left after truncation): {_ids(self.dropped)}"
        if self.reasoning_not_trained:
            line += (f"\n  {self.reasoning_not_trained} reasoning block(s) not trained: the template leaves out the reasoning "
                     "of assistant turns before the last user turn; to train them, split each such conversation "
                     "into one sample per assistant turn")
        return "\n".join([line] + [f"  {m}" for m in self.mixture])


def _ids(ids: list[str], limit: int = 10) -> str:
    more = f" ... and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def encode_conversations(conversations, fmt: ChatFormat, max_length: int | None) -> tuple[list[Encoded], EncodeReport]:
    """Tokenize with labels; keep the head of long samples; drop (and name) those left unsupervised."""
    check_renderable(fmt, conversations)
    encoded = fmt.encode_many(conversations, [c.id for c in conversations], max_length)
    report = EncodeReport(samples=len(encoded))
    kept = []
    for e in encoded:
        report.reasoning_not_trained += e.reasoning_not_trained
        if e.truncated:
            report.truncated.append(e.id)
        if e.num_supervised == 0:
            report.dropped.append(e.id)
            continue
        kept.append(e)
        report.tokens += len(e.input_ids)
        report.supervised_tokens += e.num_supervised
    report.kept = len(kept)
    return kept, report


def load_sft_dataset(paths, fmt: ChatFormat, max_length: int | None, seed: int = 0):
    """Read + validate (errors name file and line) + mix (a weighted `paths`, drawn with `seed`) + encode, all in
    memory. Returns (samples, report). Training, preprocess and eval use the memory-mapped `cache.load_tokens`,
    which gives the same rows and report; this stays as its reference and for small data (tests, benchmarks)."""
    mixture: list[str] = []
    samples, report = encode_conversations(load_conversations(paths, seed=seed, log=mixture.append), fmt, max_length)
    report.mixture = mixture
    return samples, report


class SFTDataset:
    """A list of encoded samples that the HF Trainer can index (it only needs __len__/__getitem__). sft trains on
    the memory-mapped `datasets.Dataset` of `cache.load_tokens` instead (same item keys, plus `length`)."""

    def __init__(self, samples: list[Encoded]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {"input_ids": s.input_ids, "labels": s.labels, "id": s.id}
