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
    # Qwen/Qwen3.5-0.8B config.json, its text_config (the vision tower is frozen in text SFT and left out here):
    # 18 Gated DeltaNet + 6 gated full-attention layers, partial rotary 0.25
    "qwen3.5-0.8b": {"model_type": "qwen3_5_text", "hidden_size": 1024, "num_hidden_layers": 24,
                     "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "intermediate_size": 3584,
                     "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
                     "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "vocab_size": 248320,
                     "max_position_embeddings": 262144, "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                     "template": "qwen3_5_nothink"},
    # Qwen/Qwen3.5-35B-A3B's layers (hidden 2048, 8 of the experts + a shared one, each 512 wide; 32/16 DeltaNet
    # heads), but 4 of its 40 layers and 32 of its 256 experts: the same work per token and layer, in this
    # machine's memory (all 256 experts of 4 layers would be 13 GB in fp32 before any training state).
    # The untied 248k vocabulary (1 B parameters) leaves room for LoRA rows only.
    "qwen3.5-35b-a3b-4l32e": {"model_type": "qwen3_5_moe_text", "hidden_size": 2048, "num_hidden_layers": 4,
                              "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                              "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                              "num_experts": 32, "num_experts_per_tok": 8,
                              "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                              "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "vocab_size": 248320,
                              "tie_word_embeddings": False, "max_position_embeddings": 262144, "rope_theta": 1e7,
                              "partial_rotary_factor": 0.25, "template": "qwen3_5_nothink", "lora_only": True},
}


def config_of(shape: str):
    """The transformers configuration of a shape."""
    from transformers import AutoConfig

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("template", "lora_only")}
    model_type = spec.pop("model_type")
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
    if "partial_rotary_factor" in spec:
        rope["partial_rotary_factor"] = spec.pop("partial_rotary_factor")
    return AutoConfig.for_model(model_type, **{**COMMON, **spec}, rope_parameters=rope)


def is_hybrid(shape: str) -> bool:
    """Whether the shape has linear-attention (Gated DeltaNet) layers."""
    return "linear_num_value_heads" in SHAPES[shape]


def lora_only(shape: str) -> bool:
    """Whether only adapter rows fit in this machine's memory (full fine-tuning of the shape would not)."""
    return SHAPES[shape].get("lora_only", False)


def build_shape(shape: str, directory: Path) -> Path:
    """Write a random-weight checkpoint of `shape` to `directory` (once; reused while its config is the same)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_tune.data.templates import official_templates
    from qwen_tune.models.model import resolve_model_path

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
    """What a token costs in a decoder shape, counted on the model itself (built on the meta device, no memory):
    `blocks`, the block parameters each token multiplies (norms included: a rounding error; of routed experts only
    the share a token visits, top-k of n); `vocab_projection`, the output projection (a matmul at each position
    that computes logits); `attention_width` and `layers`, the query width and the number of full-attention layers
    (their cost grows with the square of the length); `linear_state`, per token, the recurrent state's size summed
    over the linear-attention layers (heads x key dim x value dim: read, updated and read again each token)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expert_share = getattr(config, "num_experts_per_tok", 1) / getattr(config, "num_experts", 1)
    blocks = sum(p.numel() * (expert_share if ".experts." in name else 1)
                 for name, p in model.model.layers.named_parameters())
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    linear_state = layer_types.count("linear_attention") * getattr(config, "linear_num_value_heads", 0) * \
        getattr(config, "linear_key_head_dim", 0) * getattr(config, "linear_value_head_dim", 0)
    return {"blocks": int(blocks), "vocab_projection": config.vocab_size * config.hidden_size,
            "attention_width": config.num_attention_heads * head_dim,
            "layers": layer_types.count("full_attention"), "linear_state": linear_state}


if __name__ == "__main__":  # python bench/shapes.py SHAPE DIRECTORY: write the checkpoint, print its path
    import sys

    print(build_shape(sys.argv[1], Path(sys.argv[2])))
