"""Tables as records: CSV rows (JSON cells parsed), and Parquet, Arrow and `datasets.save_to_disk` rows.

A row becomes a dict of its columns, then goes through the same validation as a JSON record. Arrow (and so
Parquet) gives every row every column of the schema and every struct every field: what a record did not have
reads as None. Those Nones are dropped (`without_padding`), which gives back the record as it was written; a
null written on purpose cannot be told apart from that padding, so it also reads as absent. CSV is the same with
empty cells. Rows are located as `file:row N`, row 1 being the first row; CSV rows as `file:LINE`, the physical
line where the row starts (the header is line 1).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

BATCH = 1024  # rows turned into Python objects at a time, so a large file is never converted whole


def without_padding(value):
    """The value with None dict entries removed, recursively (list items are kept: a list has no schema padding)."""
    if isinstance(value, dict):
        return {k: without_padding(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_padding(v) for v in value]
    return value


def _rows(path: Path, batches, problems: list[str]) -> Iterator[tuple[str, dict]]:
    """("row N", record) for the rows of Arrow record batches (or tables), a batch at a time."""
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield f"row {n}", without_padding(row)
    if not n:
        problems.append(f"{path}: the table has no rows (no samples)")


def read_parquet(path: Path, problems: list[str]) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        yield from _rows(path, pq.ParquetFile(path).iter_batches(batch_size=BATCH), problems)
    except (pa.ArrowException, OSError) as e:
        problems.append(f"{path}: not a readable Parquet file ({e})")


def _arrow_batches(path: Path):
    """Record batches of an Arrow IPC file (random access, e.g. Feather v2) or stream (what `datasets` writes), memory-mapped."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path)))


def read_arrow(path: Path, problems: list[str]) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa

    try:
        yield from _rows(path, _arrow_batches(path), problems)
    except (pa.ArrowException, OSError) as e:
        problems.append(f"{path}: not a readable Arrow file ({e})")


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return any((path / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json"))


def _load_saved(path: Path, problems: list[str]):
    """The saved Dataset (a DatasetDict's "train" split), memory-mapped; None after a problem."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several kinds (FileNotFoundError, ValueError, ArrowInvalid, KeyError ...)
        problems.append(f"{path}: not a readable datasets directory (save_to_disk) ({type(e).__name__}: {e})")
        return None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            problems.append(f"{path}: a DatasetDict with the split(s) {', '.join(ds)} and no \"train\" split; "
                            f"give the directory of the split to use, e.g. {path / next(iter(ds))}")
            return None
        ds = ds["train"]
    return ds


def read_dataset(where, ds, problems: list[str]) -> Iterator[tuple[str, dict]]:
    """("row N", record) for the rows of a `datasets.Dataset`; `where` names it in problems."""
    yield from _rows(where, ds.with_format("arrow").iter(batch_size=BATCH), problems)


def read_saved_dataset(path: Path, problems: list[str]) -> Iterator[tuple[str, dict]]:
    ds = _load_saved(path, problems)
    if ds is not None:
        yield from read_dataset(path, ds, problems)


def count_rows(path: Path) -> int:
    """The number of rows of a Parquet or Arrow file or a saved dataset, from its metadata."""
    if path.is_dir():
        ds = _load_saved(path, [])
        return 0 if ds is None else len(ds)
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(batch.num_rows for batch in _arrow_batches(path))


def _cell(text: str, column: str, where: str, problems: list[str]):
    """A CSV cell: JSON if it looks like an array or object (`messages`, `tools`, ...), else the text as it is."""
    if not text.lstrip().startswith(("[", "{")):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno} of the cell"
        problems.append(f'{where}: column "{column}" starts with {text.lstrip()[0]} but is not valid JSON: {e.msg} ({at}); '
                        "a cell starting with [ or { is read as JSON")
        return None


def read_csv(path: Path, lines: Iterator[str], problems: list[str]) -> Iterator[tuple[int, dict]]:
    """(line, record) for each row, read a row at a time: a dict of header -> cell, empty cells left out (CSV cannot
    tell "" from absent). `lines`: the file's text lines (files.py reads and decodes them)."""
    reader = csv.reader(lines)
    header, line, found, rows = None, 0, len(problems), 0
    try:
        for cells in reader:
            start, line = line + 1, reader.line_num
            if not cells:  # a blank line
                continue
            if header is None:
                header = cells
                twice = sorted({c for c in header if header.count(c) > 1})
                if twice:
                    problems.append(f"{path}:{start}: the header names column(s) {', '.join(twice)} more than once")
                    return
                continue
            where = f"{path}:{start}"
            if len(cells) != len(header):
                problems.append(f"{where}: the row has {len(cells)} cells but the header has {len(header)} columns")
                continue
            before = len(problems)
            record = {k: _cell(v, k, where, problems) for k, v in zip(header, cells) if v != ""}
            if len(problems) == before:
                rows += 1
                yield start, record
    except csv.Error as e:
        problems.append(f"{path}:{reader.line_num}: not readable as CSV ({e})")
        return
    if not rows and len(problems) == found:
        problems.append(f"{path}:1: the file has a header but no rows (no samples)")
