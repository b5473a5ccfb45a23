"""GRPO rollouts per second, and the share of each step spent generating, on the embedded model.

    python bench/grpo_rollouts.py [--steps 6]

A small SFT policy is trained first (full, 20 epochs on data/sft_example.json); then `qwen-tune grpo`
runs on data/grpo_example.jsonl with the example reward functions (recipes/grpo_rewards.py), one row
per setting. Generation time is measured by timing the policy's `generate` (wrapped through a Trainer
callback, as the tests inject faults); the first step (warm-up) is not counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qwen_tune import grpo, sft  # noqa: E402


class GenerationTimer(TrainerCallback):
    """Wraps the policy's `generate` at the start of training; sums its time from step 2 on."""

    def __init__(self):
        self.generating = self.step_start = self.timed = 0.0
        self.counting = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        generate = target.generate

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                if self.counting:
                    self.generating += time.perf_counter() - start
        target.generate = timed
        if target is not model:
            model.generate = timed

    def on_step_begin(self, args, state, control, **kwargs):
        self.counting = state.global_step >= 1  # step 1 is warm-up
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.counting:
            self.timed += time.perf_counter() - self.step_start


def run(policy: str, out: str, steps: int, generations: int, length: int, extra: list[str]) -> dict:
    timer = GenerationTimer()
    grpo.main(["--policy", policy, "--prompts", os.path.join(ROOT, "data", "grpo_example.jsonl"), "--output_dir", out,
               "--reward_funcs", ",".join(os.path.join(ROOT, "recipes", f"grpo_rewards.py:{f}") for f in ("exact_answer", "number_only")),
               "--max_steps", str(steps), "--num_generations", str(generations), "--per_device_train_batch_size", str(generations),
               "--max_completion_length", str(length), "--learning_rate", "1e-4", "--save_strategy", "no", "--report_to", "none",
               "--logging_steps", "1", "--disable_tqdm", "True", *extra], callbacks=(timer,))
    rollouts = (steps - 1) * generations
    return {"rollouts/s": rollouts / timer.timed, "generation share": timer.generating / timer.timed,
            "seconds per step": timer.timed / (steps - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    a = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="grpo-bench-")
    policy = os.path.join(tmp, "sft")
    sft.main(["--data_path", os.path.join(ROOT, "data", "sft_example.json"), "--output_dir", policy, "--num_train_epochs", "20",
              "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"])
    settings = [("full, 8 completions x 32 tokens", 8, 32, []),
                ("full, 16 completions x 32 tokens", 16, 32, []),
                ("LoRA r16, 8 completions x 32 tokens", 8, 32, ["--use_lora", "True", "--lora_r", "16", "--lora_alpha", "32"])]
    rows = []
    for i, (name, generations, length, extra) in enumerate(settings):
        rows.append((name, run(policy, os.path.join(tmp, f"run{i}"), a.steps, generations, length, extra)))
    print(f"\n# GRPO rollouts on the embedded model\n\n`python bench/grpo_rollouts.py --steps {a.steps}` "
          f"(CPU, {os.cpu_count()} cores, fp32; steps 2..{a.steps} timed)\n")
    print("| setting | rollouts/s | seconds per step | share of the step generating |\n|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['rollouts/s']:.1f} | {r['seconds per step']:.2f} | {r['generation share']:.0%} |")


if __name__ == "__main__":
    main()
