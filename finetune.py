"""The seed's entry point: `python finetune.py --data_path data.json --output_dir out [--use_lora True ...]`.

Same as `qwen-tune sft`; see `python finetune.py --help`.
"""

from qwen_tune.cli import entry

if __name__ == "__main__":
    entry(["sft"])
