"""Loading a trained result, and the code that tells a user how: one place for both, so they cannot diverge.

A vision-language checkpoint (Qwen3.5+, Qwen3-VL, Qwen2.5-VL) is trained and saved as its own class; it loads with
AutoModelForImageTextToText. Its LoRA adapter names the composite model's modules (`model.language_model...`), so
it goes on that class too: PEFT's AutoPeftModelForCausalLM would build the text-only class, whose module names
differ, and silently leave the adapter out.
"""

from __future__ import annotations

from .model import is_adapter, is_vision_language, read_config
from ..trust import check_checkpoint


def adapter_base(path: str) -> str:
    from peft import PeftConfig

    return PeftConfig.from_pretrained(path).base_model_name_or_path


def loads_as_vision_language(path: str) -> bool:
    """Whether the model at `path` (a full model, or an adapter's base) is a composite checkpoint."""
    config = read_config(adapter_base(path) if is_adapter(path) else path)
    return config is not None and is_vision_language(config)


def load_trained(path: str, *, trust_remote_code: bool = False, **kwargs):
    """A full/merged model or a LoRA adapter directory, as its own class; `kwargs` go to `from_pretrained`.
    Nothing of the checkpoint runs unless `trust_remote_code` (trust.py)."""
    check_checkpoint(path, trust_remote_code=trust_remote_code)
    kwargs["trust_remote_code"] = trust_remote_code
    if loads_as_vision_language(path):
        from transformers import AutoModelForImageTextToText

        if not is_adapter(path):
            return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        from peft import PeftModel

        trainable = kwargs.pop("is_trainable", False)
        return PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(adapter_base(path), **kwargs), path,
                                         is_trainable=trainable)
    if is_adapter(path):
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def loading_code(out: str, *, adapter: bool, reward_model: bool = False, vision_language: bool = False) -> list[str]:
    """The Python lines that load `out` with its tokenizer, as the end of a run and the model card show them."""
    if reward_model:
        cls, mod = ("AutoPeftModelForSequenceClassification", "peft") if adapter else ("AutoModelForSequenceClassification", "transformers")
        load = [f"model = {cls}.from_pretrained({out!r}, num_labels=1)"]
    elif vision_language and adapter:
        cls, mod = "AutoModelForImageTextToText", "transformers"
        load = ["from peft import PeftModel", "",
                f"base = {cls}.from_pretrained({adapter_base(out)!r})",
                f"model = PeftModel.from_pretrained(base, {out!r})"]
    else:
        cls, mod = ("AutoModelForImageTextToText" if vision_language else "AutoModelForCausalLM", "transformers")
        if adapter:
            cls, mod = "AutoPeftModelForCausalLM", "peft"
        load = [f"model = {cls}.from_pretrained({out!r})"]
    return [f"from {mod} import {cls}", "from transformers import AutoTokenizer", *load,
            f"tokenizer = AutoTokenizer.from_pretrained({out!r})"]
