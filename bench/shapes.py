"""Model shapes for the benchmarks: the published configurations of real Qwen checkpoints, with random weights.

Nothing is downloaded: the configuration numbers are those of the released `config.json` files, the weights are
initialised from them (speed and memory do not depend on their values), and the tokenizer is the embedded model's
(the real Qwen tokenizer) with the checkpoint's official chat template, so qwen-tune and TRL read the same
directory the way they read a real checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

COMMON = {"vocab_size": 151936, "tie_word_embeddings": True, "hidden_act": "silu", "rms_norm_eps": 1e-6,
          "bos_token_id": 151643, "eos_token_id": 151645, "attention_dropout": 0.0}
SHAPES = {
    # the embedded model (qwen_tune/assets/embedded_model_config.json): the vocabulary is almost all of its compute
    "embedded": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 176, "max_position_embeddings": 4096,
                 "rope_theta": 1e6, "template": "qwen2_5"},
    # Qwen/Qwen2.5-0.5B(-Instruct) config.json
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "max_position_embeddings": 32768,
                     "rope_theta": 1e6, "template": "qwen2_5"},
    # Qwen/Qwen3-0.6B config.json (head_dim 128, q/k norms)
    "qwen3-0.6b": {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "max_position_embeddings": 40960,
                   "rope_theta": 1e6, "template": "qwen3"},
}


def config_of(shape: str):
    """The transformers configuration of a shape."""
    from transformers import AutoConfig

    spec = {k: v for k, v in SHAPES[shape].items() if k != "template"}
    model_type = spec.pop("model_type")
    theta = spec.pop("rope_theta")
    return AutoConfig.for_model(model_type, **COMMON, **spec, rope_parameters={"rope_type": "default", "rope_theta": theta})


def build_shape(shape: str, directory: Path) -> Path:
    """Write a random-weight checkpoint of `shape` to `directory` (once; reused while its config is the same)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_tune.data.chat_format import official_templates
    from qwen_tune.model import resolve_model_path

    directory = Path(directory)
    stamp = directory / "bench_shape.json"
    spec = json.dumps(SHAPES[shape], sort_keys=True)
    if stamp.is_file() and stamp.read_text() == spec:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_of(shape), dtype=torch.float32)
    model.save_pretrained(directory)
    embedded = Path(resolve_model_path(None))
    shutil.copy(embedded / "tokenizer.json", directory / "tokenizer.json")
    tokenizer_config = json.loads((embedded / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = official_templates()[SHAPES[shape]["template"]].read_text(encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1), encoding="utf-8")
    stamp.write_text(spec)
    return directory


def parameter_counts(config) -> dict:
    """Parameters of a decoder shape: the blocks (each token's matmuls), the embedding (a lookup), the output
    projection (the tied embedding again: a matmul at every position that computes logits)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if config.model_type == "qwen2" else 0)  # qwen2: q/k/v biases
    mlp = 3 * h * inter
    return {"blocks": layers * (attention + mlp), "vocab_projection": config.vocab_size * h,
            "attention_width": q, "layers": layers}


if __name__ == "__main__":  # python bench/shapes.py SHAPE DIRECTORY: write the checkpoint, print its path
    import sys

    print(build_shape(sys.argv[1], Path(sys.argv[2])))
