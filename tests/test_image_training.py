"""Images in the conversations: a vision-language checkpoint fine-tuned on pictures learns what is in them.

Tiny random Qwen3-VL and Qwen3.5 checkpoints (with their image processor's config, built from config; no download)
are trained with `qwen-tune sft` on generated pictures of solid colours, asked "What colour is this picture?". After a
reload in a fresh process, greedy answers to held-out pictures (other shades and sizes) name the colour: the image
tokens reached the model, in the places and numbers the processor gives them, and only the replies were learned.
The reload uses transformers alone (the image processor, the tokenizer's template, and the processor's expansion of
`<|image_pad|>`), as a user or a server would, not qwen-tune's code.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

from helpers import run_cli, run_python
from qwen_tune.data.templates import official_templates
from test_hybrid_packing import save_tiny_checkpoint

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTION = "What colour is this picture?"
TEMPLATES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_5": "qwen3_5_nothink", "qwen3_5_moe": "qwen3_5_nothink"}

GENERATE_WITH_IMAGES = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer
out, kind, base, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if kind == "adapter":
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), out).eval()
    saved, loaded = load_file(f"{out}/adapter_model.safetensors"), get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved), "not loaded as saved"
else:
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
tok, images = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
answers = []
for path in cases:
    messages = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": %r}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixels = images(images=[Image.open(path).convert("RGB")], return_tensors="pt")
    n = int(pixels["image_grid_thw"][0].prod()) // images.merge_size ** 2  # as Qwen3VLProcessor expands it
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    mm = (ids["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    gen = model.generate(**ids, **pixels, mm_token_type_ids=mm, max_new_tokens=6, do_sample=False)
    answers.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
print(json.dumps(answers))
""" % QUESTION


def picture(path, colour: str, rng: random.Random) -> str:
    """A solid picture of a colour, its shade and size varied."""
    from PIL import Image

    shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    Image.new("RGB", (rng.choice([48, 64, 80]), rng.choice([48, 64])), shade).save(path)
    return str(path)


