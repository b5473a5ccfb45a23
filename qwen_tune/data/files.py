"""Data sources as records with their locations: which files a `--data_path` names, and reading each one.

JSON lists (each sample's line found by scanning), JSONL, and both gzipped (`.json.gz`, `.jsonl.gz`: lines as in
the uncompressed text) are read here; CSV, Parquet, Arrow and `datasets.save_to_disk` directories in tables.py; an
item that is no local path but reads like `org/name[:config][:split]` is a dataset in the Hugging Face cache (hub.py).
Every problem is collected with `file:line` (tables: `file:row N`), nothing is raised half-way, so one run shows all of them.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..train.distributed import log
from . import hub, tables
from .mixture import check_weights, split_weight

# A tokens directory (`preprocess --out DIR`, data/cache.py) holds these; `--data_path DIR` trains from it.
TOKENS_INFO, TOKENS_COMPLETE = "tokens.json", "complete.json"


def is_tokens_dir(path) -> bool:
    """A directory of tokens written by data/cache.py, which `--data_path DIR` trains from."""
    return Path(path).is_dir() and ((Path(path) / TOKENS_INFO).is_file() or (Path(path) / TOKENS_COMPLETE).is_file())

MAX_LINE_BYTES = 64 << 20  # one JSONL / CSV line: a million-token context is about 4 MB of text
SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".csv", ".parquet", ".arrow")
SUPPORTED = (".json (a list of samples), .jsonl (one sample a line), .json.gz / .jsonl.gz (the same, gzipped), "
             ".csv (a header, then one sample a row; JSON cells such as messages are parsed), .parquet, .arrow, "
             "a directory written by datasets' save_to_disk, or a dataset in the local Hugging Face cache (org/name)")


def show(value) -> str:
    """A short JSON rendering of a value for messages (a value JSON has no type for, e.g. a Parquet date, as text)."""
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def data_suffix(path: Path | hub.HubDataset) -> str | None:
    """The data format a file's name ends with (".jsonl.gz", ".parquet", ...), or None (a cached dataset too)."""
    if isinstance(path, hub.HubDataset):
        return None
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def record_stem(path: Path | hub.HubDataset) -> str:
    """The name default ids start with: the file's name without its data suffix (`a.jsonl.gz` -> `a`, as `a.jsonl`);
    a cached dataset's name and split (`ultrachat_200k-train_sft`: two splits of one dataset get different ids)."""
    if isinstance(path, hub.HubDataset):
        return f"{path.name}-{path.split}"
    suffix = data_suffix(path) if path.is_file() else None
    return path.name[: -len(suffix)] if suffix else path.name


def located_by_row(path: Path | hub.HubDataset) -> bool:
    """Sources whose samples are located by row (`file:row N`, row 1 the first) rather than by line."""
    return isinstance(path, hub.HubDataset) or path.is_dir() or data_suffix(path) in (".parquet", ".arrow")


@dataclass
class Source:
    """One item of `--data_path`: a file, a directory or a cached dataset, with its mixture weight if one was given
    (`PATH:WEIGHT`)."""

    path: Path | hub.HubDataset
    weight: Fraction | None
    files: list[Path | hub.HubDataset]


_named: set[Path] = set()  # directories whose unread entries were already named (sources are resolved more than once)


def _files_of(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"data path not found: {path}")
    if path.is_dir() and (path / "complete.json").is_file() and (path / "tokens.json").is_file():
        raise UserError(f"{path} holds tokens (qwen-tune preprocess --out): give it alone as sft's --data_path, "
                        "or give the data files it was made from")
    if path.is_dir() and tables.is_saved_dataset(path):
        return [path]
    if path.is_dir():
        visible = sorted(f for f in path.iterdir() if not f.name.startswith("."))
        found = [f for f in visible if f.is_file() and data_suffix(f)]
        if not found:
            raise UserError(f"no data files in directory {path}; expected {SUPPORTED}")
        other = [f.name + ("/" if f.is_dir() else "") for f in visible if f not in found]
        if other and path not in _named:  # never skipped without a word: the user may have meant them as data
            _named.add(path)
            log(f"data: reading {len(found)} file{'s' if len(found) > 1 else ''} of {path}; not read: "
                f"{', '.join(other[:5])}{f' and {len(other) - 5} more' if len(other) > 5 else ''} (not a data file "
                f"type; folders are not searched)")
        return found
    if not data_suffix(path):
        raise UserError(f"{path}: unsupported data file type; expected {SUPPORTED}")
    return [path]


