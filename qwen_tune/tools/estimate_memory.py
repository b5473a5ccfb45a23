"""`qwen-tune estimate-memory`: what a training run will hold per GPU, from the model's config.json alone.

The model is built on the `meta` device (no memory, no weights read), with the adapter the real run would add
(models/lora.py's targets, through PEFT itself), so parameters and trainable parameters are counted exactly, per
module, MoE experts and vision towers included. Weights, gradients and AdamW's state follow from those counts and
dtypes; activations are an estimate per layer (activation_values_per_token), the loss one chunk of logits (train/loss.py).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

from ..errors import UserError
from ..options import LoraOptions, Method, TrainingArguments, VisionTrainingOptions, load
from ..options.groups import DEFAULT_MAX_LENGTH, Frozen

GiB = 2**30
# bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit absmax per 64 weights, an fp32 constant per
# 256 absmax blocks
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
METHODS = ("sft", "dpo", "orpo", "simpo", "kto", "rm")
PAIRS = ("dpo", "orpo", "simpo", "rm")  # a micro-batch holds a chosen and a rejected sequence per sample

ASSUMPTIONS = (
    "tokens per micro-batch: per_device_train_batch_size x model_max_length (every sample at full length, the worst "
    "case; packing adds no padding), twice that for dpo, orpo, simpo and rm (chosen and rejected); kto's second forward "
    "(its KL estimate) runs without gradient and saves nothing",
    "optimizer: AdamW (two moments per trainable value); without DeepSpeed in the trained parameters' dtype (qwen-tune "
    "loads the weights in the --bf16/--fp16 dtype, so no fp32 master copy), under DeepSpeed with 16-bit weights fp32 "
    "moments plus an fp32 master copy",
    "ZeRO-1 partitions optimizer state, ZeRO-2 also gradients, ZeRO-3 also weights, over nproc_per_node x nnodes GPUs; "
    "offloaded parts are counted in CPU memory instead",
    "activations: what a decoder layer saves for backward, per token: 6 x hidden (the two norms' inputs and "
    "outputs, the projections' inputs) + 4 x query width (q, q normed, q rotated, attention output) + 4 x key/value "
    "width + 4 x the MLP width a token passes (gate, up, activation, product; MoE: top-k experts + shared expert, and per "
    "expert reached its gathered input and weighted output, 2 x hidden), "
    "plus 3 x hidden outside the layers; with --gradient_checkpointing each layer's input plus one layer's worth "
    "(recomputed in backward); linear-attention layers are counted like attention ones",
    "loss: one chunk of fp32 logits (train/loss.py, LOGITS_CHUNK_BYTES), plus the output weight's fp32 gradient "
    "where it is trained (dpo, orpo, simpo, kto: a chunk's logits and log-softmax); under ZeRO-3 the logits of every token (all "
    "supervised: the worst case), in the training dtype, in fp32 and their softmax; rm scores with a 1-wide head",
    "not counted: the CUDA context and allocator fragmentation (often 1-3 GiB), DeepSpeed's communication buckets "
    "and the layer ZeRO-3 gathers whole at a time, a vision tower's activations (text training), the frozen "
    "reference's forward in dpo and kto (freed layer by layer)",
)


@dataclass
class EstimateOptions(Frozen):
    _argument_group_name = "estimate-memory (the training command's options)"
    method: str = field(default="sft", metadata={"help": "The training command estimated: sft, dpo, orpo, simpo, kto or rm.", "choices": list(METHODS)})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A checkpoint directory or hub id; only its config.json is read (unset: the embedded model)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own configuration code."})
    deepspeed: str | None = field(default=None, metadata={"help": "The run's DeepSpeed config (its ZeRO stage and offload)."})
    nproc_per_node: int = field(default=1, metadata={"help": "GPUs per machine (torchrun's --nproc_per_node)."})
    nnodes: int = field(default=1, metadata={"help": "Machines (torchrun's --nnodes)."})
    per_device_train_batch_size: int = field(default=TrainingArguments.per_device_train_batch_size,
                                             metadata={"help": "Samples per GPU per micro-batch (the training commands' default)."})
    model_max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Longest sample in tokens."})
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16."})
    fp16: bool = field(default=False, metadata={"help": "Train in float16."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})


def check_options(values: dict[str, dict]) -> None:
    e = values["estimate"]
    if e["nproc_per_node"] < 1 or e["nnodes"] < 1 or e["per_device_train_batch_size"] < 1 or e["model_max_length"] < 1:
        raise UserError("--nproc_per_node, --nnodes, --per_device_train_batch_size and --model_max_length must be at least 1")
    for switch, on in values["vision"].items():
        if on and e["method"] == "rm":
            raise UserError(f"--{switch}: rm trains no vision tower (it has no such option); estimate sft or dpo")


METHOD = Method("estimate-memory", groups={"estimate": EstimateOptions, "lora": LoraOptions, "vision": VisionTrainingOptions},
                resolve=check_options)


@dataclass(frozen=True)
class DeepSpeedPlan:
    """What a DeepSpeed config decides about memory."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    enabled: bool = False

    @classmethod
    def read(cls, path: str | None) -> "DeepSpeedPlan":
        if not path:
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                ds = json.load(f)
        except OSError as e:
            raise UserError(f"--deepspeed {path}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise UserError(f"--deepspeed {path}:{e.lineno}:{e.colno}: {e.msg}") from e
        zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
        zero = zero if isinstance(zero, dict) else {}
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise UserError(f"--deepspeed {path}: zero_optimization.stage is {stage!r}; expected 0, 1, 2 or 3")

        def offloaded(key: str) -> bool:
            offload = zero.get(key)
            return isinstance(offload, dict) and offload.get("device", "none") in ("cpu", "nvme")

        return cls(stage, offloaded("offload_optimizer"), stage == 3 and offloaded("offload_param"), True)


def read_model_config(model: str | None, trust_remote_code: bool):
    """The checkpoint's configuration: its config.json only (no weights are needed)."""
    from transformers import AutoConfig

    if not model:
        from ..models.model import EMBEDDED_CONFIG

        spec = json.loads(EMBEDDED_CONFIG.read_text())
        spec.pop("architectures", None)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    from ..models.model import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"--model_name_or_path {model}: cannot read its config.json: {str(e).splitlines()[0]}") from e


