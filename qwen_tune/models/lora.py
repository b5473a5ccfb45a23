"""LoRA and Q-LoRA adapters: what they adapt on each Qwen model type, with which options, and saying so.

Dense models get PEFT's own `all-linear`. On mixture-of-experts models the routed experts are adapted too (PEFT's
`target_parameters`) and the routers are not; a vision-language model's vision tower is left out unless asked for
(--train_vision: LoRA on the ViT; --train_merger: the merger trained in full). Options are
resolved here once, on the loaded model (the dropout depends on what is adapted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..train.distributed import log
from .vision import vision_parts

# LoRA targets of every linear projection in Qwen1.5/2/2.5/3 (and Qwen v1's c_attn/c_proj/w1/w2).
LORA_TARGETS = "all-linear"
# PEFT's "all-linear" also finds projections that LoRA must leave alone: Qwen4-Exp's attention indexer (frozen by
# load_model: no gradient reaches it) and the vision tower's, but for the ViT's under --train_vision (vision_lora).
INDEXERS = r"(.*\.)?indexer\..*"


def not_adapted(model, train_vision: bool = False) -> str | None:
    """A regex of module names (matched in full) that LoRA leaves alone, or None where the model has none (PEFT warns
    about an exclusion that matches nothing): attention indexers, the vision tower's mergers (frozen, or trained in full
    through modules_to_save) and its ViT unless `train_vision`."""
    parts = vision_parts(model)
    vision = (parts.mergers + (() if train_vision else parts.vit)) if parts else ()
    patterns = [rf"{re.escape(name)}(\..*)?" for name in vision]
    if any(re.fullmatch(INDEXERS, name) for name, _ in model.named_modules()):
        patterns.append(INDEXERS)
    return "|".join(patterns) or None


# Mixture-of-experts. transformers 5 stores a Qwen MoE block's routed experts as two stacked 3-D parameters
# (`experts.gate_up_proj`, `experts.down_proj`: experts x out x in), which no nn.Linear-based targeting (PEFT's
# all-linear) reaches; PEFT adapts them through `target_parameters` (lora.ParamWrapper), which takes no dropout.
# The routers (the block's `gate`, and `shared_expert_gate` beside a shared expert) stay frozen, as is common practice:
# adapting them moves which experts every token reaches, the load-balancing loss only then matters, and a small dataset
# can collapse the routing.
ROUTERS = ("gate", "shared_expert_gate")
DENSE_LORA_DROPOUT = 0.05


def fused_expert_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The routed experts' stacked weights by full name: every 3-D parameter outside a convolution (Qwen3-Next's and
    Qwen3.5's linear-attention conv1d weights are 3-D too)."""
    convolutions = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {f"{module_name}.{name}": p
            for module_name, module in model.named_modules() if not isinstance(module, convolutions)
            for name, p in module.named_parameters(recurse=False) if p.ndim == 3}


def expert_targets(model) -> dict[str, int]:
    """{"experts.gate_up_proj": 4, "experts.down_proj": 4}: PEFT `target_parameters` names of the routed experts'
    stacked weights, with the number of experts per layer."""
    return {".".join(name.split(".")[-2:]): p.shape[0] for name, p in fused_expert_parameters(model).items()}


@dataclass(frozen=True)
class LoraTargets:
    """What an adapter adapts: `modules` (LoraConfig.target_modules; a str is PEFT's, e.g. all-linear) and
    `parameters` (LoraConfig.target_parameters: routed experts, and projections PEFT would otherwise rename), plus
    projections left frozen with the reason (`frozen`), for the log."""

    modules: str | list[str] | None
    parameters: list[str] = field(default_factory=list)
    frozen: str = ""


def lora_targets(model, requested: str | list[str] | None) -> LoraTargets:
    """`--lora_target_modules` on this model. A dense model gets it as given (PEFT resolves all-linear, as before).
    On an MoE model, all-linear is every nn.Linear of the decoder layers but the routers, plus the routed experts;
    a list may name experts too (`experts`, `experts.gate_up_proj`, `gate_up_proj`; `down_proj` names the shared
    expert's and the routed experts' down projections, as in PEFT)."""
    experts = expert_targets(model)
    if not experts:
        return LoraTargets(requested)
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"]
    if requested in (None, LORA_TARGETS):
        modules = sorted({name.rsplit(".", 1)[-1] for name in linear} - set(ROUTERS))
        parameters = list(experts)
    else:
        requested = [requested] if isinstance(requested, str) else list(requested)

        def names_experts(item: str, target: str) -> bool:
            return target == item or target.endswith(f".{item}") or target.startswith(f"{item}.")

        parameters = [t for t in experts if any(names_experts(item, t) for item in requested)]
        modules = [item for item in requested
                   if any(f".{name}".endswith(f".{item}") for name in linear) or not any(names_experts(item, t) for t in experts)]
    return routed_around_peft_renaming(model, modules, parameters)