def resolve_sources(paths: str | os.PathLike | list) -> list[Source]:
    """The items of files, directories (their data files, sorted; a saved dataset is one source) and
    comma-separated lists, each with its weight (`a.jsonl:0.7,b.parquet:0.3`; see mixture.py)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    pieces = [p for item in items for p in (item.split(",") if isinstance(item, str) else [item])]
    sources: list[Source] = []
    for piece in pieces:
        if isinstance(piece, str) and not piece.strip():
            continue
        text, weight = split_weight(piece.strip()) if isinstance(piece, str) else (piece, None)
        path = Path(text)
        if not path.exists() and hub.looks_like_name(str(text)):  # a local path always wins over a dataset name
            dataset = hub.find(str(text))
            sources.append(Source(dataset, weight, [dataset]))
        else:
            sources.append(Source(path, weight, _files_of(path)))
    if not sources:
        raise UserError(f"no data files given ({paths!r})")
    check_weights([(str(s.path), s.weight) for s in sources])
    return sources


def resolve_files(paths: str | os.PathLike | list) -> list[Path]:
    """Every data file (or saved dataset directory) that `paths` names, in order; weights are set aside."""
    return [f for source in resolve_sources(paths) for f in source.files]


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


def iter_records(path: Path, problems: list[str]) -> Iterator[tuple[int | str, object]]:
    """(line, or "row N" for tables, record) for each sample of a data file, one at a time, so a large file is never
    held whole (a .json list is: JSON has no way to read one element at a time); file-level problems go to `problems`."""
    suffix = data_suffix(path)
    if isinstance(path, hub.HubDataset):
        yield from tables.read_dataset(path, path.dataset(), problems)
    elif path.is_dir():
        yield from tables.read_saved_dataset(path, problems)
    elif suffix == ".parquet":
        yield from tables.read_parquet(path, problems)
    elif suffix == ".arrow":
        yield from tables.read_arrow(path, problems)
    elif suffix in (".json", ".json.gz"):
        yield from _json_list_records(path, problems)
    elif suffix == ".csv":
        yield from tables.read_csv(path, _text_lines(path, problems), problems)
    else:
        yield from _jsonl_records(path, _text_lines(path, problems), problems)


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _text_lines(path: Path, problems: list[str]) -> Iterator[str]:
    """The file's lines as text (line ends kept), read one at a time; a gzip or UTF-8 error ends it with a problem,
    and a file with no text at all is a problem too."""
    has_text, offset, number = False, 0, 0
    try:
        with _open(path) as f:
            while raw := f.readline(MAX_LINE_BYTES + 1):  # never more than the limit held: a line past it is named
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    problems.append(f"{path}:{number}: the line is longer than {MAX_LINE_BYTES >> 20} MiB, far more text "
                                    f"than any model's context; split or shorten that sample")
                    while raw and not raw.endswith(b"\n"):  # the rest of it, a piece at a time
                        offset += len(raw)
                        raw = f.readline(1 << 24)
                    offset += len(raw)
                    yield "\n"  # in its place: the next line keeps its number
                    continue
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    problems.append(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {offset + e.start}); save the file as UTF-8")
                    return
                offset += len(raw)
                has_text = has_text or bool(line.strip())
                yield line
    except EOFError:
        problems.append(f"{path}:{number + 1}: the gzip file ends early (cut short while copying or downloading?) "
                        f"after {number} complete lines. Copy it again")
        return
    except (OSError, zlib.error) as e:
        problems.append(f"{path}: not a readable gzip file ({e}); name it without .gz if it is not compressed")
        return
    if not has_text:
        problems.append(f"{path}:1: the file is empty (no samples)")


PYTHON_WORDS = {"True": "true", "False": "false", "None": "null"}


def json_mistake(e: json.JSONDecodeError) -> tuple[int, str]:
    """(line, what is wrong) of a JSON error, at the mistake itself with a hint for the common ones: a trailing
    comma (the parser only notices at the `]` or `}` after it), single quotes, Python's True / False / None."""
    text, pos = e.doc, e.pos
    before = len(text[:pos].rstrip())
    trailing_comma = e.msg.startswith(("Expecting value", "Expecting property name", "Illegal trailing comma")) and \
        before > 0 and text[before - 1] == "," and text[pos:pos + 1] in ("]", "}")
    if trailing_comma:
        pos = before - 1
    line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
    word = next((w for w in PYTHON_WORDS if text.startswith(w, pos)), None)
    if trailing_comma:
        return line, f"invalid JSON: a trailing comma at column {column}, before '{text[e.pos]}' (JSON allows none: remove it)"
    if text[pos:pos + 1] == "'":
        return line, f"invalid JSON: a single quote at column {column}; JSON strings and keys take double quotes (\")"
    if word:
        return line, f"invalid JSON: {word} at column {column} is Python; JSON writes {PYTHON_WORDS[word]}"
    return line, f"invalid JSON: {e.msg} (column {column})"


def _jsonl_records(path: Path, lines: Iterator[str], problems: list[str]) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{number}: {json_mistake(e)[1]}")
        except RecursionError:
            problems.append(f"{path}:{number}: JSON nested too deeply to read (thousands of levels); a sample is a "
                            f"list of messages")


def _json_list_records(path: Path, problems: list[str]) -> list[tuple[int, object]]:
    """A JSON list is parsed whole (its elements' lines found by scanning the text once)."""
    before = len(problems)
    text = "".join(_text_lines(path, problems))
    if len(problems) > before:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _is_json_lines(text):
            problems.append(f"{path}:{e.lineno}: invalid JSON: a second object after the first; a .json file holds one "
                            f"list [{{...}}, ...], and one object per line is JSON lines: name the file .jsonl")
        else:
            line, problem = json_mistake(e)
            problems.append(f"{path}:{line}: {problem}")
        return []
    except RecursionError:
        problems.append(f"{path}: JSON nested too deeply to read (thousands of levels); a sample is a list of messages")
        return []
    if not isinstance(data, list):
        line = text[: len(text) - len(text.lstrip())].count("\n") + 1
        problems.append(f"{path}:{line}: top level is {show(data)}; expected a list of samples [{{...}}, ...]")
        return []
    if not data:
        problems.append(f"{path}:1: the list is empty (no samples)")
    return list(zip(_json_list_lines(text, len(data)), data))


def _is_json_lines(text: str) -> bool:
    """Each of the first lines that hold text is one JSON object."""
    lines = [line for line in text.splitlines() if line.strip()][:3]
    try:
        return all(isinstance(json.loads(line), dict) for line in lines)
    except json.JSONDecodeError:
        return False


def count_records(path: Path) -> int:
    """How many samples a data file holds (for the model card): a table's rows, else its records as read."""
    if isinstance(path, hub.HubDataset):
        return len(path.dataset())
    return tables.count_rows(path) if located_by_row(path) else sum(1 for _ in iter_records(path, []))
