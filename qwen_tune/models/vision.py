"""What of a vision-language checkpoint's vision tower trains: nothing by default, its ViT (`--train_vision`), its
merger(s) (`--train_merger`). Everything else of the tower is frozen here, and the log line says what is which.

The tower is the model's `visual` module. Its mergers project the ViT's features into the language model: `merger`
on every Qwen VL type, plus Qwen3-VL's `deepstack_merger_list` (features of intermediate ViT blocks added to early
language-model layers). The ViT is the rest: the patch embedding, the position embedding (Qwen3-VL, Qwen3.5+) and
the blocks. Parts are found by name under `visual` (any child named `*merger*` is a merger), not from a list per
model type, so a part a list would miss cannot stay trainable unseen (LLaMA-Factory#9399).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

TOWER = "visual"
# The tower's module names, for bitsandbytes' skip list (a regex matched from the start of a module's name): Q-LoRA
# quantizes the language model only. The tower stays in the training dtype, as servers run it (training on 4-bit
# picture features would teach the adapter features it never sees when served), and a merger trained in full
# (--train_merger) needs real weights. It is a few percent of the model.
TOWER_PATTERN = rf"(.*\.)?{TOWER}"


@dataclass(frozen=True)
class VisionParts:
    """Module names (full, as in `model.named_modules()`) of the ViT's parts and of the mergers. A ModuleList of
    mergers is named by its elements (PEFT's `modules_to_save` wraps modules, and a wrapped list cannot be indexed)."""

    vit: tuple[str, ...]
    mergers: tuple[str, ...]


def vision_parts(model) -> VisionParts | None:
    """The ViT's and the mergers' modules, or None for a model without a vision tower."""
    tower = next((name for name, _ in model.named_modules() if name.split(".")[-1] == TOWER), None)
    if tower is None:
        return None
    vit, mergers = [], []
    for child, module in model.get_submodule(tower).named_children():
        name = f"{tower}.{child}"
        if next(module.parameters(), None) is None:  # the rotary embedding: nothing to train
            continue
        if "merger" not in child:
            vit.append(name)
        elif isinstance(module, torch.nn.ModuleList):
            mergers += [f"{name}.{i}" for i in range(len(module))]
        else:
            mergers.append(name)
    return VisionParts(tuple(vit), tuple(mergers))


def parameters_under(model, modules) -> list[torch.nn.Parameter]:
    prefixes = tuple(f"{m}." for m in modules)
    return [p for name, p in model.named_parameters() if name.startswith(prefixes)]


def numel(p: torch.nn.Parameter) -> int:
    """A parameter's size: under ZeRO-3 each rank holds a slice (`ds_numel` is the whole); a 4-bit one is packed."""
    if type(p).__name__ == "Params4bit":
        return p.quant_state.shape.numel()
    return getattr(p, "ds_numel", p.numel())


def count(parameters) -> str:
    return f"{len(parameters)} tensors, {sum(numel(p) for p in parameters):,} parameters"


def short(modules) -> str:
    """`patch_embed, blocks` for `model.visual.patch_embed`, `model.visual.blocks`; merger lists by their name once."""
    names = [m.split(f"{TOWER}.", 1)[1].split(".")[0] for m in modules]
    return ", ".join(dict.fromkeys(names))


def check_vision_options(model, train_vision: bool, train_merger: bool) -> VisionParts | None:
    """The model's vision parts; asking to train them on a model without any is a mistake, said in one line."""
    parts = vision_parts(model)
    if parts is None and (train_vision or train_merger):
        flags = " and ".join(f for f, on in (("--train_vision", train_vision), ("--train_merger", train_merger)) if on)
        raise UserError(f"{flags}: {model.config.model_type} is a text-only model, it has no vision tower to train")
    return parts


def set_vision_training(model, *, train_vision: bool = False, train_merger: bool = False, adapter: bool = False, log) -> None:
    """Full training: the chosen parts trainable, the rest of the tower frozen (and saved unchanged), said in one line
    with tensor and parameter counts. `adapter`: a LoRA adapter follows, and add_lora decides how the chosen parts
    train and says so (models/lora.py); all of the tower is frozen here."""
    parts = check_vision_options(model, train_vision, train_merger)
    if parts is None:
        return
    chosen = {"ViT": (parts.vit, train_vision and not adapter), "merger": (parts.mergers, train_merger and not adapter)}
    for modules, on in chosen.values():
        for p in parameters_under(model, modules):
            p.requires_grad_(on)
    if adapter:
        return
    said = {on: "; ".join(f"the {kind} ({short(modules)}: {count(parameters_under(model, modules))})"
                          for kind, (modules, trained) in chosen.items() if trained == on and modules) for on in (True, False)}
    log(f"model: {model.config.model_type} is vision-language; loaded as {type(model).__name__}; vision tower: "
        f"trained: {said[True] or 'nothing'}; frozen: {said[False] or 'nothing'}")
