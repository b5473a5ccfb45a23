"""A batch of conversations with pictures trains as each conversation alone.

Samples with pictures are padded, one per row (collate.images_unpacked): the model computes each row's multimodal
rotary positions (M-RoPE) from the row's image grids and its attention mask, the collator hands over the pictures of
all rows as one `pixel_values` with an `image_grid_thw` row per picture, in the order their tokens appear. A picture
given to the wrong row, positions computed across rows, or padding that is attended to would move a sample's loss;
here a batch of picture conversations of different lengths and picture sizes, with a text-only one among them, gives
every sample's loss (and the step's gradient) of the sample alone, through the real collator and sft's loss, in
float64 on tiny random checkpoints of Qwen2.5-VL, Qwen3-VL and Qwen3.5.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from in_memory_sft import load_sft_dataset
from qwen_tune.data.chat_format import resolve_format
from qwen_tune.data.collate import PaddedCollator
from qwen_tune.data.image_inputs import IMAGE_TOKEN, VISION_START, ImageInputs
from qwen_tune.data.templates import official_templates
from qwen_tune.train.loss import causal_lm_loss_sum, sequence_logprobs
from test_hybrid_packing import LINEAR_ATTENTION, tiny_image_processor, tiny_model
from test_image_training import COLOURS

# qwen3_5_moe has qwen3_5's vision tower and M-RoPE (its experts are checked padded in test_hybrid_packing): ~4 s saved
TEMPLATES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_5": "qwen3_5_nothink"}


def user(*blocks):
    return {"role": "user", "content": [{"type": "image", "image": b} if b.endswith(".png") else {"type": "text", "text": b}
                                        for b in blocks]}


def reply(text):
    return {"role": "assistant", "content": text}


def picture_conversations(folder) -> list[list[dict]]:
    """Four conversations of different lengths: one picture, two pictures of other sizes, text only, and a picture in
    each of two turns (five sizes, so the image grids differ)."""
    from PIL import Image

    sizes = {"a": ("red", (64, 48)), "b": ("green", (32, 32)), "c": ("blue", (80, 64)), "d": ("yellow", (48, 80)),
             "e": ("red", (96, 96))}
    for name, (colour, size) in sizes.items():
        Image.new("RGB", size, COLOURS[colour]).save(folder / f"{name}.png")
    return [
        [user("a.png", "What colour is this picture?"), reply("red.")],
        [user("Compare these two:", "b.png", "c.png", "Which one is darker?"), reply("The second one, it is a deep blue.")],
        [user("What is 2+2?"), reply("4.")],
        [user("d.png", "Describe it."), reply("A yellow square."), user("And this one?", "e.png"), reply("Red, and larger.")],
    ]


@pytest.fixture(scope="module")
def picture_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    path = folder / "pictures.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in picture_conversations(folder)))
    return str(path)


def encoded(model, model_type, tokenizer, data):
    """The data as sft encodes it for this model: its template, its image processor's token counts."""
    processor = tiny_image_processor(model.config)
    images = ImageInputs(processor, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(VISION_START))
    served = copy.copy(tokenizer)
    served.chat_template = official_templates()[TEMPLATES[model_type]].read_text(encoding="utf-8")
    samples, _ = load_sft_dataset(data, resolve_format(served, images=images), 512)
    return [{"input_ids": s.input_ids, "labels": s.labels, "images": s.images, "id": s.id} for s in samples], images


def per_row(batch: dict) -> dict:
    """The batch with each row its own sequence, as sequence_logprobs sums them (dpo's per-sequence loss)."""
    rows, width = batch["input_ids"].shape
    return batch | {"sequence": torch.arange(rows)[:, None].expand(rows, width)}


def step(model, batches: list[dict]) -> tuple[list[tuple[torch.Tensor, int]], dict[str, torch.Tensor]]:
    """A training step over `batches` as sft takes it: each batch's (loss sum, supervised tokens), and the gradient
    of the step's mean token loss on every parameter."""
    model.train().zero_grad()
    terms = [causal_lm_loss_sum(model, batch) for batch in batches]
    n = sum(k for _, k in terms)
    for loss_sum, _ in terms:
        (loss_sum / n).backward()
    return [(loss.detach(), k) for loss, k in terms], {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.support("images", list(TEMPLATES))
@pytest.mark.parametrize("model_type", list(TEMPLATES))
def test_a_padded_batch_of_pictures_gives_each_sample_its_loss_and_gradient_alone(model_type, tokenizer, picture_data):
    """float64: the batch's summed loss and token count, each row's loss, and the training step's gradient (on every
    parameter, the vision tower's too) equal those of each sample alone in its batch (the hybrid Qwen3.5 to
    ~1e-5 of each gradient's norm: transformers computes their delta rule in float32, as in test_hybrid_packing).
    Pictures reach their own rows only: without pixels the picture rows' losses move (by 1e-2 or more) and the text
    row's does not."""
    model = tiny_model(model_type)
    features, images = encoded(model, model_type, tokenizer, picture_data)
    assert [len(f["images"]) for f in features] == [1, 2, 0, 2]
    assert len({len(f["input_ids"]) for f in features}) == 4  # really padded
    collate = PaddedCollator(tokenizer.pad_token_id, images=images)
    batch, alone = collate(features), [collate([f]) for f in features]
    assert batch["image_grid_thw"].tolist() == [g for one in alone for g in one.get("image_grid_thw", torch.zeros(0, 3)).tolist()]
    assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) > 2  # pictures of several sizes

    [(loss_sum, n)], batched = step(model, [batch])
    each, one_by_one = step(model, alone)
    assert n == sum(k for _, k in each)
    torch.testing.assert_close(loss_sum, sum(loss for loss, _ in each), rtol=1e-10, atol=1e-9)
    assert batched.keys() == one_by_one.keys() and any("visual" in name for name in batched)
    worst = max(float((batched[k] - one_by_one[k]).norm() / one_by_one[k].norm()) for k in batched)
    assert worst < (1e-4 if model_type in LINEAR_ATTENTION else 1e-10), worst

    with torch.no_grad():
        rows = -sequence_logprobs(model.eval(), per_row(batch), len(features))
        blind = -sequence_logprobs(model, per_row(batch | {"pixel_values": torch.zeros_like(batch["pixel_values"])}), len(features))
    torch.testing.assert_close(rows, torch.stack([loss for loss, _ in each]), rtol=1e-10, atol=1e-9)
    moved = (blind - rows).abs()
    assert moved[2] == 0 and (moved[[0, 1, 3]] > 1e-3).all(), moved
