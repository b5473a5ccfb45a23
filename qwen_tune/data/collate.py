"""Batching: padding-free packing (default), dynamic padding, or the seed's pad-to-max.

Packing concatenates the samples of a batch into one row with `position_ids` restarting at every
sample and the row's boundaries as `cu_seq_lens_*` (flash-attention's names); transformers keeps
attention inside each sample (flash-attention varlen on GPU, a block-diagonal mask with SDPA/eager),
and the linear-attention layers of hybrid models run once per sample (linear_attention.py). A model
whose layers could not keep packed samples apart (model.packing_is_exact) gets padded batches
(PaddedCollator, PaddedPairCollator). No pad token is ever computed on, and labels come from
chat_format, never from pad ids, so a pad id equal to `<|im_end|>` could not mask a real label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chat_format import IGNORE


def has_images(rows) -> bool:
    """Whether any row of a Dataset with an `images` column (the tokens cache's, encode_pairs') has an image."""
    import pyarrow.compute as pc

    if not rows or "images" not in rows.column_names:
        return False
    return (pc.max(pc.list_value_length(rows.data.column("images"))).as_py() or 0) > 0


def images_unpacked(packing: bool, log, *datasets) -> bool:
    """Packing as the data can honour it: samples with images are padded, one per row, since the model computes their
    multimodal rotary positions (M-RoPE) from the image grids of each row."""
    if packing and any(has_images(d) for d in datasets):
        log("packing: off: the data has images, whose multimodal rotary positions the model computes per row; batches are "
            "padded instead")
        return False
    return packing


def boundaries(lengths: list[int]) -> dict:
    """A packed row's sequence boundaries, as transformers' flash-attention kwargs take them."""
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


@dataclass
class PackedCollator:
    """All samples of the batch in one row; `ids` are kept for error messages (NaN guard)."""

    def __call__(self, features: list[dict]) -> dict:
        input_ids = [t for f in features for t in f["input_ids"]]
        labels = [t for f in features for t in f["labels"]]
        position_ids = [p for f in features for p in range(len(f["input_ids"]))]
        return {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([position_ids]),
            **boundaries([len(f["input_ids"]) for f in features]),
            "sample_ids": [f.get("id") for f in features],
        }


@dataclass
class PaddedCollator:
    """Right-pad to the longest sample of the batch, or to `pad_to` (the seed's pad-to-max). With `images` (a
    vision-language run), the batch's images come along as the model's pixel inputs, and `mm_token_type_ids` marks
    their tokens, from which the model computes each sample's multimodal rotary positions (M-RoPE)."""

    pad_token_id: int
    pad_to: int | None = None
    images: object = None  # data.image_inputs.ImageInputs

    def __call__(self, features: list[dict]) -> dict:
        width = self.pad_to or max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id)
        labels = torch.full((len(features), width), IGNORE)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "sample_ids": [f.get("id") for f in features]}
        refs = [ref for f in features for ref in f.get("images") or ()]
        if refs:
            batch |= self.images.model_inputs(input_ids * attention_mask, refs)
        return batch


def packed_replies(sides: list[tuple[list[int], list[int]]]) -> dict:
    """(prompt, reply) token lists in one row, padding-free; labels are the reply tokens (a prompt ends at
    `<|im_start|>assistant\\n`), and `sequence` gives every position's index in `sides`, so per-sequence sums are one
    scatter."""
    input_ids, labels, position_ids, sequence = [], [], [], []
    for index, (prompt, reply) in enumerate(sides):
        input_ids += prompt + reply
        labels += [IGNORE] * len(prompt) + reply
        position_ids += range(len(prompt) + len(reply))
        sequence += [index] * (len(prompt) + len(reply))
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([position_ids]),
        "sequence": torch.tensor([sequence]),
        **boundaries([len(prompt) + len(reply) for prompt, reply in sides]),
    }


