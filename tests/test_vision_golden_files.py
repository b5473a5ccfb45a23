"""The image goldens agree with themselves: tests/golden/vision.json (made by tests/golden/make_image_golden.py from the
official tokenizers, templates and image processor) and the PNGs it names.

Fast and offline: only the JSON and the PNG headers are read. Whether qwen-tune's own encoder reproduces these goldens
is tested elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
VISION = json.loads((GOLDEN / "vision.json").read_text(encoding="utf-8"))
IMAGE_TOKEN, IMAGE_ID = VISION["image_token"], VISION["image_token_id"]
VISION_START, VISION_END, IM_END = 151652, 151653, 151645


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """transformers' Qwen2-VL smart_resize, restated."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def test_images_are_the_recorded_rgb_pngs():
    assert len(VISION["images"]) >= 4
    for rel, info in VISION["images"].items():
        data = (GOLDEN / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], rel
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", rel
        size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
        assert size == (info["width"], info["height"]) and data[25] == 2, rel  # colour type 2: RGB, no alpha


def test_every_template_covers_every_conversation():
    names = sorted(c["name"] for c in VISION["conversations"])
    for template in VISION["templates"]:
        done = [c["conversation"] for c in VISION["cases"] if c["template"] == template]
        skipped = [s["conversation"] for s in VISION["skipped"] if s["template"] == template]
        assert sorted(done + skipped) == names and len(done) >= 5, template


@pytest.mark.parametrize("case", VISION["cases"], ids=lambda c: f"{c['template']}-{c['conversation']}")
def test_case_is_consistent(case):
    ip = VISION["image_processors"][case["image_processor"]]
    patch, merge, temporal = ip["patch_size"], ip["merge_size"], ip["temporal_patch_size"]
    ids, labels, mm, grids = case["input_ids"], case["labels"], case["mm_token_type_ids"], case["image_grid_thw"]
    assert len(ids) == len(labels) == len(mm)
    assert len(grids) == len(case["images"]) == case["text"].count(IMAGE_TOKEN) >= 1

    # each grid follows from the PNG's size and the recorded settings
    for rel, grid in zip(case["images"], grids):
        info = VISION["images"][rel]
        size = ip["size"]
        h, w = smart_resize(info["height"], info["width"], patch * merge, size["shortest_edge"], size["longest_edge"])
        assert grid == [1, h // patch, w // patch], rel
    n = [math.prod(g) // merge**2 for g in grids]
    assert case["num_image_tokens"] == n
    assert case["pixel_values_shape"] == [sum(math.prod(g) for g in grids), 3 * temporal * patch * patch]

    # the expansion: one run of prod(grid) // merge**2 image tokens per image, between vision start and end
    parts = case["text"].split(IMAGE_TOKEN)
    assert case["expanded_text"] == parts[0] + "".join(IMAGE_TOKEN * k + rest for k, rest in zip(n, parts[1:]))
    assert ids.count(IMAGE_ID) == sum(n)
    starts = [i for i, t in enumerate(ids) if t == IMAGE_ID and ids[i - 1] != IMAGE_ID]
    assert [ids[s - 1] for s in starts] == [VISION_START] * len(n)
    assert [ids[s + k] for s, k in zip(starts, n)] == [VISION_END] * len(n)
    assert ids[starts[0]:starts[0] + n[0]] == [IMAGE_ID] * n[0]
    assert mm == [int(t == IMAGE_ID) for t in ids]

    # labels: the ids inside assistant bodies, -100 elsewhere (every image token included)
    assert all(lab in (-100, t) for lab, t in zip(labels, ids))
    assert all(lab == -100 for lab, t in zip(labels, ids) if t == IMAGE_ID)
    text, exp = case["text"], case["expanded_text"]
    spans, exp_spans = case["supervised_spans"], case["expanded_supervised_spans"]
    assert len(spans) == len(exp_spans) == sum(m["role"] == "assistant" for m in conversation(case)["messages"])
    assert [text[a:b] for a, b in spans] == [exp[a:b] for a, b in exp_spans]
    assert all(text[a:b].endswith("<|im_end|>") for a, b in spans)
    assert [t for lab, t in zip(labels, ids) if lab != -100].count(IM_END) == len(spans)


def conversation(case):
    return next(c for c in VISION["conversations"] if c["name"] == case["conversation"])