def colour_data(folder, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    folder.mkdir(exist_ok=True)
    return [(picture(folder / f"{i}.png", colour, rng), colour) for i, colour in enumerate(list(COLOURS) * (n // len(COLOURS)))]


def colour_questions(folder, n: int):
    """A data file of n questions about the colour of pictures in folder/train, answered."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": f"train/{path.rsplit('/', 1)[1]}"},
                                                       {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": f"{colour}."}]} for path, colour in colour_data(folder / "train", n, seed=0)]
    data = folder / "pictures.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def tiny_vision_checkpoint(model_type: str, path, tokenizer) -> str:
    """A tiny random checkpoint of model_type carrying its official template, as a released one does."""
    served = copy.copy(tokenizer)
    served.chat_template = official_templates()[TEMPLATES[model_type]].read_text(encoding="utf-8")
    return save_tiny_checkpoint(model_type, path, served)


@pytest.mark.slow
@pytest.mark.parametrize("model_type,mode,flags", [
    pytest.param("qwen3_vl", "full", ["--learning_rate", "1e-3", "--num_train_epochs", "3"], marks=pytest.mark.support("images", ["qwen3_vl"])),
    pytest.param("qwen3_5_moe", "lora", ["--use_lora", "True", "--learning_rate", "3e-3", "--num_train_epochs", "6"],
                 marks=pytest.mark.support("images", ["qwen3_5_moe"])),
])
def test_sft_on_pictures_learns_to_name_their_colour_and_reloads(model_type, mode, flags, tmp_path, tokenizer):
    base = tiny_vision_checkpoint(model_type, tmp_path / "base", tokenizer)
    data = colour_questions(tmp_path, 48)
    out = tmp_path / mode
    proc = run_cli("sft", "--model_name_or_path", base, "--data_path", str(data), "--output_dir", str(out), *flags,
                   "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no")
    assert "packing: off: the data has images" in proc.stderr
    assert (out / "preprocessor_config.json").is_file()

    held_out = colour_data(tmp_path / "held_out", 20, seed=1)
    got = run_python([str(out), "adapter" if mode == "lora" else "full", base, json.dumps([p for p, _ in held_out])],
                     code=GENERATE_WITH_IMAGES, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    answers = json.loads(got.stdout.strip().splitlines()[-1])
    right = [a.strip().rstrip(".") == colour for a, (_, colour) in zip(answers, held_out)]
    assert sum(right) >= 18, list(zip(answers, [c for _, c in held_out]))
    if mode == "full":  # the CLI tools read pictures too
        path, colour = held_out[right.index(True)]
        chat = run_cli("chat", "--model", str(out), "--image", path, "--prompt", QUESTION)
        assert chat.stdout.strip().rstrip(".") == colour, chat.stdout
        loss = {m: json.loads(run_cli("eval", "--model", m, "--data", str(data)).stdout.strip().splitlines()[-1])["loss"]
                for m in (base, str(out))}
        assert loss[str(out)] < loss[base] - 1, loss  # what training logged, over the pictures (the base is at 12)
        shown = run_cli("preprocess", "--data", str(data), "--tokenizer", str(out), "--show", "1").stdout
        assert f"<|image_pad|> x 4 ({tmp_path / 'train' / '0.png'})" in shown and "[[red.<|im_end|>]]" in shown


@pytest.mark.slow
@pytest.mark.support("images", ["qwen3_5"])
def test_q_lora_on_pictures_trains_and_its_adapter_reloads_and_answers_a_picture(tmp_path, tokenizer):
    """Q-LoRA (bitsandbytes NF4, which quantizes on CPU too) on picture conversations of a tiny Qwen3.5: a finite loss
    at every step, every adapter matrix trained (B starts at zero), and the saved adapter reloads in a fresh process
    with PEFT on AutoModelForImageTextToText (every tensor as saved) and answers a picture prompt."""
    base = tiny_vision_checkpoint("qwen3_5", tmp_path / "base", tokenizer)
    data, out = colour_questions(tmp_path, 4), tmp_path / "qlora"
    proc = run_cli("sft", "--model_name_or_path", base, "--data_path", str(data), "--output_dir", str(out), "--use_lora", "True",
                   "--q_lora", "True", "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                   "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no")
    assert "packing: off: the data has images" in proc.stderr
    losses = [v for _, v in json.loads((out / "loss.json").read_text())["loss"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    from safetensors.torch import load_file

    lora_b = [t for name, t in load_file(out / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
    got = run_python([str(out), "adapter", base, json.dumps([str(tmp_path / "train" / "0.png")])], code=GENERATE_WITH_IMAGES,
                     timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    [answer] = json.loads(got.stdout.strip().splitlines()[-1])
    assert isinstance(answer, str)


def test_dpo_on_picture_prompts_prefers_the_right_colour(tmp_path, tokenizer):
    """Pairs whose prompt shows a picture (the right colour chosen, another rejected): dpo pads them (pixels reach the
    model) and the chosen-over-rejected margin grows from 0."""
    served = copy.copy(tokenizer)
    served.chat_template = official_templates()["qwen3_vl"].read_text(encoding="utf-8")
    base = save_tiny_checkpoint("qwen3_vl", tmp_path / "base", served)
    names = list(COLOURS)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": QUESTION}]}],
             "chosen": [{"role": "assistant", "content": f"{colour}."}],
             "rejected": [{"role": "assistant", "content": f"{names[(names.index(colour) + 1) % 4]}."}]}
            for path, colour in colour_data(tmp_path / "train", 16, seed=0)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    proc = run_cli("dpo", "--model_name_or_path", base, "--data_path", str(data), "--output_dir", str(out), "--max_steps", "6",
                   "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
                   "--report_to", "none", "--save_strategy", "no")
    assert "packing: off: the data has images" in proc.stderr
    margins = [v for _, v in json.loads((out / "loss.json").read_text())["rewards/margins"]]
    assert margins[0] == 0 and margins[-1] > 0.1, margins
    assert (out / "preprocessor_config.json").is_file()


def test_picture_problems_are_named_with_file_and_line(tmp_path, base_model_path):
    """A missing picture, and pictures for a model that reads text only: one clear line each, exit 2, no traceback."""
    picture(tmp_path / "ok.png", "red", random.Random(0))
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": "red."}]} for name in ("ok.png", "gone.png")]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("sft", "--data_path", str(bad), "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "bad.jsonl:2" in proc.stderr and f"no such file {tmp_path / 'gone.png'}" in proc.stderr
    bad.write_text(json.dumps(rows[0]) + "\n")
    proc = run_cli("sft", "--data_path", str(bad), "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "bad.jsonl:1" in proc.stderr and "has images, which this run cannot use" in proc.stderr
