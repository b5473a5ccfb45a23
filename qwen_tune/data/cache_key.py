"""What identifies a tokens cache (data/cache.py) and whether one can be used: the key hashes everything that makes
the tokens; a directory is used only when its data file matches the size, checksum and rows written last."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import xxhash

from .files import TOKENS_COMPLETE as MARKER, TOKENS_INFO as INFO

DATA = "data.arrow"
# qwen-tune's data code: a change to any of these files makes new tokens
CODE = ("chat_format.py", "messages.py", "images.py", "image_inputs.py", "read.py", "files.py", "tables.py", "mixture.py",
        "hub.py", "encode_report.py", "cache.py", "cache_key.py")


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's bytes, read into one 16 MiB buffer. xxh3 (a dependency of `datasets`) runs at ~6.6 GB/s
    here against sha256's 1.3: it finds changes and damage, which is all a cache key and checksum need, and keeps
    the start of a run on a million conversations (2.1 GB of JSONL, a 2.9 GB cache) within about a second."""
    digest, buffer = xxhash.xxh3_128(), memoryview(bytearray(1 << 24))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return digest.hexdigest()


def fingerprint(path) -> str:
    """The content hash of a data file, a save_to_disk directory or a cached dataset (its Arrow files)."""
    from .hub import HubDataset

    if isinstance(path, HubDataset):
        digest = xxhash.xxh3_128()
        for f in path.data_files():
            digest.update(f"{hash_file(f)}\0".encode())
        return digest.hexdigest()
    if path.is_dir():
        digest = xxhash.xxh3_128()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(path)}\0{hash_file(f)}\0".encode())
        return digest.hexdigest()
    return hash_file(path)


def format_parts(fmt, max_length: int | None) -> dict:
    """Everything besides the data that changes the tokens (or the code making them), each as a short value."""
    from importlib.metadata import PackageNotFoundError, version

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    tokenizer = fmt.tokenizer
    added = sorted(f"{i}:{t.content}:{t.special}" for i, t in tokenizer.added_tokens_decoder.items())
    code = hashlib.sha256(b"".join(Path(__file__).with_name(n).read_bytes() for n in CODE)).hexdigest()[:16]
    try:
        ours = version("qwen-tune")
    except PackageNotFoundError:
        ours = "unknown"
    return {"tokenizer": sha(tokenizer.backend_tokenizer.to_str() + "\n".join(added)), "chat_template": sha(fmt.template),
            "system_message": fmt.system_message, "template_kwargs": fmt.template_kwargs, "model_max_length": max_length,
            "images": fmt.images.settings() if fmt.images is not None else None, "qwen_tune": f"{ours} (data code {code})"}


def cache_key(parts: dict, files: list[dict]) -> str:
    return hashlib.sha256(json.dumps({"format": parts, "data": files}, sort_keys=True).encode()).hexdigest()[:20]


def damage(directory: Path) -> str | None:
    """Why a cache directory cannot be used (incomplete, a file changed or cut short), or None when it can."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        info = json.loads((directory / INFO).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        return f"incomplete ({Path(e.filename).name} is missing)"
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    data = directory / DATA
    if not data.is_file() or data.stat().st_size != marker.get("bytes"):
        return f"{DATA} is missing or has the wrong size"
    if hash_file(data) != marker.get("xxh3_128"):
        return f"{DATA} does not match its checksum"
    try:
        rows = len(open_arrow(directory))
    except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise several kinds on a damaged file
        return f"{DATA} is unreadable ({type(e).__name__}: {e})"
    if rows != marker.get("rows"):
        return f"{DATA} has {rows} rows, not {marker.get('rows')}"
    for path, digest in info.get("images", {}).items():  # pixels are read at training time: the tokens fit these bytes
        if not Path(path).is_file() or hash_file(Path(path)) != digest:
            return f"out of date: the image {path} changed or is gone since it was tokenized"
    return None


def open_arrow(directory: Path):
    """The whole cache as a memory-mapped `datasets.Dataset` (no copy in memory)."""
    from datasets import Dataset

    return Dataset.from_file(str(directory / DATA))
