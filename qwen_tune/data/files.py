"""Data files as records with their line numbers: JSON lists (each sample's line found by scanning) and JSONL.

Every problem is collected with `file:line`, nothing is raised half-way, so one run shows all of them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import UserError


def show(value) -> str:
    """A short JSON rendering of a value for messages."""
    s = json.dumps(value, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def resolve_files(paths: str | os.PathLike | list) -> list[Path]:
    """Expand files, directories (their *.json/*.jsonl, sorted) and comma-separated lists."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    pieces = [p for item in items for p in (item.split(",") if isinstance(item, str) else [item])]
    files: list[Path] = []
    for piece in pieces:
        if isinstance(piece, str) and not piece.strip():
            continue
        path = Path(piece.strip() if isinstance(piece, str) else piece)
        if not path.exists():
            raise UserError(f"data path not found: {path}")
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in (".json", ".jsonl"))
            if not found:
                raise UserError(f"no .json or .jsonl files in directory {path}")
            files += found
        elif path.suffix.lower() in (".json", ".jsonl"):
            files.append(path)
        else:
            raise UserError(f"{path}: unsupported data file type; expected .json (a list) or .jsonl (an object a line)")
    if not files:
        raise UserError(f"no data files given ({paths!r})")
    return files


_SKIP = re.compile(r"[\s,]*")


def _json_list_lines(text: str, count: int) -> list[int]:
    """Line where each element of a valid top-level JSON list starts, in one linear pass."""
    decode = json.JSONDecoder().raw_decode
    pos, last, line, lines = text.index("[") + 1, 0, 1, []
    for _ in range(count):
        pos = _SKIP.match(text, pos).end()
        line += text.count("\n", last, pos)
        last = pos
        lines.append(line)
        pos = decode(text, pos)[1]
    return lines


def read_records(path: Path, problems: list[str]) -> list[tuple[int, object]]:
    """(line, record) for each sample in a file; file-level problems go to `problems`."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        problems.append(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8")
        return []
    if not text.strip():
        problems.append(f"{path}:1: the file is empty (no samples)")
        return []
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})")
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        problems.append(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}){hint}")
        return []
    if not isinstance(data, list):
        line = text[: len(text) - len(text.lstrip())].count("\n") + 1
        problems.append(f"{path}:{line}: top level is {show(data)}; expected a list of samples [{{...}}, ...]")
        return []
    if not data:
        problems.append(f"{path}:1: the list is empty (no samples)")
    return list(zip(_json_list_lines(text, len(data)), data))
