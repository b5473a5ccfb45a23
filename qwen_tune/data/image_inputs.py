"""Images as a vision-language checkpoint sees them.

The checkpoint's own image processor (its preprocessor_config.json) resizes each image to a grid of patches; the
grid decides how many `<|image_pad|>` tokens stand for the image in the text, prod(grid) / merge_size**2, as the
Qwen-VL processors expand them; the collator turns a batch's images into `pixel_values` + `image_grid_thw`. The
processor class itself (Qwen2_5_VLProcessor, Qwen3VLProcessor) is not needed: it also builds a video processor,
which needs torchvision, and adds nothing for images but this count.
"""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from .images import image_size, load_image

IMAGE_TOKEN, VISION_START = "<|image_pad|>", "<|vision_start|>"  # the Qwen-VL templates write <|vision_start|><|image_pad|><|vision_end|>
PROCESSOR_FILE = "preprocessor_config.json"


class ImageInputs:
    """One run's image processing: token counts at tokenization, pixels at collation (picklable for the workers)."""

    def __init__(self, image_processor, image_token_id: int, vision_start_id: int):
        self.processor, self.image_token_id, self.vision_start_id = image_processor, image_token_id, vision_start_id
        self.merge_size = image_processor.merge_size

    def num_tokens(self, ref: str) -> int:
        """How many image tokens stand for the image: its resized patch grid, merged merge_size x merge_size."""
        width, height = image_size(ref)
        return self.processor.get_number_of_image_patches(height, width, {}) // self.merge_size**2

    def pixels(self, refs: list[str]) -> dict[str, torch.Tensor]:
        """The model's image inputs for images in this order: `pixel_values` (patches of all images) and `image_grid_thw`."""
        out = self.processor(images=[load_image(ref) for ref in refs], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def model_inputs(self, input_ids: torch.Tensor, refs: list[str]) -> dict[str, torch.Tensor]:
        """What the model takes besides the ids: the images' pixels, and `mm_token_type_ids` marking their tokens (the
        model computes each row's multimodal rotary positions from it)."""
        return self.pixels(refs) | {"mm_token_type_ids": (input_ids == self.image_token_id).int()}

    def settings(self) -> dict:
        """What decides the tokens (for the tokens cache's key)."""
        keys = ("size", "patch_size", "merge_size", "temporal_patch_size")
        return {k: v for k, v in self.processor.to_dict().items() if k in keys} | {"image_token_id": self.image_token_id}


def image_inputs_for(model_path: str, tokenizer, *, config=None, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> ImageInputs | None:
    """The image inputs of a vision-language checkpoint, or None for a text model (`config`: the model's, when
    `model_path` holds an adapter). The image token must be the one the model's config names: a template's
    `<|image_pad|>` tokenized to another id would feed text where pixels belong."""
    from transformers import AutoConfig, AutoImageProcessor

    config = config or AutoConfig.from_pretrained(model_path)
    if getattr(config, "vision_config", None) is None:
        return None
    if not os.path.isfile(os.path.join(model_path, PROCESSOR_FILE)):
        raise UserError(f"{model_path} is a vision-language checkpoint without {PROCESSOR_FILE}, so its images cannot be "
                        "prepared as it was trained on them; copy that file from the original checkpoint")
    size = {}
    if min_pixels is not None or max_pixels is not None:
        base = AutoImageProcessor.from_pretrained(model_path).size
        size = {"size": {"shortest_edge": min_pixels or base["shortest_edge"], "longest_edge": max_pixels or base["longest_edge"]}}
    processor = AutoImageProcessor.from_pretrained(model_path, **size)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id != config.image_token_id:
        raise UserError(f"{model_path}: the tokenizer gives {IMAGE_TOKEN} the id {token_id}, but the model's config has "
                        f"image_token_id {config.image_token_id}; use the checkpoint's own tokenizer")
    return ImageInputs(processor, token_id, tokenizer.convert_tokens_to_ids(VISION_START))
