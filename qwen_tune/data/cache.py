"""Tokenize once: SFT data as a memory-mapped Arrow file of ids, labels and lengths, reused while nothing that
makes the tokens has changed.

A cache directory (`paths.cache_dir()/tokens/<key>/` by default, or what `qwen-tune preprocess --out DIR` writes):
  data.arrow     one row per valid sample, in --data_path order, dropped ones included (a mixture draws from
                 them, as it does from the samples it reads); columns in SCHEMA
  tokens.json    the key and what went into it, the sources (path, weight, rows), the report of the whole data
  complete.json  written last: data.arrow's size, xxh3-128 checksum and rows; without it, or when they differ, the
                 directory is not used (it is reported in one line and rebuilt)
The key hashes the input files' bytes (not their times) and paths (ids and locations come from them), the
tokenizer, the chat template and format options, model_max_length, and qwen-tune's version and data code.
Reading and validation stream (files.iter_records); tokenizing runs in worker processes, a chunk each.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from ..errors import DataError, UserError
from ..options.groups import CacheOptions
from .cache_key import DATA, cache_key, damage, fingerprint, format_parts, hash_file, open_arrow
from .encode_report import EncodeReport
from .files import TOKENS_COMPLETE as MARKER, TOKENS_INFO as INFO, is_tokens_dir
from .read import data_error, stream_conversations

CHUNK = 256  # conversations per worker task
PROGRESS_EVERY = 5.0  # seconds between progress lines
SCHEMA = pa.schema([
    ("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("length", pa.int32()),
    ("supervised", pa.int32()), ("truncated", pa.bool_()), ("reasoning_not_trained", pa.int32()), ("source", pa.string()),
    ("images", pa.list_(pa.string())), ("reply_cut", pa.bool_()),
])
TRAINING_COLUMNS = ["input_ids", "labels", "id", "length", "images"]


def say(message: str) -> None:
    """Cache lines come from every rank that loads (one builds, the others load), so they say which."""
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    sys.stderr.write(f"{rank}{message}\n")  # one write: lines of two ranks sharing a stderr do not interleave
    sys.stderr.flush()


def _expected_samples(sources) -> int | None:
    """About how many samples the sources hold, for the ETA of a build (lines of JSONL / CSV, rows of tables);
    None when a file cannot tell (a JSON list)."""
    from .files import data_suffix, located_by_row

    total = 0
    for f in (f for s in sources for f in s.files):
        if located_by_row(f):
            n = _safe_rows(f)
        elif data_suffix(f) in (".jsonl", ".csv"):
            with open(f, "rb") as stream:
                n = sum(block.count(b"\n") for block in iter(lambda: stream.read(1 << 24), b""))
        else:
            n = None
        if n is None:
            return None
        total += n
    return total


def _safe_rows(path) -> int | None:
    from .files import count_records

    try:
        return count_records(path)
    except Exception:  # unreadable: validation reports it with its location
        return None


# ---------------------------------------------------------------- building


_WORKER: tuple = ()


def _init_worker(fmt, max_length) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER = (fmt, max_length)


def _encode_chunk(chunk: list) -> tuple[pa.RecordBatch | None, list[str]]:
    """A worker's task: conversations -> one Arrow record batch, or the problems that keep them from rendering."""
    fmt, max_length = _WORKER
    problems = [f'{c.source} (id "{c.id}"): {p}' for c in chunk for p in fmt.problems(c.messages, c.tools)]
    if problems:
        return None, problems
    encoded = fmt.encode_many(chunk, [c.id for c in chunk], max_length)
    columns = {
        "id": [e.id for e in encoded], "input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded],
        "length": [len(e.input_ids) for e in encoded], "supervised": [e.num_supervised for e in encoded],
        "truncated": [e.truncated for e in encoded], "reasoning_not_trained": [e.reasoning_not_trained for e in encoded],
        "source": [c.source for c in chunk], "images": [e.images for e in encoded], "reply_cut": [e.reply_cut for e in encoded],
    }
    return pa.RecordBatch.from_pydict(columns, schema=SCHEMA), []


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded_batches(chunks, fmt, max_length, workers: int):
    """(batch, problems) per chunk, in order; with several workers, at most 2 chunks per worker are in flight."""
    if workers == 1:
        _init_worker(fmt, max_length)
        yield from map(_encode_chunk, chunks)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (fmt, max_length)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            while len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    """A line every few seconds: conversations done, per second, and the time left (from the files' estimated size)."""

    def __init__(self, expected: int | None):
        self.expected, self.start, self.last, self.done = expected, time.monotonic(), time.monotonic(), 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = f", about {_duration((self.expected - self.done) / rate)} left" if self.expected and self.expected > self.done else ""
            say(f"tokenizing: {self.done:,} conversations, {rate:,.0f}/s{left}")

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _build(directory: Path, sources: list, fmt, max_length, workers: int, info: dict) -> None:
    """Validate (streaming), tokenize and write the cache into a temporary directory beside `directory`, mark it
    complete, then rename it into place; a failure leaves nothing behind. Raises DataError with every problem."""

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        problems, render_problems, sizes = [], [], [0] * len(sources)
        progress = _Progress(_expected_samples(sources))

        def conversations():
            for k, conversation in stream_conversations(sources, problems):
                sizes[k] += 1
                yield conversation

        rows = 0
        with pa.OSFile(str(tmp / DATA), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            for batch, found in _encoded_batches(_chunks(conversations(), CHUNK), fmt, max_length, workers):
                render_problems += found
                if batch is not None and not problems and not render_problems:
                    writer.write_batch(batch)
                    rows += batch.num_rows
                progress.add(batch.num_rows if batch is not None else CHUNK)
        if problems:
            raise data_error(problems, sources)
        if render_problems:
            raise DataError(render_problems[:20], total=len(render_problems))
        say(f"tokenized {rows:,} conversations with {workers} worker(s) at {progress.rate():,.0f}/s")
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        info["sources"] = [dict(s, start=start, rows=n) for s, start, n in zip(info["sources"], offsets, sizes)]
        dataset = open_arrow(tmp)
        info["report"] = _report(dataset, list(range(rows)), None).__dict__
        files = sorted({ref for refs in dataset.data.column("images").to_pylist() for ref in refs if not ref.startswith("data:")})
        info["images"] = {path: hash_file(Path(path)) for path in files}  # damage() finds an image changed since
        del dataset
        (tmp / INFO).write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
        checksum = hash_file(tmp / DATA)
        (tmp / MARKER).write_text(json.dumps({"xxh3_128": checksum, "bytes": (tmp / DATA).stat().st_size, "rows": rows}),
                                  encoding="utf-8")
        if directory.exists():
            if damage(directory) is None:  # another node made it meanwhile
                return
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- using


def _report(dataset, rows, ids: list[str] | None) -> EncodeReport:
    """The EncodeReport of the cache rows `rows` (a selection, repeats allowed), from its small columns only;
    `ids`: their ids when a mixture renamed copies (else only the ids of truncated and dropped rows are read)."""
    import numpy as np

    table = dataset.data
    names = ("length", "supervised", "truncated", "reasoning_not_trained", "reply_cut")
    column = {name: table.column(name).to_numpy() for name in names}
    index = np.asarray(rows, dtype=np.int64)
    supervised, truncated = column["supervised"][index], column["truncated"][index]
    kept = supervised > 0

    def ids_of(selected):
        positions = np.flatnonzero(selected)
        if ids is not None:
            return [ids[j] for j in positions]
        return table.column("id").take(pa.array(index[positions])).to_pylist()

    return EncodeReport(
        samples=len(index), kept=int(kept.sum()), truncated=ids_of(truncated), dropped=ids_of(~kept),
        replies_cut=ids_of(column["reply_cut"][index]),
        tokens=int(column["length"][index][kept].sum()), supervised_tokens=int(supervised[kept].sum()),
        reasoning_not_trained=int(column["reasoning_not_trained"][index].sum()))


def _select(dataset, info: dict, weights: list | None, seed: int):
    """(the training rows as a Dataset with TRAINING_COLUMNS, their report): every row, or a weighted mixture of the
    sources drawn by index (mixture.py), less the rows left with no supervised token."""
    import numpy as np

    from .mixture import copy_ids, draw

    sources, ids, mixture_lines = info["sources"], None, []
    if weights and weights[0] is not None:
        picks, mixture_lines = draw([(s["path"], w, s["rows"]) for s, w in zip(sources, weights)], seed)
        all_ids = dataset.data.column("id").to_pylist()
        where = dataset.data.column("source")
        taken, rows, ids = set(all_ids), [], []
        for s, picked in zip(sources, picks):
            start = s["start"]
            ids += copy_ids(all_ids[start:start + s["rows"]], picked, lambda i: where[start + i].as_py(), taken)
            rows += [start + i for i in picked]
        if ids == [all_ids[i] for i in rows]:
            ids = None  # no copy was renamed
        rows = np.asarray(rows, dtype=np.int64)
    else:
        rows = np.arange(len(dataset))
    report = _report(dataset, rows, ids)
    report.mixture = mixture_lines
    keep = np.flatnonzero(dataset.data.column("supervised").to_numpy()[rows] > 0)
    out = dataset.select_columns(TRAINING_COLUMNS)
    if ids is not None:  # copies get their own ids (ID#2, ...): the rows are written out once, with the new id column
        out = out.select(rows[keep]).flatten_indices(cache_file_name=_scratch("mixture.arrow"))
        out = out.remove_columns("id").add_column("id", [ids[j] for j in keep])
    elif len(keep) != len(dataset) or not np.array_equal(rows, np.arange(len(dataset))):
        out = out.select(rows[keep])
    return out, report


@contextmanager
def _lock(path: Path | None):
    """An exclusive lock on a file (none for None): besides the launcher's barrier (sft), this keeps two processes
    from tokenizing the same data into the same place at once however they were started."""
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _scratch(name: str) -> str:
    """A file in a temporary directory removed when the process ends."""
    import atexit

    folder = tempfile.mkdtemp(prefix="qwen_tune_")
    atexit.register(shutil.rmtree, folder, True)
    return os.path.join(folder, name)


def _plan(paths, fmt, max_length) -> tuple[list, dict, str]:
    """(sources, the info to record, the key) for a --data_path of data files."""
    from .files import resolve_sources

    sources = resolve_sources(paths)
    files = []
    for s in sources:
        for f in s.files:
            files.append({"path": str(f), "xxh3_128": fingerprint(f)})
    parts = format_parts(fmt, max_length)
    info = {"key": cache_key(parts, files), "format": parts, "files": files,
            "sources": [{"path": str(s.path), "weight": str(s.weight) if s.weight else None} for s in sources]}
    return sources, info, info["key"]


def build_tokens(paths, fmt, max_length, directory: Path, workers: int) -> dict:
    """Tokenize `paths` into `directory` (kept as it is when it already holds the same key); returns its info."""
    sources, info, key = _plan(paths, fmt, max_length)
    if is_tokens_dir(directory) and damage(directory) is None and _info(directory)["key"] == key:
        say(f"tokens: {directory} is up to date (key {key})")
        return _info(directory)
    if directory.exists() and any(directory.iterdir()) and not is_tokens_dir(directory):
        raise UserError(f"{directory} exists and is not a tokens directory written by qwen-tune; give a new or empty directory")
    _build(directory, sources, fmt, max_length, workers, info)
    return _info(directory)


def _info(directory: Path) -> dict:
    return json.loads((Path(directory) / INFO).read_text(encoding="utf-8"))


def _check_format(directory: Path, fmt, max_length) -> None:
    """A tokens directory given as --data_path was made with this run's tokenizer, template, options and length."""
    theirs, ours = _info(directory)["format"], format_parts(fmt, max_length)
    differ = [k for k in ours if theirs.get(k) != ours[k]]
    if differ:
        shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} in this run" for k in differ)
        raise UserError(f"{directory} was tokenized differently from this run ({shown}); run qwen-tune preprocess "
                        "again with this run's tokenizer and options, or give the original data files")


