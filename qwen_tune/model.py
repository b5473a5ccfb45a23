"""Loading the base model: the embedded default, a local/hub checkpoint; full, LoRA or Q-LoRA.

The embedded default is a small Qwen2-architecture model (full 151,936-word vocabulary, 2 layers)
built from the config in `assets/`, with deterministic weights, saved once to a stable local
directory so that LoRA adapters record an absolute base path that reloads anywhere on this machine.

Its final RMSNorm weight is FINAL_NORM_SCALE, not 1: with tied embeddings of std 0.02 and a unit norm,
no logit can exceed about 1.3, so an adapter (which trains neither the embeddings nor the norm)
could only lift the trained answer a fraction of a logit above chance (loss 11.9 -> 10.7), and a
4-bit base or another CPU's rounding flipped its greedy answers. A trained model's final norm scales
its hidden state up in the same way; with 10, LoRA and Q-LoRA demos reach a loss near 1.4.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .errors import UserError
from .linear_attention import split_linear_attention, splits_packed_rows
from .train.distributed import log
from .tokenizer import QWEN_SPEC, cache_dir, load_tokenizer

EMBEDDED_CONFIG = Path(__file__).parent / "assets" / "embedded_model_config.json"
EMBEDDED_NAME = "qwen-tune-embedded-qwen2"

# LoRA targets of every linear projection in Qwen1.5/2/2.5/3 (and Qwen v1's c_attn/c_proj/w1/w2).
LORA_TARGETS = "all-linear"
FINAL_NORM_SCALE = 10.0


def embedded_model_path() -> str:
    """Build (once) and return the absolute path of the embedded default model directory."""
    build = f"final_norm={FINAL_NORM_SCALE}".encode()
    digest = __import__("hashlib").sha256(EMBEDDED_CONFIG.read_bytes() + QWEN_SPEC.read_bytes() + build).hexdigest()[:12]
    target = cache_dir() / f"{EMBEDDED_NAME}-{digest}"
    if not (target / "config.json").exists():
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = json.loads(EMBEDDED_CONFIG.read_text())
        cfg.pop("architectures", None)
        config = Qwen2Config(**cfg)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            model.model.norm.weight.fill_(FINAL_NORM_SCALE)
        set_generation_defaults(model)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-model-"))
        model.save_pretrained(tmp)
        load_tokenizer().save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: parallel processes never load half a model
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target.resolve())


def resolve_model_path(name_or_path: str | None) -> str:
    """None -> the embedded model; a local path -> absolute (adapters must record where the base is)."""
    if not name_or_path:
        return embedded_model_path()
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"--model_name_or_path {name_or_path}: the directory has no config.json; is it a model?")
        return str(p.resolve())
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.rstrip(os.sep) and name_or_path.count("/") != 1:
        raise UserError(f"--model_name_or_path {name_or_path}: no such directory")
    return hub_model(name_or_path)


def hub_model(repo_id: str) -> str:
    """A hub id: used from the local cache when it is there; otherwise the hub must be reachable.

    Checked with one connection (3 s at most), so that without network the user gets the message at once
    instead of after a minute of the hub client's retries.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return repo_id
    fix = f"download it where there is network (hf download {repo_id} --local-dir DIR) and pass --model_name_or_path DIR"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"--model_name_or_path {repo_id}: not a local directory and not in the Hugging Face cache, and "
                        f"HF_HUB_OFFLINE is set; {fix}")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        raise UserError(f"--model_name_or_path {repo_id}: not a local directory and not in the Hugging Face cache, and "
                        f"{url.hostname} cannot be reached ({e.strerror or e}); {fix}") from e
    return repo_id


