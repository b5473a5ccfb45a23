"""Synthetic preference pairs with a learnable rule: the chosen reply ends politely, the rejected one rudely.

Held-out pairs use subjects never seen in training, so accuracy on them measures the rule, not memory.
"""

from __future__ import annotations

import json
import random

SUBJECTS = ["the moon", "python lists", "green tea", "a bicycle", "the ocean", "winter", "bread", "music", "a river",
            "the library", "chess", "rain", "a garden", "coffee", "the train", "mountains", "a violin", "paper",
            "the city", "clouds", "honey", "a camera", "the desert", "a lamp", "snow", "a bridge", "the forest",
            "soup", "a kite", "stars"]
TRAIN_SUBJECTS, HELD_OUT_SUBJECTS = SUBJECTS[:20], SUBJECTS[20:]
FACTS = ["is interesting", "has a long history", "changes over time", "is worth learning about", "can be surprising",
         "comes in many forms", "matters to many people", "is simple at first", "is often misunderstood", "has many uses"]
POLITE = ["Thank you for asking, I hope this helps!", "Happy to help, please ask again anytime.", "Thanks for the great question!"]
RUDE = ["Stop asking me such things.", "Figure out the rest yourself.", "That is all you get."]


def polite_pairs(seed: int, n: int, subjects: list[str]) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        subject = r.choice(subjects)
        answer = f"{subject.capitalize()} {r.choice(FACTS)}."
        out.append({
            "id": f"s{seed}-{i}",
            "prompt": [{"role": "user", "content": f"Tell me about {subject}."}],
            "chosen": [{"role": "assistant", "content": f"{answer} {r.choice(POLITE)}"}],
            "rejected": [{"role": "assistant", "content": f"{answer} {r.choice(RUDE)}"}],
        })
    return out


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)
