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
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..errors import UserError
from .linear_attention import split_linear_attention, splits_packed_rows
from ..train.distributed import log
from .tokenizer import QWEN_SPEC, SAVED_FORMAT, cache_dir, load_tokenizer, save_tokenizer
from .vision import TOWER_PATTERN, set_vision_training
from ..trust import check_checkpoint

EMBEDDED_CONFIG = Path(__file__).parent.parent / "assets" / "embedded_model_config.json"
EMBEDDED_NAME = "qwen-tune-embedded-qwen2"

FINAL_NORM_SCALE = 10.0


def embedded_model_path() -> str:
    """Build (once) and return the absolute path of the embedded default model directory."""
    build = f"final_norm={FINAL_NORM_SCALE}".encode()
    digest = __import__("hashlib").sha256(EMBEDDED_CONFIG.read_bytes() + QWEN_SPEC.read_bytes() + SAVED_FORMAT + build).hexdigest()[:12]
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
        save_tokenizer(load_tokenizer(), tmp)
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


def check_quantization_backend(path: str, cfg) -> None:
    """A GPTQ/AWQ checkpoint (like Qwen's Int4 chat models) needs its backend: say which, before loading.
    `cfg`: its config (read_config)."""
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


def is_vision_language(config) -> bool:
    """A composite checkpoint (Qwen3.5+, Qwen3-VL, Qwen2.5-VL): a language model with a vision tower beside it."""
    return getattr(config, "vision_config", None) is not None


def freeze_attention_indexers(model, log) -> None:
    """Qwen4-Exp's indexed attention picks the keys each query reads with a token indexer (top-k over compressed
    blocks); no gradient reaches it through that choice and transformers computes no loss of its own for it, so it
    cannot learn here: frozen, and said, rather than silently left with no gradient."""
    frozen = [p for name, p in model.named_parameters() if "indexer" in name.split(".")]
    if frozen:
        for p in frozen:
            p.requires_grad_(False)
        log(f"model: the attention indexers of {model.config.model_type} ({len(frozen)} tensors) are frozen: they select "
            "keys by top-k, which passes no gradient, and have no training loss here")


def load_model(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    q_lora: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    model_class=AutoModelForCausalLM,
    allow_pickle_weights: bool = False,
    train_vision: bool = False,
    train_merger: bool = False,
    adapter: bool = False,
    log=log,
    **kwargs,
) -> PreTrainedModel:
    """Load a base model for training. Q-LoRA: bitsandbytes NF4 with double quantization. A vision-language checkpoint
    asked for as a causal LM loads as its own class (AutoModelForImageTextToText), so nothing of it is lost on saving;
    AutoModelForCausalLM would keep its language model only. Its vision tower is frozen but for the parts
    `train_vision` (the ViT) and `train_merger` (the mergers into the language model) ask to train (models/vision.py);
    `adapter`: a LoRA adapter will be added, which decides how they train (add_lora), so all stays frozen here."""
    check_checkpoint(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle_weights)
    config = read_config(path, trust_remote_code)
    check_quantization_backend(path, config)
    composite = model_class is AutoModelForCausalLM and is_vision_language(config)
    if composite:
        from transformers import AutoModelForImageTextToText

        model_class = AutoModelForImageTextToText
    if not allow_pickle_weights and not os.path.isdir(path):
        kwargs.setdefault("use_safetensors", True)  # a hub id: never fall back to pickle weights
    if q_lora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=["lm_head", TOWER_PATTERN] if composite else None,  # the language model only
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

            head = model_class.__name__.removeprefix("AutoModelFor")
            raise UserError(f"{path}: transformers {transformers.__version__} has no {head} model for "
                            f"{getattr(config, 'model_type', 'this model type')}, so this method cannot train it") from e
        raise
    set_generation_defaults(model)
    keep_used_weight_conversions(model)
    split_linear_attention(model)
    set_vision_training(model, train_vision=train_vision, train_merger=train_merger, adapter=adapter, log=log)
    freeze_attention_indexers(model, log)
    return model


def keep_used_weight_conversions(model) -> None:
    """Saving reverts the key conversions loading applied (fused experts, composite prefixes). transformers 5.23 loading
    under ZeRO-3 (integrations/deepspeed.py) records every conversion of the model type, not only those that matched
    the checkpoint as its normal path does (core_model_loading.py), and a Qwen3.5 checkpoint trained under ZeRO-3 came
    back as `model.language_model.model.language_model.*`: keep the used ones, as the normal path does."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


def is_adapter(path: str | os.PathLike | None) -> bool:
    """A PEFT adapter directory (adapter_config.json and no full model beside it)."""
    return bool(path) and (Path(path) / "adapter_config.json").exists() and not (Path(path) / "config.json").exists()
