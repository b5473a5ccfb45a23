"""ZeRO-3 with pictures: every rank runs the vision tower in every forward, whether its batch has pictures or not.

ZeRO-3 gathers a module's parameters from all ranks as the module runs: a collective that every rank must join, in
the same order. A batch without pictures skips the vision tower, so while one rank's batch has pictures and another's
has none (text-only samples in the data, or a picture-free batch), the ranks' collectives no longer pair up: gloo
aborts ("Is there a distributed collective mismatch?"), NCCL hangs. So a forward without pictures runs the frozen
vision tower on one blank picture, where the pictures would have run (after the token embeddings, before the language
model), and adds 0 x its output to the embeddings: the same modules in the same order on every rank, and the same
autograd graph for backward, with nothing changed in what the model computes. (ms-swift does the same; LLaMA-Factory
adds a fake picture to such batches.) Runs without ZeRO-3, or whose data has no picture, are left as they are.
"""

from __future__ import annotations

import torch

from ..data.collate import has_images
from .loss import unwrapped


def run_vision_tower_on_every_rank(models, images, *datasets) -> None:
    """Install the blank-picture forward on each of `models` (the policy, dpo's reference) under ZeRO-3 when any of
    `datasets` has a picture; `images`: the run's data.image_inputs.ImageInputs."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if images is None or not is_deepspeed_zero3_enabled() or not any(has_images(d) for d in datasets):
        return
    for model in models:
        if model is not None:
            _blank_picture_forward(unwrapped(model).model, blank_picture(images))


def blank_picture(images) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` of the smallest picture the image processor makes (resized up to its
    minimum pixels: a few patches)."""
    from PIL import Image

    side = images.processor.patch_size * images.merge_size
    out = images.processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def _blank_picture_forward(composite, blank: dict[str, torch.Tensor]) -> None:
    """`composite`: the vision-language base model (Qwen*VLModel), which runs the vision tower on the batch's pictures
    and then calls its `language_model` with the embeddings."""
    pictures = {}

    def before_model(module, args, kwargs):
        pictures["shown"] = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    def before_language_model(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if pictures.pop("shown", True) or embeds is None:
            return None
        out = composite.get_image_features(**{k: v.to(embeds.device) for k, v in blank.items()})
        seen = sum(t.sum() for t in _tensors(out) if t.is_floating_point())
        return args, kwargs | {"inputs_embeds": embeds + 0 * seen.to(embeds.dtype)}

    composite.register_forward_pre_hook(before_model, with_kwargs=True)
    composite.language_model.register_forward_pre_hook(before_language_model, with_kwargs=True)


def _tensors(output):
    """Every tensor of a model output (ModelOutput, tuples and lists of tensors, nested)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)
