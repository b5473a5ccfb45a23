"""Distillation's prompts (and the dataset's replies, for off-policy batches) -> token ids in the served format."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DataError
from .chat_format import check_renderable
from .encode_report import listed_ids
from .images import image_refs
from .read import load_distill_prompts


@dataclass
class DistillReport:
    """What happened to the prompts of one data set: nothing is lost without being counted here."""

    samples: int = 0
    kept: int = 0
    with_reply: int = 0  # of the kept ones
    dropped: list[str] = field(default_factory=list)  # ids whose prompt and reply do not fit model_max_length
    tokens: int = 0  # the kept prompts' tokens and the dataset replies'
    mixture: list[str] = field(default_factory=list)  # a weighted --data_path: what was taken from each source

    def summary(self, name: str) -> str:
        line = (f"{name}: {self.samples} prompts ({self.with_reply} with a reply kept), {self.tokens} tokens; "
                f"{len(self.dropped)} dropped")
        if self.dropped:
            line += f"\n  dropped (prompt + reply longer than model_max_length): {listed_ids(self.dropped)}"
        return "\n".join([line] + [f"  {m}" for m in self.mixture])


def encode_distill_prompts(paths, fmt, max_length: int, seed: int = 0, *, max_new_tokens: int,
                           reply_needed: str | None = None):
    """Validated prompts -> a `datasets.Dataset` and a report. Each row: `prompt_ids` (the generation prompt the student
    answers), and where the data has a reply, `reply_prompt_ids` / `reply_ids` (the tokens before the reply's body, and
    that body through `<|im_end|>`: exactly what SFT supervises). A sample is kept if its prompt and `max_new_tokens`
    sampled tokens fit `max_length`, and so does its dataset reply; `reply_needed`: why every sample needs a reply."""
    from datasets import Dataset

    mixture: list[str] = []
    samples = load_distill_prompts(paths, seed=seed, reply_needed=reply_needed, log=mixture.append)
    with_images = [f"{s.source}: has an image; distill trains on text prompts only" for s in samples if image_refs(s.messages)]
    if with_images:
        raise DataError(with_images[:20], total=len(with_images))
    check_renderable(fmt, samples)
    report = DistillReport(mixture=mixture)
    rows = {"id": [], "prompt_ids": [], "reply_prompt_ids": [], "reply_ids": []}
    for sample in samples:
        report.samples += 1
        prompt = fmt.prompt_ids(sample.prompt, sample.tools)
        reply_prompt, reply = fmt.reply_ids(sample.prompt, sample.reply, sample.tools) if sample.reply else ([], [])
        if len(prompt) + max_new_tokens > max_length or len(reply_prompt) + len(reply) > max_length:
            report.dropped.append(sample.id)
            continue
        rows["id"].append(sample.id)
        rows["prompt_ids"].append(prompt)
        rows["reply_prompt_ids"].append(reply_prompt)
        rows["reply_ids"].append(reply)
        report.tokens += len(prompt) + len(reply)
        report.with_reply += bool(reply)
    report.kept = len(rows["id"])
    return Dataset.from_dict(rows), report