def padded_replies(sides: list[tuple[list[int], list[int]]], pad_token_id: int, images=None, refs: list = ()) -> dict:
    """`packed_replies`' keys, one sequence per row, right-padded: for models whose layers cannot keep packed sequences
    apart (model.packing_is_exact). `refs`: the sequences' images in order, which `images` (data.image_inputs.ImageInputs)
    turns into the model's pixel inputs."""
    width = max(len(prompt) + len(reply) for prompt, reply in sides)
    input_ids = torch.full((len(sides), width), pad_token_id)
    labels = torch.full((len(sides), width), IGNORE)
    attention_mask = torch.zeros((len(sides), width), dtype=torch.long)
    for index, (prompt, reply) in enumerate(sides):
        n = len(prompt) + len(reply)
        input_ids[index, :n] = torch.tensor(prompt + reply)
        labels[index, len(prompt) : n] = torch.tensor(reply)
        attention_mask[index, :n] = 1
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "sequence": torch.arange(len(sides))[:, None].expand(len(sides), width),
    }
    if refs:
        batch |= images.model_inputs(input_ids * attention_mask, list(refs))
    return batch


def image_refs_of(features: list[dict]) -> list:
    return [ref for f in features for ref in f.get("images") or ()]


@dataclass
class PackedPairCollator:
    """Preference pairs, padding-free: every prompt+chosen, then every prompt+rejected, in one row (chosen i is
    sequence i, rejected i sequence B + i)."""

    def __call__(self, features: list[dict]) -> dict:
        sides = [(f["prompt_ids"], f[side]) for side in ("chosen_ids", "rejected_ids") for f in features]
        return {**packed_replies(sides), "sample_ids": [f.get("id") for f in features]}


@dataclass
class PaddedPairCollator:
    """Preference pairs one sequence per row, right-padded, in PackedPairCollator's order and keys: for models whose
    layers cannot keep packed sequences apart (model.packing_is_exact)."""

    pad_token_id: int
    images: object = None  # data.image_inputs.ImageInputs: the prompts' images, as PaddedCollator takes them

    def __call__(self, features: list[dict]) -> dict:
        sides = [(f["prompt_ids"], f[side]) for side in ("chosen_ids", "rejected_ids") for f in features]
        refs = image_refs_of(features) * 2  # the chosen rows, then the rejected ones
        return {**padded_replies(sides, self.pad_token_id, self.images, refs), "sample_ids": [f.get("id") for f in features]}


def pair_collator(packed: bool, pad_token_id: int, images=None):
    """The batches of preference pairs: packed where the model allows it, else padded."""
    return PackedPairCollator() if packed else PaddedPairCollator(pad_token_id, images)


@dataclass
class UnpairedCollator:
    """KTO's batches: each sample's prompt + reply (packed, or padded where `packed` is False), `label` (desirable or
    not), and under `kl` the same prompts with the batch's replies shifted by one, sample i getting sample i-1's reply:
    the mismatched pairs from which KTO estimates its KL term (TRL's KTO collator does the same)."""

    packed: bool
    pad_token_id: int
    images: object = None

    def __call__(self, features: list[dict]) -> dict:
        prompts, replies = [f["prompt_ids"] for f in features], [f["completion_ids"] for f in features]
        shifted = replies[-1:] + replies[:-1]
        rows = packed_replies if self.packed else (
            lambda sides: padded_replies(sides, self.pad_token_id, self.images, image_refs_of(features)))
        return {**rows(list(zip(prompts, replies))), "kl": rows(list(zip(prompts, shifted))),
                "label": torch.tensor([bool(f["label"]) for f in features]), "sample_ids": [f.get("id") for f in features]}


@dataclass
class PromptCollator:
    """Distillation's batches: the prompts as token lists (the student answers them during the step) and the dataset's
    replies; `rows` makes the (prompt, reply) sequences a batch once the replies exist: packed, or padded where
    `packed` is False."""

    packed: bool
    pad_token_id: int
    images: object = None  # distill reads text only

    def __call__(self, features: list[dict]) -> dict:
        return {key: [f[key] for f in features] for key in ("prompt_ids", "reply_prompt_ids", "reply_ids")} | {
            "sample_ids": [f.get("id") for f in features]}

    def rows(self, sides: list[tuple[list[int], list[int]]]) -> dict:
        return packed_replies(sides) if self.packed else padded_replies(sides, self.pad_token_id)
