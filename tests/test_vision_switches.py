"""`--train_vision` / `--train_merger`: what of a vision-language checkpoint's vision tower trains, verified in the output.

Peers' traps this guards: a merger left trainable when asked frozen (LLaMA-Factory#9399: a per-type list missed
Qwen3-VL's `pos_embed` and `deepstack_merger_list`), and LoRA on the vision tower that servers ignore (verl#3922).
One short `sft` on pictures per mode (full, LoRA) and switch: every vision-tower tensor that should stay frozen is
bit-for-bit the base's in the saved output, every one that should train changed, and the output's tensor names are
the base's. A LoRA output reloads with PeftModel on AutoModelForImageTextToText, and `merge` folds in the trained merger.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from qwen_tune.data.templates import official_templates
from qwen_tune.options import LoraOptions
from test_hybrid_packing import COMPOSITE, tiny_config
from test_image_training import QUESTION, colour_data

SWITCHES = {"frozen": [], "merger": ["--train_merger", "True"], "vision": ["--train_vision", "True"]}


def weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def is_merger(key: str) -> bool:
    return "merger" in key.split("visual.", 1)[1].split(".")[0]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, tokenizer):
    """A tiny Qwen3-VL checkpoint whose deepstack mergers are used (they read the ViT's blocks 0 and 1; the default
    indexes 8, 16, 24 are past its 2 blocks, so those mergers would get no gradient), and 4 pictures to train on."""
    from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessor

    root = tmp_path_factory.mktemp("vision_switches")
    config = tiny_config("qwen3_vl")
    config.vision_config.deepstack_visual_indexes = [0, 1]
    torch.manual_seed(0)
    base = root / "base"
    AutoModelForImageTextToText.from_config(config).save_pretrained(base)
    served = copy.copy(tokenizer)
    served.chat_template = official_templates()["qwen3_vl"].read_text(encoding="utf-8")
    served.save_pretrained(base)
    vision = config.vision_config
    Qwen2VLImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                          temporal_patch_size=vision.temporal_patch_size, min_pixels=32 * 32, max_pixels=64 * 64).save_pretrained(base)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": f"{colour}."}]} for path, colour in colour_data(root / "pics", 4, seed=0)]
    data = root / "pictures.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, data


@pytest.mark.slow
@pytest.mark.parametrize("mode,switch", [("full", "merger"), ("full", "vision"), ("lora", "frozen"), ("lora", "merger"),
                                         ("lora", "vision")])
def test_only_the_vision_parts_asked_for_train(mode, switch, pictures, tmp_path, capfd):
    """One step of sft's main, as the CLI calls it, in this process (a new one per run would double the time; no warm-up,
    which would make that step's learning rate 0). The default under full training (all of the tower frozen, saved
    unchanged) is test_vision_language's first test."""
    from qwen_tune.methods import sft

    base, data = pictures
    out = tmp_path / "out"
    lora = ["--use_lora", "True", "--lora_r", "4"] if mode == "lora" else []
    sft.main(["--model_name_or_path", str(base), "--data_path", str(data), "--output_dir", str(out), *lora, *SWITCHES[switch],
              "--max_steps", "1", "--warmup_ratio", "0", "--learning_rate", "1e-2", "--per_device_train_batch_size", "4",
              "--report_to", "none", "--save_strategy", "no", "--tokens_cache", "none", "--preprocessing_num_workers", "1"])
    stderr = capfd.readouterr().err
    before = weights(base)
    visual = [k for k in before if ".visual." in f".{k}"]
    assert any(is_merger(k) and "deepstack" in k for k in visual) and any(".blocks." in k for k in visual)
    trains = {k for k in visual if (switch == "merger") == is_merger(k)} if switch != "frozen" else set()

    if mode == "full":
        said = "the merger (merger, deepstack_merger_list" if switch == "merger" else "the ViT (patch_embed, pos_embed, blocks"
        assert f"vision tower: trained: {said}" in stderr, stderr[-3000:]
        after = weights(out)
    else:
        assert "lora: vision tower of qwen3_vl: trained: " in stderr, stderr[-3000:]
        assert ("Servers such as vLLM ignore LoRA" in stderr) == (switch != "frozen")
        adapter = {k.removeprefix("base_model.model."): v for k, v in load_file(out / "adapter_model.safetensors").items()
                   if ".visual." in k}  # PEFT's prefix off: the base's own names
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText

        from qwen_tune.tools.merge import merge

        reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), out).merge_and_unload().state_dict()
        merge(str(out), str(tmp_path / "merged"))
        after = weights(tmp_path / "merged")
        if switch == "frozen":
            assert not adapter
        if switch == "merger":  # the adapter holds the whole trained merger; reloading and merge put exactly it in the model
            assert sorted(adapter) == sorted(k for k in visual if is_merger(k))
            assert all(torch.equal(after[k], adapter[k]) and torch.equal(reloaded[k], adapter[k]) for k in adapter)
        if switch == "vision":  # LoRA adapts the ViT's linear layers; its patch and position embeddings stay frozen
            assert adapter and all(".blocks." in k and ".lora_" in k for k in adapter)
            trains = {k for k in trains if ".blocks." in k and k.endswith(".weight") and "norm" not in k}
            assert all(torch.allclose(after[k], reloaded[k]) for k in trains)

    assert sorted(after) == sorted(before)  # the base's tensor names: no prefix added or lost
    changed = {k for k in visual if not torch.equal(after[k], before[k])}
    assert changed == trains, (sorted(changed - trains), sorted(trains - changed))


