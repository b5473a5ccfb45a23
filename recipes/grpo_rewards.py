"""Example reward functions for `qwen-tune grpo` (TRL's convention).

Each is called on a batch: `prompts` (the conversations), `completions` (each a list with the
assistant message), and every other field of the prompts file as a keyword list (here `answer`).
Return one number per completion (or None where the function does not apply).
"""

import re


def exact_answer(prompts, completions, answer, **kwargs):
    """1.0 when the reply is exactly the expected answer (a whole-answer check cannot be gamed by
    listing several candidates, as a substring test can)."""
    return [1.0 if c[0]["content"].strip().rstrip(".") == str(a) else 0.0 for c, a in zip(completions, answer)]


def number_only(prompts, completions, **kwargs):
    """0.2 for a reply that is just a number, as the prompts ask."""
    return [0.2 if re.fullmatch(r"\s*-?\d+(\.\d+)?\.?\s*", c[0]["content"]) else 0.0 for c in completions]