def set_generation_defaults(model: PreTrainedModel) -> None:
    """Stop at `<|im_end|>` (the end of an assistant turn): a model that never stops is the top complaint."""
    gc = getattr(model, "generation_config", None)
    if gc is None:  # a reward model (sequence classification) does not generate
        return
    im_end, eot = 151645, 151643
    if getattr(model.config.get_text_config(), "vocab_size", 0) > im_end:
        gc.eos_token_id = [im_end, eot]
        gc.pad_token_id = eot
        model.config.eos_token_id = im_end
        model.config.pad_token_id = eot


def read_config(path: str, trust_remote_code: bool = False):
    """The checkpoint's config, or None where transformers cannot read it (loading then says why)."""
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:
        return None


def check_quantization_backend(path: str) -> None:
    """A GPTQ/AWQ checkpoint (like Qwen's Int4 chat models) needs its backend: say which, before loading."""
    cfg = read_config(path)
    if cfg is None:
        return
    q = getattr(cfg, "quantization_config", None)
    if not q:
        return
    method = (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) or ""
    method = str(getattr(method, "value", method)).lower()
    needs = {"gptq": ["gptqmodel", "optimum"], "awq": ["awq"]}.get(method, [])
    import importlib.util

    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"{path} is a {method.upper()}-quantized checkpoint; loading it needs "
            + " and ".join(missing)
            + (" (pip install gptqmodel optimum)" if method == "gptq" else " (pip install autoawq)")
            + ". Or use the unquantized checkpoint with --q_lora, which quantizes it with bitsandbytes NF4."
        )


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def check_weights_format(path: str, allow_pickle: bool) -> None:
    """Safetensors only: pickle weights can run code when loaded, so they need --allow_pickle_weights."""
    if allow_pickle or not os.path.isdir(path):
        return
    names = os.listdir(path)
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_WEIGHTS) and n != "training_args.bin")
    if pickles:
        raise UserError(
            f"{path} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded. "
            f"Convert them to safetensors, or pass --allow_pickle_weights if you trust where they came from."
        )


PACKABLE_LAYERS = ("full_attention", "sliding_attention", "linear_attention")


def packing_is_exact(model) -> bool:
    """Whether samples packed into one row stay apart in every layer. Attention layers keep them apart through the
    restarting `position_ids`; the linear-attention (Gated DeltaNet) layers of Qwen3-Next and Qwen3.5+ only once
    `split_linear_attention` runs them per sample (load_model does); a layer type not known here might not."""
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or ()
    return all(kind in PACKABLE_LAYERS for kind in kinds) and splits_packed_rows(model)


def packing_for(model, asked: bool, log) -> bool:
    """`--packing` as it can be honoured on this model: off, with one line saying why, where it would not be exact."""
    if asked and not packing_is_exact(model):
        kinds = sorted(set(model.config.get_text_config().layer_types) - set(PACKABLE_LAYERS)) or ["linear_attention"]
        log(f"packing: off: {model.config.model_type} has {', '.join(kinds)} layers, which would carry one sample into the "
            "next in a packed row; batches are padded instead")
        return False
    return asked


# PEFT's "all-linear" also finds the vision tower's projections; LoRA on it is not what text training asks for, and
# servers ignore it (verl#3922). A regex of module names, matched in full.
VISION_TOWER_MODULES = r"(.*\.)?visual\..*"


def is_vision_language(config) -> bool:
    """A composite checkpoint (Qwen3.5+, Qwen3-VL, Qwen2.5-VL): a language model with a vision tower beside it."""
    return getattr(config, "vision_config", None) is not None


def vision_tower_parameters(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if "visual" in name.split(".")]


def freeze_vision_tower(model, log) -> None:
    """Text training of a composite checkpoint: the vision tower keeps its weights (and is saved with the model).
    Counted with `ds_numel` under ZeRO-3, where each rank holds a slice."""
    frozen = vision_tower_parameters(model)
    for p in frozen:
        p.requires_grad_(False)
    log(f"model: {model.config.model_type} is vision-language; loaded as {type(model).__name__} to train its language "
        f"model on text, its vision tower ({len(frozen)} tensors, {sum(getattr(p, 'ds_numel', p.numel()) for p in frozen):,} parameters) frozen "
        "and saved unchanged")


