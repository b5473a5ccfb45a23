"""Preference pairs -> token ids in the served format, for the reward model and DPO (one encoder, one report)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat_format import check_renderable
from .encode_report import listed_ids
from .images import image_refs
from .read import load_preference_pairs


@dataclass
class PairReport:
    """What happened to the pairs of one data set: nothing is lost without being counted here."""

    pairs: int = 0
    kept: int = 0
    dropped: list[str] = field(default_factory=list)  # ids longer than model_max_length on either side
    tokens: int = 0
    mixture: list[str] = field(default_factory=list)  # a weighted --data_path: what was taken from each source

    def summary(self, name: str) -> str:
        line = f"{name}: {self.pairs} pairs, {self.kept} kept, {self.tokens} tokens; {len(self.dropped)} dropped"
        if self.dropped:
            line += f"\n  dropped (longer than model_max_length; the score is read at the reply's end): {listed_ids(self.dropped)}"
        return "\n".join([line] + [f"  {m}" for m in self.mixture])


def encode_pairs(paths, fmt, max_length: int, margin: float = 0.0, split_prompt: bool = False, seed: int = 0):
    """Validated pairs -> a `datasets.Dataset` the TRL trainers take as-is, and a report.

    Reward model: chosen_ids/rejected_ids are whole sequences ending at the reply's `<|im_end|>`.
    DPO (`split_prompt`): prompt_ids up to `<|im_start|>assistant\\n`, chosen_ids/rejected_ids the replies.
    Both are rendered by the run's chat template (`fmt`), as served. `seed` draws a weighted mixture of `paths`.
    """
    from datasets import Dataset

    mixture: list[str] = []
    pairs = load_preference_pairs(paths, seed=seed, log=mixture.append)
    check_renderable(fmt, pairs)
    report = PairReport(mixture=mixture)
    rows = {"id": [], "chosen_ids": [], "rejected_ids": [], "images": []} | ({"prompt_ids": []} if split_prompt else {})
    for pair in pairs:
        report.pairs += 1
        prompt, chosen = fmt.reply_ids(pair.prompt, pair.chosen, pair.tools)
        _, rejected = fmt.reply_ids(pair.prompt, pair.rejected, pair.tools)
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            report.dropped.append(pair.id)
            continue
        rows["id"].append(pair.id)
        rows["images"].append(image_refs(pair.prompt) if fmt.images is not None else [])  # only a prompt shows images
        report.tokens += 2 * len(prompt) + len(chosen) + len(rejected)  # both sides are full sequences to the model
        if split_prompt:
            rows["prompt_ids"].append(prompt)
        else:
            chosen, rejected = prompt + chosen, prompt + rejected
        rows["chosen_ids"].append(chosen)
        rows["rejected_ids"].append(rejected)
    report.kept = len(rows["id"])
    if margin:
        rows["margin"] = [margin] * report.kept
    return Dataset.from_dict(rows), report
