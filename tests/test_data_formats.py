"""More input formats (gzip, Parquet, Arrow, save_to_disk, CSV) and weighted mixtures of sources.

Every format goes through the same validation as JSON/JSONL and gives the same records, hence the same tokens;
problems are located by file and row (or line); a mixture takes exactly the counts its weights say.
"""

import copy
import csv
import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from qwen_tune.data.read import detect_kind, load_conversations, load_preference_pairs, load_prompts
from qwen_tune.errors import DataError, UserError

DATA = Path(__file__).resolve().parent.parent / "data"
FORMATS = ["jsonl.gz", "json.gz", "parquet", "arrow", "dir", "csv"]


def records_of(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def write_csv(path: Path, records: list[dict]) -> Path:
    """A CSV as a user would make it: one column per field, non-string values as JSON, absent fields empty."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in records:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in r.items()})
    return path


def write_as(fmt: str, name: str, out: Path) -> Path:
    """data/NAME in format `fmt` under `out`, written the usual way for that format."""
    from datasets import Dataset

    records = records_of(name)
    if fmt == "jsonl.gz":
        path = out / f"{name}.jsonl.gz"
        path.write_bytes(gzip.compress((DATA / f"{name}.jsonl").read_bytes()))
    elif fmt == "json.gz":
        path = out / f"{name}.json.gz"
        path.write_bytes(gzip.compress((DATA / f"{name}.json").read_bytes() if (DATA / f"{name}.json").exists()
                                       else json.dumps(records, indent=1).encode()))
    elif fmt == "parquet":
        path = out / f"{name}.parquet"
        Dataset.from_list(records).to_parquet(str(path))
    elif fmt == "dir":
        path = out / name
        Dataset.from_list(records).save_to_disk(str(path))
    elif fmt == "arrow":
        saved = out / f"{name}-saved"
        Dataset.from_list(records).save_to_disk(str(saved))
        path = out / f"{name}.arrow"
        path.write_bytes(next(saved.glob("*.arrow")).read_bytes())
    else:
        path = write_csv(out / f"{name}.csv", records)
    return path


def conv_key(c):
    return c.id, c.messages, c.tools, c.columns


def pair_key(p):
    return p.id, p.prompt, p.chosen, p.rejected, p.tools


def problems(loader, path, **kw) -> list[str]:
    with pytest.raises(DataError) as info:
        loader(path, **kw)
    return info.value.problems


# ---------------------------------------------------------------- the same records, the same tokens


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["sft_example", "sft_tools_example"])
def test_every_format_gives_the_records_and_tokens_of_jsonl(tmp_path, tokenizer, chatml, fmt, name):
    from qwen_tune.data.chat_format import resolve_format
    from in_memory_sft import load_sft_dataset

    path = write_as(fmt, name, tmp_path)
    want, got = load_conversations(DATA / f"{name}.jsonl"), load_conversations(path)
    assert [conv_key(c) for c in got] == [conv_key(c) for c in want]
    assert any(c.tools for c in got) == (name == "sft_tools_example")
    if fmt in ("parquet", "arrow", "dir"):
        assert [c.source for c in got] == [f"{path}:row {i}" for i in range(1, len(got) + 1)]
    elif fmt == "jsonl.gz":
        assert [c.source for c in got] == [f"{path}:{c.source.rsplit(':', 1)[1]}" for c in want]  # lines as uncompressed
    # the embedded model's ChatML has no place for tools; the tools file is rendered by the qwen3 template
    fmt_ = chatml if name == "sft_example" else resolve_format(copy.copy(tokenizer), "qwen3")
    (a, _), (b, _) = load_sft_dataset(DATA / f"{name}.jsonl", fmt_, 2048), load_sft_dataset(path, fmt_, 2048)
    assert [(e.id, e.input_ids, e.labels) for e in b] == [(e.id, e.input_ids, e.labels) for e in a] and a


def test_json_gz_lines_are_those_of_the_uncompressed_text(tmp_path):
    path = write_as("json.gz", "sft_example", tmp_path)
    want = load_conversations(DATA / "sft_example.json")
    assert [c.source for c in load_conversations(path)] == [f"{path}:{c.source.rsplit(':', 1)[1]}" for c in want]
    assert len({c.source for c in want}) == len(want) and want[1].source != f"{DATA / 'sft_example.json'}:2"


@pytest.mark.parametrize("fmt", ["parquet", "dir", "csv"])
def test_preference_pairs_and_prompts_from_tables_equal_jsonl(tmp_path, fmt):
    pairs = write_as(fmt, "preference_example", tmp_path)
    assert [pair_key(p) for p in load_preference_pairs(pairs)] == [
        pair_key(p) for p in load_preference_pairs(DATA / "preference_example.jsonl")]
    assert detect_kind(pairs) == "preference"
    for name in ("grpo_example", "prompts_example"):
        got = load_prompts(write_as(fmt, name, tmp_path))
        assert [conv_key(c) for c in got] == [conv_key(c) for c in load_prompts(DATA / f"{name}.jsonl")]
        assert got[0].columns == ({"answer": "43"} if name == "grpo_example" else {})  # the columns reward functions get


def test_schema_padding_is_dropped_but_present_fields_are_validated(tmp_path):
    """Arrow gives every message every struct field: tool_calls/reasoning_content are None where absent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    padded = pq.read_table(path).to_pylist()
    assert padded[1]["id"] is None and padded[1]["messages"][1]["reasoning_content"] is None  # the padding
    first, second = load_conversations(path)
    assert first.id == "x" and second.id == "t-1"  # default ids: the name without its suffix, as for t.jsonl
    assert second.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert first.messages[1]["reasoning_content"] == "r"
    rows[1]["messages"][1]["reasoning"] = "r"  # a real unknown field is still an error
    pq.write_table(pa.Table.from_pylist(rows[::-1]), path)
    (found,) = problems(load_conversations, path)
    assert found.startswith(f'{path}:row 1: messages[1] has an unknown field "reasoning"')


# ---------------------------------------------------------------- locating problems


def test_bad_parquet_rows_are_all_located_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"id": "ok", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [good,
            {"id": "b1", "messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            {"id": "b2", "messages": [{"role": "user", "content": "q"}]},
            {"id": "ok", "messages": good["messages"]}]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # the rows span two row groups
    with pytest.raises(DataError) as info:
        load_conversations(path)
    assert info.value.problems == [
        f'{path}:row 2 (id "b1"): messages[1].role is "bot"; expected one of user, assistant, system, tool',
        f'{path}:row 3 (id "b2"): no assistant turn, so nothing to learn from; SFT data needs at least one',
        f'{path}:row 4 (id "ok"): duplicate id "ok" (first at {path}:row 1)',
    ]
    assert str(info.value).startswith("3 problem(s) in the data (table rows count from 1):")


def test_bad_csv_rows_and_malformed_json_cells_are_located_by_line(tmp_path):
    good = json.dumps([{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "a"}], indent=None)
    good = good.replace("}, {", "},\n{")  # the JSON cell spans two physical lines
    path = tmp_path / "t.csv"
    path.write_text(
        "id,messages,note\n"
        f'a,"{good.replace(chr(34), chr(34) * 2)}",\n'  # a quoted cell across two lines: 2-3
        '"b","[{""role"": ""user"", ""content"": ""q""}, {""role"": ""bot"", ""content"": ""x""}]",n\n'  # 4
        "\n"
        '"c","[{""role"": ""user"", ""content"": ""q""}",n\n'  # 6: not valid JSON
        "d,only two\n",  # 7
        encoding="utf-8")
    assert problems(load_conversations, path) == [  # what the file's reading finds, then what validation finds
        f'{path}:6: column "messages" starts with [ but is not valid JSON: Expecting \',\' delimiter (column 34); '
        "a cell starting with [ or { is read as JSON",
        f"{path}:7: the row has 2 cells but the header has 3 columns",
        f'{path}:4 (id "b"): messages[1].role is "bot"; expected one of user, assistant, system, tool',
    ]
    path.write_text("id,messages\n" f'a,"{good.replace(chr(34), chr(34) * 2)}"\n', encoding="utf-8")
    (conv,) = load_conversations(path)
    assert conv.source == f"{path}:2" and conv.messages[0]["content"] == "line one\nline two"


def test_unreadable_files_are_problems_not_tracebacks(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    (tmp_path / "y.jsonl.gz").write_bytes(b"not gzip")
    (tmp_path / "z.arrow").write_bytes(b"not arrow")
    (tmp_path / "h.csv").write_text("id,messages\n", encoding="utf-8")
    found = problems(load_conversations, [tmp_path / n for n in ("x.parquet", "y.jsonl.gz", "z.arrow", "h.csv")])
    assert [p.split(": ", 1)[0] for p in found] == [str(tmp_path / "x.parquet"), str(tmp_path / "y.jsonl.gz"),
                                                   str(tmp_path / "z.arrow"), f"{tmp_path / 'h.csv'}:1"]
    assert "not a readable Parquet file" in found[0] and "not a readable gzip file" in found[1]
    assert "not a readable Arrow file" in found[2] and "no rows (no samples)" in found[3]


def test_dataset_dict_takes_train_or_lists_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(records_of("sft_example"))
    DatasetDict(train=ds, test=ds.select(range(2))).save_to_disk(str(tmp_path / "dd"))
    assert len(load_conversations(tmp_path / "dd")) == len(ds)
    assert len(load_conversations(tmp_path / "dd" / "test")) == 2  # a split's own directory
    DatasetDict(validation=ds, test=ds).save_to_disk(str(tmp_path / "no_train"))
    (found,) = problems(load_conversations, tmp_path / "no_train")
    assert "splits validation, test" in found.replace("split(s)", "splits") and 'no "train" split' in found
    assert str(tmp_path / "no_train" / "validation") in found


def test_directory_of_mixed_formats_and_unsupported_files(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    write_as("parquet", "sft_example", d)
    write_as("csv", "sft_tools_example", d)
    want = load_conversations([DATA / "sft_example.jsonl", DATA / "sft_tools_example.jsonl"])
    assert [conv_key(c) for c in load_conversations(d)] == [conv_key(c) for c in want]  # sorted: .csv, .parquet
    (d / "notes.txt").write_text("not data")  # never skipped without a word
    (d / "more").mkdir()
    capsys.readouterr()
    assert len(load_conversations(d)) == len(want)
    assert f"data: reading 2 files of {d}; not read: more/, notes.txt (not a data file type; folders are not " \
           f"searched)" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"unsupported data file type; expected .*\.jsonl\.gz.*\.csv.*\.parquet, \.arrow"):
        load_conversations(d / "notes.txt")


def test_hostile_files_give_their_file_and_line(tmp_path):
    import gzip

    from qwen_tune.data.read import load_preference_pairs

    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in records_of("sft_example")).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (found,) = problems(load_conversations, tmp_path / "cut.jsonl.gz")
    assert "the gzip file ends early" in found and found.startswith(f"{tmp_path / 'cut.jsonl.gz'}:"), found
    (tmp_path / "deep.jsonl").write_text(json.dumps(records_of("sft_example")[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    (found,) = problems(load_conversations, tmp_path / "deep.jsonl")
    assert found.startswith(f"{tmp_path / 'deep.jsonl'}:2: JSON nested too deeply"), found
    good = json.dumps(records_of("sft_example")[0])
    with open(tmp_path / "long.jsonl", "w") as f:  # line 2: 65 MiB, read a piece at a time; line 3 still checked
        f.write(good + "\n" + '{"messages": "' + "x" * (65 << 20) + '"}\n' + "{oops\n"
                + json.dumps(records_of("sft_example")[1]) + "\n")
    found = problems(load_conversations, tmp_path / "long.jsonl")
    assert found[0] == f"{tmp_path / 'long.jsonl'}:2: the line is longer than 64 MiB, far more text than any model's " \
                       f"context; split or shorten that sample", found
    assert found[1].startswith(f"{tmp_path / 'long.jsonl'}:3: invalid JSON") and len(found) == 2, found
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "same.", "rejected": "same."}
    (tmp_path / "pairs.jsonl").write_text(json.dumps({**pair, "rejected": "other."}) + "\n" + json.dumps(pair) + "\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:2: .*\"chosen\" and \"rejected\" are the same reply"):
        load_preference_pairs(tmp_path / "pairs.jsonl")


# ---------------------------------------------------------------- mixtures


def make_sources(tmp_path, sizes=(10, 30)) -> list[Path]:
    """a.jsonl with `a0`..., b.parquet with `b0`..."""
    from datasets import Dataset

    paths = []
    for name, n in zip("ab", sizes):
        rows = [{"id": f"{name}{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
                for i in range(n)]
        if name == "a":
            path = tmp_path / "a.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        else:
            path = tmp_path / "b.parquet"
            Dataset.from_list(rows).to_parquet(str(path))
        paths.append(path)
    return paths


def test_mixture_takes_the_weighted_counts_reproducibly(tmp_path):
    a, b = make_sources(tmp_path)
    spec = f"{a}:0.7,{b}:0.3"
    lines: list[str] = []
    mixed = load_conversations(spec, seed=1, log=lines.append)
    counts = Counter(c.id[0] for c in mixed)
    assert counts == {"a": 28, "b": 12}  # 40 samples in all: a 0.7 * 40 (over its 10: 2 passes + 8), b 0.3 * 40
    ids = [c.id for c in mixed]
    assert len(set(ids)) == len(ids)
    a_ids = [i for i in ids if i.startswith("a")]
    assert a_ids[:20] == [f"a{i}" for i in range(10)] + [f"a{i}#2" for i in range(10)] and len(a_ids) == 28
    assert all(re.fullmatch(r"a\d#3", i) for i in a_ids[20:])
    assert {c.source for c in mixed if c.id.startswith("a3")} == {f"{a}:4"}  # copies point at the original
    assert lines == [
        "mixture of 2 sources (seed 1): 40 samples; the sources hold 40",
        f"  {a}: weight 0.7 (share 70.0%), 10 samples, 28 used (repeated: each used 2x, 8 of them 3x)",
        f"  {b}: weight 0.3 (share 30.0%), 30 samples, 12 used (subsampled, 18 not used)",
    ]
    assert [c.id for c in load_conversations(spec, seed=1)] == ids  # the same seed, the same mixture
    assert [c.id for c in load_conversations(spec, seed=2)] != ids
    assert Counter(c.id[0] for c in load_conversations(f"{a}:7,{b}:3", seed=5)) == counts  # weights are normalised
    assert Counter(c.id[0] for c in load_conversations(f"{a}:1,{b}:1")) == {"a": 20, "b": 20}


def test_without_weights_all_samples_in_order_and_duplicates_still_caught(tmp_path):
    a, b = make_sources(tmp_path, (3, 2))
    assert [c.id for c in load_conversations(f"{a},{b}")] == ["a0", "a1", "a2", "b0", "b1"]
    dup = tmp_path / "dup.jsonl"
    dup.write_text(a.read_text() + a.read_text().splitlines()[0] + "\n", encoding="utf-8")
    assert problems(load_conversations, f"{dup}:1,{b}:1") == [f'{dup}:4 (id "a0"): duplicate id "a0" (first at {dup}:1)']


@pytest.mark.parametrize("weight", ["0", "-1", "x", "", "inf", "nan"])
def test_a_weight_that_is_not_a_positive_number_is_a_clear_error(tmp_path, weight):
    a, b = make_sources(tmp_path, (2, 2))
    with pytest.raises(UserError, match=f"the weight '{re.escape(weight)}' after the last ':' is not a positive number"):
        load_conversations(f"{a}:{weight},{b}:1")


def test_weights_on_some_sources_only_is_an_error(tmp_path):
    a, b = make_sources(tmp_path, (2, 2))
    with pytest.raises(UserError, match=f"a weighted mixture needs a weight on every source.*none on: {re.escape(str(b))}"):
        load_conversations(f"{a}:0.5,{b}")


def test_a_colon_in_a_real_file_name_is_part_of_the_path(tmp_path):
    a, b = make_sources(tmp_path, (2, 2))
    odd = tmp_path / "a:0.5.jsonl"
    odd.write_text(a.read_text().replace('"id": "a', '"id": "o'), encoding="utf-8")
    assert [c.id for c in load_conversations(str(odd))] == ["o0", "o1"]
    assert Counter(c.id[0] for c in load_conversations(f"{odd}:3,{b}:1")) == {"o": 3, "b": 1}
    with pytest.raises(UserError, match="data path not found"):
        load_conversations(f"{tmp_path / 'nope.jsonl'}:0.5")


def test_mixture_report_reaches_the_data_summary(tmp_path, chatml):
    from in_memory_sft import load_sft_dataset
    from qwen_tune.data.pairs import encode_pairs

    a, b = make_sources(tmp_path, (4, 4))
    samples, report = load_sft_dataset(f"{a}:3,{b}:1", chatml, 512, seed=3)
    assert len(samples) == 8 and report.summary("train").splitlines()[1:] == [
        "  mixture of 2 sources (seed 3): 8 samples; the sources hold 8",
        f"    {a}: weight 3 (share 75.0%), 4 samples, 6 used (repeated: each used 1x, 2 of them 2x)",
        f"    {b}: weight 1 (share 25.0%), 4 samples, 2 used (subsampled, 2 not used)",
    ]
    pairs = DATA / "preference_example.jsonl"
    rows, pair_report = encode_pairs(f"{pairs}:2", chatml, 512, seed=0)
    n = len(records_of("preference_example"))
    assert len(rows) == n and f"{pairs}: weight 2 (share 100.0%), {n} samples, {n} used (each used once)" in pair_report.summary("train")
    _, plain = load_sft_dataset(str(a), chatml, 512)
    assert "mixture" not in plain.summary("train")


# ---------------------------------------------------------------- the model card


def test_model_card_facts_for_tables_and_weighted_paths(tmp_path):
    from qwen_tune.report import _data_section, file_facts

    parquet = write_as("parquet", "sft_example", tmp_path)
    n = len(records_of("sft_example"))
    assert file_facts(parquet) == (n, hashlib.sha256(parquet.read_bytes()).hexdigest())
    saved = write_as("dir", "sft_example", tmp_path)
    count, digest = file_facts(saved)
    assert count == n and digest == file_facts(saved)[1] and len(digest) == 64
    csv_file = write_as("csv", "sft_example", tmp_path)
    assert file_facts(csv_file)[0] == n and file_facts(write_as("jsonl.gz", "sft_example", tmp_path))[0] == n
    lines = _data_section({"train": f"{parquet}:0.7,{saved}:0.3"}, {})
    assert f"| train | `{parquet.resolve()}` (weight 0.7) | {n} | `{file_facts(parquet)[1]}` |" in lines
    assert f"| train | `{saved.resolve()}` (weight 0.3) | {n} | `{digest}` |" in lines