def renamed_by_peft(model, modules: list[str]) -> set[str]:
    """Module targets that PEFT's transformers-5 conversion rewrites when it creates or reloads an adapter: on qwen3_moe
    and qwen3_next it reads `gate_proj`, `up_proj`, `down_proj` and `gate` as the transformers-4 names of the experts
    and router, so Qwen3-Next's shared-expert projections would silently go unadapted (asked by PEFT itself)."""
    from peft import LoraConfig

    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without the conversion renames nothing
        return set()
    probe = LoraConfig(target_modules=set(modules))
    convert_peft_config_for_transformers(probe, model, None)
    return set(modules) - set(probe.target_modules or ())


def routed_around_peft_renaming(model, modules: list[str], parameters: list[str]) -> LoraTargets:
    """Projections PEFT would rename (`renamed_by_peft`) are adapted through their weight (`NAME.weight`, a 2-D
    ParamWrapper: the same low-rank update, reloaded as such); a 4-bit weight cannot be, so those stay frozen."""
    renamed = renamed_by_peft(model, modules)
    if not renamed:
        return LoraTargets(modules, parameters)
    quantized = [name.removesuffix(".weight") for name, p in model.named_parameters()
                 if type(p).__name__ == "Params4bit" and any(name.endswith(f".{r}.weight") for r in renamed)]
    frozen = (f"{', '.join(dict.fromkeys(layer_label(q) for q in quantized))} stay frozen: PEFT reads these names on "
              f"{model.config.model_type} as the transformers-4 experts', and a 4-bit weight cannot be adapted another way"
              if quantized else "")
    return LoraTargets([m for m in modules if m not in renamed],
                       parameters + [f"{r}.weight" for r in sorted(renamed) if not any(q.endswith(f".{r}") for q in quantized)],
                       frozen)


def layer_label(path: str) -> str:
    """A module's name within its decoder layer's block: `shared_expert.gate_proj` for
    `model.layers.3.mlp.shared_expert.gate_proj`, `q_proj` for `...layers.3.self_attn.q_proj`."""
    in_layer = re.search(r"\.layers\.\d+\.[^.]+\.(.+)$", path.replace(".base_layer", ""))
    return in_layer.group(1) if in_layer else path.rsplit(".", 1)[-1]


def lora_dropout(requested: float | None, targets: LoraTargets, model_type: str, log) -> float:
    """`--lora_dropout`, resolved once: unset means 0.05, or 0 where routed experts are adapted (PEFT's ParamWrapper
    takes no dropout: lora_B(lora_A(dropout(x))) cannot be folded into the stacked weight); a non-zero value there is
    the user's to change."""
    if not targets.parameters:
        return DENSE_LORA_DROPOUT if requested is None else requested
    if requested:
        raise UserError(f"--lora_dropout {requested}: the routed experts of this {model_type} model are adapted through PEFT's "
                        f"ParamWrapper, which takes no dropout; leave --lora_dropout unset (0 here, {DENSE_LORA_DROPOUT} on "
                        "dense models) or pass 0, or leave the experts out of --lora_target_modules")
    if requested is None:
        log(f"lora: dropout 0 (not {DENSE_LORA_DROPOUT}): the routed experts are adapted through PEFT's ParamWrapper, "
            "which takes no dropout")
    return 0.0


def lora_config(model=None, *, r: int, alpha: int, dropout: float | None = None,
                target_modules: str | list[str] | None = LORA_TARGETS, modules_to_save: list[str] | None = None,
                task_type: str = "CAUSAL_LM", train_vision: bool = False, train_merger: bool = False, log=log):
    """The PEFT LoraConfig of our options for `model` (TRL's trainers take it as `peft_config`). Without a model the
    targets are taken as given (PEFT resolves them). Attention indexers are left out, and so is the vision tower but
    for what `train_vision` / `train_merger` ask (vision_lora)."""
    from peft import LoraConfig

    targets = lora_targets(model, target_modules) if model is not None else LoraTargets(target_modules)
    if targets.frozen:
        log(f"lora: {targets.frozen}")
    modules, modules_to_save = targets.modules, list(modules_to_save or [])
    if model is not None and (train_vision or train_merger):
        modules, mergers = vision_lora(model, modules, train_vision, train_merger)
        modules_to_save += mergers
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout(dropout, targets, model_type, log),
                      target_modules=modules, target_parameters=targets.parameters or None,
                      exclude_modules=not_adapted(model, train_vision) if model is not None else None,
                      modules_to_save=modules_to_save or None, task_type=task_type)


def vision_lora(model, modules: str | list[str] | None, train_vision: bool, train_merger: bool):
    """How the vision parts asked for train under LoRA: the ViT's linear layers get LoRA adapters (whatever
    --lora_target_modules names, which is for the language model), the mergers train in full as PEFT
    `modules_to_save` (small, and saved whole in the adapter). Returns (target_modules, mergers to save)."""
    parts = vision_parts(model)
    vit = [name for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and name.startswith(tuple(f"{v}." for v in parts.vit))] if train_vision else []
    if vit and not isinstance(modules, str):  # all-linear (a str) finds them itself once they are not excluded
        modules = list(modules or []) + vit
    return modules, list(parts.mergers) if train_merger else []


