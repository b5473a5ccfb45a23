"""Conversations with pictures, token by token, against the golden files of transformers' own Qwen-VL processors.

tests/golden/vision.json (made by tests/golden/make_image_golden.py from the official Qwen2.5 / Qwen3 tokenizers, the
official qwen2_5_vl, qwen3_vl and qwen3_5 templates and the processors' own `__call__`) holds, per case, the ids with
each `<|image_pad|>` expanded to its picture's token count, the supervised character spans, and the pixels. qwen-tune's
encoder must give the same ids, supervise exactly the assistant replies (never a picture token), and hand the model
the same `pixel_values`, `image_grid_thw` and `mm_token_type_ids`; a sample cut at max_length keeps whole pictures only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from qwen_tune.data.chat_format import IGNORE, resolve_format
from qwen_tune.data.collate import PaddedCollator
from qwen_tune.data.image_inputs import ImageInputs
from qwen_tune.data.read import load_conversations
from test_chat_format import supervised_by_spans

GOLDEN = Path(__file__).parent / "golden"
VISION = json.loads((GOLDEN / "vision.json").read_text(encoding="utf-8"))
CONVERSATIONS = {c["name"]: c for c in VISION["conversations"]}


def image_inputs(name: str, tokenizer) -> ImageInputs:
    """The image processor the golden case was made with (its recorded settings)."""
    from transformers import Qwen2VLImageProcessor

    s = VISION["image_processors"][name]
    processor = Qwen2VLImageProcessor(patch_size=s["patch_size"], merge_size=s["merge_size"],
                                      temporal_patch_size=s["temporal_patch_size"], image_mean=s["image_mean"],
                                      image_std=s["image_std"], min_pixels=s["size"]["shortest_edge"],
                                      max_pixels=s["size"]["longest_edge"])
    return ImageInputs(processor, tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                       tokenizer.convert_tokens_to_ids("<|vision_start|>"))


@pytest.fixture(scope="module")
def golden_samples(tmp_path_factory) -> dict:
    """The golden conversations as qwen-tune's data reader gives them: from a data file whose folder has the golden
    pictures in images/ (as the conversations name them), validated, the pictures absolute paths."""
    folder = tmp_path_factory.mktemp("vision")
    (folder / "images").symlink_to(GOLDEN / "images")
    path = folder / "conversations.jsonl"
    rows = [{"id": c["name"], "messages": c["messages"]} | ({"tools": c["tools"]} if "tools" in c else {})
            for c in CONVERSATIONS.values()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {sample.id: sample for sample in load_conversations(str(path))}


def case_format(request, case):
    tokenizer = request.getfixturevalue("qwen2_5_tokenizer" if case["tokenizer"] == "qwen2_5" else "tokenizer")
    images = image_inputs(case["image_processor"], tokenizer)
    return resolve_format(copy.copy(tokenizer), case["template"], images=images), tokenizer


@pytest.mark.parametrize("case", VISION["cases"], ids=[f"{c['template']}-{c['conversation']}" for c in VISION["cases"]])
def test_image_conversations_encode_as_the_processor_expands_them(request, case, golden_samples):
    fmt, tokenizer = case_format(request, case)
    sample = golden_samples[case["conversation"]]
    e = fmt.encode(sample.messages, sample.tools)
    assert e.input_ids == case["input_ids"]
    assert [Path(ref).name for ref in e.images] == [Path(ref).name for ref in case["images"]]
    supervised = supervised_by_spans(tokenizer, case["expanded_text"], case["expanded_supervised_spans"])
    assert [label != IGNORE for label in e.labels] == supervised
    assert e.labels == case["labels"]  # every picture token -100

    batch = PaddedCollator(tokenizer.pad_token_id, images=fmt.images)([{"input_ids": e.input_ids, "labels": e.labels,
                                                                        "images": e.images}])
    assert batch["image_grid_thw"].tolist() == case["image_grid_thw"]
    assert batch["mm_token_type_ids"][0].tolist() == case["mm_token_type_ids"]
    pixels = batch["pixel_values"]
    assert list(pixels.shape) == case["pixel_values_shape"]
    # float32 pixels, normalised to about [-2, 2]: a sum over a few thousand agrees to rounding (4 decimals recorded)
    assert pixels.double().sum().item() == pytest.approx(case["pixel_values_sum"], abs=1e-2)
    assert pixels.double().sum(1).tolist() == pytest.approx(case["pixel_values_row_sums"], abs=1e-3)


def test_a_cut_through_a_picture_keeps_only_whole_pictures(request, golden_samples):
    """Cut inside the second picture's tokens: the sample ends before that picture's <|vision_start|>, keeps the first
    picture (all its tokens) and is flagged truncated; the pixels handed on are the first picture's alone."""
    case = next(c for c in VISION["cases"] if c["conversation"] == "two_images_one_turn" and c["template"] == "qwen3_vl")
    fmt, tokenizer = case_format(request, case)
    ids = case["input_ids"]
    pad, start = fmt.images.image_token_id, fmt.images.vision_start_id
    second_start = [i for i, t in enumerate(ids) if t == start][1]
    e = fmt.encode(golden_samples["two_images_one_turn"].messages, max_length=second_start + 2)
    assert e.truncated and e.input_ids == ids[:second_start] and e.reply_cut  # the reply after the pictures is lost
    assert [Path(ref).name for ref in e.images] == [Path(case["images"][0]).name]
    assert e.input_ids.count(pad) == case["num_image_tokens"][0]
    batch = PaddedCollator(tokenizer.pad_token_id, images=fmt.images)([{"input_ids": e.input_ids, "labels": e.labels,
                                                                        "images": e.images}])
    assert batch["image_grid_thw"].tolist() == case["image_grid_thw"][:1]
    assert int(batch["mm_token_type_ids"].sum()) == int(torch.tensor(case["image_grid_thw"][0]).prod()) // 4


