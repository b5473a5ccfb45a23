"""Unpaired replies (KTO's data: one reply per prompt, labelled desirable or not) -> token ids in the served format."""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat_format import check_renderable
from .encode_report import listed_ids
from .images import image_refs
from .read import load_unpaired


@dataclass
class UnpairedReport:
    """What happened to the replies of one data set: nothing is lost without being counted here."""

    samples: int = 0
    kept: int = 0
    desirable: int = 0  # of the kept ones
    dropped: list[str] = field(default_factory=list)  # ids longer than model_max_length
    tokens: int = 0
    mixture: list[str] = field(default_factory=list)  # a weighted --data_path: what was taken from each source

    def summary(self, name: str) -> str:
        line = (f"{name}: {self.samples} replies ({self.desirable} desirable, {self.kept - self.desirable} undesirable "
                f"kept), {self.tokens} tokens; {len(self.dropped)} dropped")
        if self.dropped:
            line += f"\n  dropped (longer than model_max_length): {listed_ids(self.dropped)}"
        return "\n".join([line] + [f"  {m}" for m in self.mixture])


def encode_unpaired(paths, fmt, max_length: int, seed: int = 0):
    """Validated replies -> a `datasets.Dataset` (prompt_ids up to `<|im_start|>assistant\\n`, completion_ids the
    reply's body through `<|im_end|>`, exactly the tokens SFT supervises; `label`) and a report. `seed` draws a
    weighted mixture of `paths`."""
    from datasets import Dataset

    mixture: list[str] = []
    replies = load_unpaired(paths, seed=seed, log=mixture.append)
    check_renderable(fmt, replies)
    report = UnpairedReport(mixture=mixture)
    rows = {"id": [], "prompt_ids": [], "completion_ids": [], "label": [], "images": []}
    for sample in replies:
        report.samples += 1
        prompt, completion = fmt.reply_ids(sample.prompt, sample.reply, sample.tools)
        if len(prompt) + len(completion) > max_length:
            report.dropped.append(sample.id)
            continue
        rows["id"].append(sample.id)
        rows["prompt_ids"].append(prompt)
        rows["completion_ids"].append(completion)
        rows["label"].append(sample.desirable)
        rows["images"].append(image_refs(sample.prompt) if fmt.images is not None else [])  # only a prompt shows images
        report.tokens += len(prompt) + len(completion)
        report.desirable += sample.desirable
    report.kept = len(rows["id"])
    return Dataset.from_dict(rows), report