def load_tokens(paths, fmt, max_length: int | None, *, seed: int = 0, options: CacheOptions | None = None):
    """(training rows, EncodeReport) for SFT data, memory-mapped: from the cache when its key matches, else
    validated and tokenized into it first. `paths` may also be a tokens directory (`preprocess --out DIR`)."""
    options = options or CacheOptions()
    single = paths if not isinstance(paths, str) or "," not in paths else None
    if single is not None and is_tokens_dir(single):
        directory = Path(single)
        if (why := damage(directory)) is not None:
            raise UserError(f"{directory}: this tokens directory is {why}; write it again with qwen-tune preprocess --out")
        _check_format(directory, fmt, max_length)
        info = _info(directory)
        say(f"tokens: training from {directory} (key {info['key']})")
        from fractions import Fraction

        weights = [Fraction(s["weight"]) if s["weight"] else None for s in info["sources"]]
        return _select(open_arrow(directory), info, weights, seed)
    sources, info, key = _plan(paths, fmt, max_length)
    root = options.directory()
    directory = (root / key) if root else Path(_scratch("tokens"))
    with _lock(root / ".locks" / key if root else None):  # ranks (or runs) on one machine: one builds, the others wait
        why = damage(directory) if root and directory.exists() else "absent"
        if why is None:
            say(f"tokens: loaded from the cache {directory}")
        else:
            if why != "absent":
                say(f"tokens: the cache {directory} is {why}; rebuilding it")
            _build(directory, sources, fmt, max_length, options.num_workers(), info)
            say(f"tokens: built the cache {directory}" if root else "tokens: tokenized (cache off)")
    return _select(open_arrow(directory), _info(directory), [s.weight for s in sources], seed)