def test_the_image_example_file_reads_every_form_and_renders(tokenizer):
    """data/image_example.jsonl (HF blocks, OpenAI image_url, a data URI, ShareGPT images): every picture is read, in
    order, and rendered as whole runs of picture tokens."""
    from qwen_tune.data.images import image_refs

    samples = load_conversations(str(Path(__file__).parent.parent / "data" / "image_example.jsonl"))
    fmt = resolve_format(copy.copy(tokenizer), "qwen3_vl", images=image_inputs("qwen3_vl", tokenizer))
    counts = {s.id: len(image_refs(s.messages)) for s in samples}
    assert counts == {"hf-blocks": 1, "openai-image-url": 1, "two-turns": 2, "sharegpt": 2}
    for s in samples:
        e = fmt.encode(s.messages)
        assert e.images == image_refs(s.messages) and not e.truncated
        runs = sum(1 for a, b in zip([None] + e.input_ids, e.input_ids) if b == fmt.images.image_token_id != a)
        assert runs == counts[s.id] and e.input_ids.count(fmt.images.vision_start_id) == counts[s.id]


def test_the_tokens_cache_tokenizes_again_when_a_picture_changes(tmp_path, tokenizer):
    """The cache keys on the data file's bytes; a picture is read again at training time, so the cache also records
    each picture's checksum and is rebuilt (one line says which picture) when one changes."""
    import shutil

    from PIL import Image

    from qwen_tune.data.cache import load_tokens
    from qwen_tune.options import CacheOptions

    shutil.copytree(GOLDEN / "images", tmp_path / "images")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS["image_then_text"]["messages"]}) + "\n", encoding="utf-8")
    fmt = resolve_format(copy.copy(tokenizer), "qwen3_vl", images=image_inputs("qwen3_vl", tokenizer))
    options = CacheOptions(tokens_cache=str(tmp_path / "cache"))
    rows, _ = load_tokens(str(data), fmt, 512, options=options)
    assert rows[0]["images"] == [str(tmp_path / "images" / "red_28x28.png")]
    Image.new("RGB", (200, 200), (0, 0, 0)).save(tmp_path / "images" / "red_28x28.png")  # now 16 tokens, not 4
    rows, _ = load_tokens(str(data), fmt, 512, options=options)
    assert rows[0]["input_ids"].count(fmt.images.image_token_id) == 16