def meta_model(config, method: str, dtype, lora: LoraOptions | None, vision: VisionTrainingOptions | None = None):
    """The model a run of `method` trains, built on the meta device in `dtype`: its vision tower (but for the parts
    `vision` trains) and attention indexers frozen as load_model freezes them, with the adapter add_lora would add."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    from ..models.model import freeze_attention_indexers, is_vision_language
    from ..models.vision import set_vision_training

    def quiet(*_):
        pass

    with torch.device("meta"):
        if method == "rm":  # a 1-wide score head, as rm loads it (num_labels=1)
            config = copy.deepcopy(config)
            config.num_labels = 1
            try:
                model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
            except ValueError as e:
                raise UserError(f"transformers has no SequenceClassification model for {config.model_type}, so rm cannot "
                                "train it") from e
        elif is_vision_language(config):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        switches = (vision or VisionTrainingOptions()).switches()
        set_vision_training(model, **switches, log=quiet)
        freeze_attention_indexers(model, quiet)
        if lora is not None and lora.use_lora:
            from ..models.lora import add_lora

            model = add_lora(model, log=quiet, task_type="SEQ_CLS" if method == "rm" else "CAUSAL_LM", **lora.adapter_options(),
                             **switches)
    return model


@dataclass(frozen=True)
class Estimate:
    parameters: int
    trainable: int
    gpu: dict[str, float]  # bytes per GPU: weights, gradients, optimizer state, activations, loss
    cpu: dict[str, float]  # bytes per GPU's process offloaded to CPU memory
    tokens: int  # per micro-batch


def state_bytes(model, *, q_lora: bool, plan: DeepSpeedPlan, world: int) -> tuple[dict, dict]:
    """Weights, gradients and AdamW state per GPU (and what is offloaded), from each parameter's count and dtype."""
    import torch

    from ..models.vision import TOWER

    output = model.get_output_embeddings()
    head = {id(p) for p in output.parameters()} if output is not None else set()
    quantizable = {id(m.weight) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and id(m.weight) not in head and "lora_" not in name
                   and not any(s in name.split(".") for s in ("score", "modules_to_save", TOWER))}  # models/vision.py
    weights = grads = moments = master = 0.0
    for p in model.parameters():
        size = p.element_size()
        if q_lora and not p.requires_grad:
            size = NF4_BYTES if id(p) in quantizable else (size if p.ndim == 3 else 4)  # prepare_model_for_kbit_training
        weights += p.numel() * size
        if p.requires_grad:
            grads += p.numel() * size
            moments += 2 * p.numel() * size
    if plan.enabled:
        # DeepSpeed casts a 16-bit run's module to its dtype and keeps fp32 moments and an fp32 master copy
        half = any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if half:
            frozen = weights - sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            weights, grads = frozen + 2 * trainable, 2 * trainable
            moments, master = 8 * trainable, 4 * trainable
        else:
            moments = 8 * trainable
    optimizer = moments + master
    cpu = {}
    if plan.stage >= 1:
        optimizer /= world
    if plan.stage >= 2:
        grads /= world
    if plan.stage >= 3:
        weights /= world
    if plan.offload_optimizer:
        cpu["optimizer state"], optimizer = optimizer, 0.0
    if plan.offload_param:
        cpu["weights"], weights = weights, 0.0
    return {"weights": weights, "gradients": grads, "optimizer state": optimizer}, cpu