def load_model(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    q_lora: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    model_class=AutoModelForCausalLM,
    allow_pickle_weights: bool = False,
    log=log,
    **kwargs,
) -> PreTrainedModel:
    """Load a base model for training. Q-LoRA: bitsandbytes NF4 with double quantization. A vision-language checkpoint
    asked for as a causal LM loads as its own class (AutoModelForImageTextToText), so nothing of it is lost on saving;
    AutoModelForCausalLM would keep its language model only."""
    check_quantization_backend(path)
    composite = model_class is AutoModelForCausalLM and is_vision_language(read_config(path, trust_remote_code))
    if composite:
        from transformers import AutoModelForImageTextToText

        model_class = AutoModelForImageTextToText
    check_weights_format(path, allow_pickle_weights)
    if not allow_pickle_weights and not os.path.isdir(path):
        kwargs.setdefault("use_safetensors", True)  # a hub id: never fall back to pickle weights
    if q_lora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():  # each rank quantizes onto its own GPU, not all onto GPU 0
            kwargs.setdefault("device_map", {"": int(os.environ.get("LOCAL_RANK", "0"))})
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = model_class.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise UserError(f"Could not load the model {path!r}: {e}") from e
    except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package
        if not attn_implementation:
            raise
        raise UserError(f"--attn_implementation {attn_implementation}: {e} (leave it unset for sdpa)") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{path} has custom code; pass --trust_remote_code if you trust it. ({e})") from e
        if "Unrecognized configuration class" in str(e):
            import transformers

            config = read_config(path, trust_remote_code)
            head = model_class.__name__.removeprefix("AutoModelFor")
            raise UserError(f"{path}: transformers {transformers.__version__} has no {head} model for "
                            f"{getattr(config, 'model_type', 'this model type')}, so this method cannot train it") from e
        raise
    set_generation_defaults(model)
    keep_used_weight_conversions(model)
    split_linear_attention(model)
    if composite:
        freeze_vision_tower(model, log)
    return model


def keep_used_weight_conversions(model) -> None:
    """Saving reverts the key conversions loading applied (fused experts, composite prefixes). transformers 5.23 loading
    under ZeRO-3 (integrations/deepspeed.py) records every conversion of the model type, not only those that matched
    the checkpoint as its normal path does (core_model_loading.py), and a Qwen3.5 checkpoint trained under ZeRO-3 came
    back as `model.language_model.model.language_model.*`: keep the used ones, as the normal path does."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


def unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_adapter(path: str | os.PathLike | None) -> bool:
    """A PEFT adapter directory (adapter_config.json and no full model beside it)."""
    return bool(path) and (Path(path) / "adapter_config.json").exists() and not (Path(path) / "config.json").exists()


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
                task_type: str = "CAUSAL_LM", log=log):
    """The PEFT LoraConfig of our options for `model` (TRL's trainers take it as `peft_config`). Without a model the
    targets are taken as given (PEFT resolves them). A vision-language model's vision tower is left out."""
    from peft import LoraConfig

    targets = lora_targets(model, target_modules) if model is not None else LoraTargets(target_modules)
    if targets.frozen:
        log(f"lora: {targets.frozen}")
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    vision_language = model is not None and is_vision_language(model.config)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout(dropout, targets, model_type, log),
                      target_modules=targets.modules, target_parameters=targets.parameters or None,
                      exclude_modules=VISION_TOWER_MODULES if vision_language else None,
                      modules_to_save=modules_to_save or None, task_type=task_type)


def describe_adapter(model) -> str:
    """What a PEFT LoRA model adapts, one name per module type, in one line: the run log's `lora: adapting ...` and
    the model card's `lora_adapted` say the same."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    names, in_mlp, experts, routers = [], set(), {}, False
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = layer_label(path)
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
    return model