def test_every_vision_language_type_splits_its_tower_into_vit_and_mergers():
    """Each vision tower parameter is the ViT's or a merger's, on every type; Qwen3-VL's deepstack mergers are mergers."""
    from transformers import AutoModelForImageTextToText

    from qwen_tune.models.vision import parameters_under, vision_parts

    for model_type in COMPOSITE:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(tiny_config(model_type))
        parts = vision_parts(model)
        tower = {id(p) for name, p in model.named_parameters() if ".visual." in f".{name}"}
        vit, mergers = ({id(p) for p in parameters_under(model, modules)} for modules in (parts.vit, parts.mergers))
        assert vit | mergers == tower and not vit & mergers, model_type
        assert "model.visual.merger" in parts.mergers and "model.visual.blocks" in parts.vit, model_type
        assert any("deepstack" in m for m in parts.mergers) == model_type.startswith("qwen3_vl"), model_type


def test_the_switches_on_a_text_only_model_are_one_line_errors(base_model_path):
    """The embedded model reads text only: asking to train its vision tower is a mistake, said before training (the
    CLI prints a UserError as one line and exits 2)."""
    from qwen_tune.errors import UserError
    from qwen_tune.models.model import load_model
    from qwen_tune.options import VisionTrainingOptions
    from qwen_tune.tools.estimate_memory import EstimateOptions, estimate, read_model_config

    with pytest.raises(UserError, match="^--train_vision and --train_merger: qwen2 is a text-only model, it has no vision tower"):
        load_model(base_model_path, train_vision=True, train_merger=True)
    with pytest.raises(UserError, match="^--train_merger: qwen2 is a text-only model"):
        estimate(EstimateOptions(), LoraOptions(), read_model_config(None, False), VisionTrainingOptions(train_merger=True))


def test_estimate_memory_counts_the_vision_parts_the_switches_train():
    """estimate-memory's trainable parameters are the run's: the ViT or the merger in full, LoRA on the ViT's linear
    layers (rank 4: 4 x (in + out) each), the merger in full under LoRA too."""
    from qwen_tune.options import VisionTrainingOptions
    from qwen_tune.tools.estimate_memory import EstimateOptions, estimate

    config = tiny_config("qwen3_vl")
    trainable = {switch: {mode: estimate(EstimateOptions(), LoraOptions(use_lora=mode == "lora", lora_r=4), config,
                                         VisionTrainingOptions(train_vision=switch == "vision", train_merger=switch == "merger")).trainable
                          for mode in ("full", "lora")} for switch in SWITCHES}
    with torch.device("meta"):
        from transformers import AutoModelForImageTextToText

        from qwen_tune.models.vision import parameters_under, vision_parts

        model = AutoModelForImageTextToText.from_config(config)
        parts = vision_parts(model)
        vit, mergers = (sum(p.numel() for p in parameters_under(model, modules)) for modules in (parts.vit, parts.mergers))
    assert trainable["merger"]["full"] - trainable["frozen"]["full"] == mergers
    assert trainable["vision"]["full"] - trainable["frozen"]["full"] == vit
    assert trainable["merger"]["lora"] - trainable["frozen"]["lora"] == mergers  # in full, as modules_to_save
    lora_on_vit = sum(4 * (m.in_features + m.out_features) for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".visual.blocks." in f".{name}")
    assert trainable["vision"]["lora"] - trainable["frozen"]["lora"] == lora_on_vit


def test_q_lora_quantizes_the_language_model_and_not_the_vision_tower(pictures):
    """Servers run the tower unquantized; a merger trained in full needs real weights (models/vision.py)."""
    from bitsandbytes.nn import Linear4bit

    from qwen_tune.models.model import load_model

    base, _ = pictures
    model = load_model(str(base), q_lora=True, log=lambda _: None)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tower = {name: m for name, m in linears.items() if ".visual." in name}
    language = {name: m for name, m in linears.items() if ".language_model." in name}
    assert tower and not any(isinstance(m, Linear4bit) for m in tower.values())
    assert language and all(isinstance(m, Linear4bit) for m in language.values())
