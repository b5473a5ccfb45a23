"""The in-memory SFT pipeline: read, validate, mix and encode a data set in one process, all in memory.

qwen-tune trains from the memory-mapped tokens cache (`data/cache.py`); this is its reference (tests check that the
cache gives exactly these rows and report) and the quick way to get encoded samples in tests and benchmarks.
"""

from __future__ import annotations

from qwen_tune.data.chat_format import ChatFormat, Encoded, check_renderable
from qwen_tune.data.encode_report import EncodeReport
from qwen_tune.data.read import load_conversations


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
        if e.reply_cut:
            report.replies_cut.append(e.id)
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
    memory. Returns (samples, report), the rows and report `cache.load_tokens` gives."""
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
