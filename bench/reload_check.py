"""Reload a qwen-tune output in this fresh process the way the README says, and make it answer (or score).

    python bench/reload_check.py OUTPUT_DIR     # prints the reply's first words (or the reward), exits 1 if it fails

Used by bench/gpu_smoke.sh after every recipe: a LoRA / Q-LoRA adapter through AutoPeftModelForCausalLM, a full
model through AutoModelForCausalLM, a reward model through AutoModelForSequenceClassification.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

QUESTION = [{"role": "user", "content": "Who are you?"}]


def main(out: Path) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures", [])):
        model = AutoModelForSequenceClassification.from_pretrained(out).to(device).eval()
        text = tokenizer.apply_chat_template(QUESTION + [{"role": "assistant", "content": "A model."}], tokenize=False)
        with torch.no_grad():
            return f"reward {model(**tokenizer(text, return_tensors='pt').to(device)).logits[0, 0].item():.3f}"
    if (out / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    model = model.to(device).eval()
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
    with torch.no_grad():
        reply = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return ascii(tokenizer.decode(reply[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)[:40])  # one line, whatever it says


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