def activation_values_per_token(config, checkpointing: bool) -> float:
    """Values a decoder layer saves for backward per token, summed over the layers (see ASSUMPTIONS)."""
    text = config.get_text_config()
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    query = text.num_attention_heads * head_dim
    key_value = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    key_value *= head_dim
    if getattr(text, "num_experts", None) and getattr(text, "moe_intermediate_size", None):
        top_k = text.num_experts_per_tok
        mlp = top_k * text.moe_intermediate_size + (getattr(text, "shared_expert_intermediate_size", 0) or 0)
        routing = 2 * top_k * hidden + 2 * text.num_experts  # each expert's gathered input and weighted output; router
    else:
        mlp, routing = text.intermediate_size, 0
    layer = 6 * hidden + 4 * query + 4 * key_value + 4 * mlp + routing
    layers = text.num_hidden_layers
    outside = 3 * hidden  # the final norm's input and output, the loss's hidden states
    return outside + (layers * hidden + layer if checkpointing else layers * layer)


def estimate(options: EstimateOptions, lora: LoraOptions, config=None, vision: VisionTrainingOptions | None = None) -> Estimate:
    """The estimate of a run with these options (`config`: the model's, read from --model_name_or_path when None;
    `vision`: what of a vision tower trains, nothing when None)."""
    import torch

    from ..train.loss import chunk_rows

    config = config if config is not None else read_model_config(options.model_name_or_path, options.trust_remote_code)
    plan = DeepSpeedPlan.read(options.deepspeed)
    world = options.nproc_per_node * options.nnodes
    dtype = torch.bfloat16 if options.bf16 else torch.float16 if options.fp16 else torch.float32
    model = meta_model(config, options.method, dtype, lora, vision)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gpu, cpu = state_bytes(model, q_lora=lora.use_lora and lora.q_lora, plan=plan, world=world)
    if options.method in ("dpo", "kto") and not lora.use_lora:  # a frozen copy of the policy as the reference
        reference = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits / 8
        gpu["reference model"] = reference / (world if plan.stage >= 3 else 1)
    pairs = 2 if options.method in PAIRS else 1
    tokens = pairs * options.per_device_train_batch_size * options.model_max_length
    act_bytes = torch.finfo(dtype).bits / 8
    gpu["activations"] = tokens * activation_values_per_token(config, options.gradient_checkpointing) * act_bytes
    if options.method != "rm":
        vocab = config.get_text_config().vocab_size
        head = model.get_output_embeddings()
        trained_head = head is not None and head.weight.requires_grad
        if plan.stage == 3:  # the output weight is partitioned: the model computes the supervised positions' logits at once
            gpu["loss"] = tokens * vocab * (act_bytes + 4 + 4)  # logits, their fp32 copy, the softmax kept for backward
        elif options.method in ("dpo", "orpo", "simpo", "kto"):  # checkpointed chunks (sequence_logprobs): logits and their log-softmax
            gpu["loss"] = 2 * min(tokens, chunk_rows(vocab)) * vocab * 4
        else:
            gpu["loss"] = min(tokens, chunk_rows(vocab)) * vocab * 4 + (head.weight.numel() * 4 if trained_head else 0)
    return Estimate(parameters, trainable, gpu, cpu, tokens)


def readable(size: float) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / 2**20:.1f} MiB"


def describe(result: Estimate, options: EstimateOptions, lora: LoraOptions, config) -> str:
    kind = "Q-LoRA" if lora.use_lora and lora.q_lora else "LoRA" if lora.use_lora else "full"
    plan = DeepSpeedPlan.read(options.deepspeed)
    ds = (f"ZeRO-{plan.stage}" + (", optimizer offloaded" if plan.offload_optimizer else "")
          + (", parameters offloaded" if plan.offload_param else "")) if plan.enabled else "no DeepSpeed"
    precision = "bf16" if options.bf16 else "fp16" if options.fp16 else "fp32"
    world = options.nproc_per_node * options.nnodes
    lines = [f"{options.method} {kind} of {config.model_type} ({options.model_name_or_path or 'the embedded model'}), "
             f"{world} GPU{'s' if world > 1 else ''}, {ds}, {precision}, {result.tokens:,} tokens per micro-batch"
             + (", gradient checkpointing" if options.gradient_checkpointing else ""),
             f"parameters            {result.parameters:>18,}",
             f"trainable parameters  {result.trainable:>18,}",
             "per GPU:"]
    lines += [f"  {name:<20}{readable(value):>14}" for name, value in result.gpu.items()]
    lines.append(f"  {'total':<20}{readable(sum(result.gpu.values())):>14}")
    if result.cpu:
        lines.append("CPU memory per GPU (offloaded):")
        lines += [f"  {name:<20}{readable(value):>14}" for name, value in result.cpu.items()]
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in ASSUMPTIONS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Estimate:
    config = load(METHOD, argv)
    model_config = read_model_config(config.estimate.model_name_or_path, config.estimate.trust_remote_code)
    result = estimate(config.estimate, config.lora, model_config, config.vision)
    print(describe(result, config.estimate, config.lora, model_config))
    return result