def describe_vision_lora(model, asked: bool) -> str:
    """What of the vision tower a PEFT model trains, with tensor and parameter counts. Servers such as vLLM apply LoRA
    to the language model only (verl#3922) and load no modules_to_save there, so either is served only once
    `qwen-tune merge` has folded it into the weights: said here, and in the README."""
    from .vision import count

    visual = [(name, p) for name, p in model.named_parameters() if ".visual." in name]
    adapters = [p for name, p in visual if p.requires_grad and ".lora_" in name]
    whole = [p for name, p in visual if p.requires_grad and ".lora_" not in name]
    frozen = [p for name, p in visual if not p.requires_grad and ".original_module." not in name]  # not the saved copies' originals
    trained = ([f"LoRA adapters on the ViT's linear layers ({count(adapters)})"] * bool(adapters)
               + [f"the merger in full as modules_to_save ({count(whole)})"] * bool(whole))
    what = ["the ViT's base weights and embeddings" if adapters else "the ViT"] + ["the merger"] * (not whole)
    line = (f"vision tower of {model.config.model_type}: trained: {'; '.join(trained) or 'nothing'}; frozen: "
            f"{', '.join(what)} ({count(frozen)})")
    if asked:
        line += (". Servers such as vLLM ignore LoRA and modules_to_save on the vision tower: serve the output of "
                 "`qwen-tune merge --adapter OUT --out DIR`")
    return line


def describe_adapter(model) -> str:
    """What a PEFT LoRA model adapts, one name per module type, in one line: the run log's `lora: adapting ...` and
    the model card's `lora_adapted` say the same."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    names, in_mlp, experts, routers = [], set(), {}, False
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = layer_label(path)
        if ".visual." in path:  # the ViT's, under --train_vision
            name = f"visual.{name}"
        if ".mlp." in path:
            in_mlp.add(name)
        routers |= name.rsplit(".", 1)[-1] in ROUTERS
        if isinstance(module, ParamWrapper):
            if module.get_param().ndim == 3:
                order = list(dict(module.get_base_layer().named_parameters(recurse=False))).index(module.parameter_name)
                experts[f"{name}.{module.parameter_name}"] = (order, module.num_experts)
                continue
            if module.parameter_name != "weight":
                name = f"{name}.{module.parameter_name}"
        if name not in names:
            names.append(name)
    names.sort(key=lambda n: n in in_mlp)  # attention first (hybrid models alternate layer kinds), then the MLP
    text = ", ".join(names + sorted(experts, key=lambda e: experts[e][0])) or "nothing"
    if experts:
        text += f" (routed experts, {max(n for _, n in experts.values())} per layer)"
    if experts or fused_expert_parameters(model):
        text += ("; router adapted" if routers else "; router frozen") + ("" if experts else "; routed experts frozen")
    return text


def prepare_for_kbit_training(model, gradient_checkpointing: bool):
    """PEFT's `prepare_model_for_kbit_training`, except that the routed experts keep their dtype: it upcasts every
    16-bit parameter bitsandbytes left unquantized to float32 (meant for norms), which would double the experts, most
    of an MoE model's memory. Their data is hidden from it while it runs."""
    from peft import prepare_model_for_kbit_training

    experts = list(fused_expert_parameters(model).values())
    data = [p.data for p in experts]
    for p in experts:
        p.data = torch.empty(0, device=p.device)  # float32: nothing to upcast
    try:
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    finally:
        for p, d in zip(experts, data):
            p.data = d


def unquantized_experts(model) -> str | None:
    """One line on what a 4-bit load left in 16/32 bits, where that is most of the model (the routed experts)."""
    experts = fused_expert_parameters(model)
    if not experts:
        return None
    n = sum(p.numel() for p in experts.values())
    total = sum(p.quant_state.shape.numel() if type(p).__name__ == "Params4bit" else p.numel() for p in model.parameters())
    dtype = str(next(iter(experts.values())).dtype).removeprefix("torch.")
    count = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return (f"q_lora: routed experts ({count} parameters, {100 * n / total:.0f}% of the model) stay in {dtype}: "
            "bitsandbytes quantizes nn.Linear only")


def add_lora(model, *, q_lora: bool = False, gradient_checkpointing: bool = False, log=log, **options):
    """Wrap a model with a PEFT LoRA adapter (after `prepare_for_kbit_training` for Q-LoRA) and say what it adapts.
    `options`: those of `lora_config`."""
    from peft import get_peft_model

    if q_lora:
        model = prepare_for_kbit_training(model, gradient_checkpointing)
        if note := unquantized_experts(model):
            log(note)
    model = get_peft_model(model, lora_config(model, log=log, **options))
    log(f"lora: adapting {describe_adapter(model)}")
    if vision_parts(model) is not None:
        log(f"lora: {describe_vision_lora(model, options.get('train_vision') or options.get('train_merger'))}")
    return model
