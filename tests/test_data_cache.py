"""Tokenize once (data/cache.py): the memory-mapped cache gives exactly the in-memory path's tokens and report,
is reused while nothing that makes the tokens changed, is rebuilt when it is damaged, and is shared by ranks."""

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import DATA, ROOT, free_port, fresh_env, run_cli
from qwen_tune.data.cache import DATA as ARROW, load_tokens
from qwen_tune.options import CacheOptions
from qwen_tune.data.chat_format import ChatFormat, resolve_format
from in_memory_sft import load_sft_dataset
from qwen_tune.data.read import load_conversations
from qwen_tune.data.splits import hold_out
from qwen_tune.errors import DataError, UserError


def rows(ds):
    return [(r["id"], r["input_ids"], r["labels"]) for r in ds]


def entries(cache: Path) -> list[Path]:
    """The cache directories (not the lock files' folder)."""
    return [p for p in cache.iterdir() if not p.name.startswith(".")]


def expected(encoded):
    return [(e.id, e.input_ids, e.labels) for e in encoded]


@pytest.fixture
def qwen3(tokenizer):
    return resolve_format(copy.copy(tokenizer), chat_template="qwen3")


@pytest.fixture
def encodes(monkeypatch):
    """How many times conversations were tokenized in this process (workers=1 tokenizes in-process)."""
    calls = []
    original = ChatFormat.encode_many

    def spy(self, conversations, *args, **kwargs):
        calls.append(len(conversations))
        return original(self, conversations, *args, **kwargs)

    monkeypatch.setattr(ChatFormat, "encode_many", spy)
    return calls


@pytest.mark.parametrize("name,template", [("sft_example.jsonl", None), ("sft_tools_example.jsonl", "qwen3")])
@pytest.mark.parametrize("max_length", [512, 40])
@pytest.mark.parametrize("workers", [1, 2])
def test_cached_tokens_and_report_equal_the_in_memory_path(tokenizer, tmp_path, name, template, max_length, workers):
    fmt = resolve_format(copy.copy(tokenizer), chat_template=template)
    encoded, report = load_sft_dataset(str(DATA + "/" + name), fmt, max_length)
    options = CacheOptions(str(tmp_path), workers)
    for _ in range(2):  # built, then loaded
        ds, cached = load_tokens(f"{DATA}/{name}", fmt, max_length, options=options)
        assert rows(ds) == expected(encoded)
        assert cached.__dict__ == report.__dict__
        assert ds["length"][:] == [len(e.input_ids) for e in encoded]


def test_second_load_comes_from_the_cache_and_what_changes_tokens_retokenizes(tokenizer, chatml, tmp_path, encodes, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(Path(DATA, "sft_example.jsonl").read_bytes())
    options = CacheOptions(str(tmp_path / "cache"), 1)
    first, _ = load_tokens(str(data), chatml, 512, options=options)
    assert encodes and "tokens: built the cache" in capsys.readouterr().err

    def tokenized_again(fmt=chatml, max_length=512) -> bool:
        before = len(encodes)
        ds, _ = load_tokens(str(data), fmt, max_length, options=options)
        err = capsys.readouterr().err
        assert ("loaded from the cache" in err) == (len(encodes) == before), err
        return len(encodes) > before

    assert not tokenized_again()
    os.utime(data, (1, 1))  # touched, not changed: the key is the content
    assert not tokenized_again()
    assert tokenized_again(max_length=64)
    assert tokenized_again(fmt=resolve_format(copy.copy(tokenizer), system_message="Be brief."))
    assert tokenized_again(fmt=resolve_format(copy.copy(tokenizer), chat_template="qwen3"))
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<qwen_tune_test_token>"])
    assert tokenized_again(fmt=resolve_format(other))
    data.write_text(data.read_text(encoding="utf-8").replace("pineapple", "mango").replace("Who are you", "Who are u"),
                    encoding="utf-8")
    assert tokenized_again()
    assert not tokenized_again()
    assert len(entries(tmp_path / "cache")) == 6  # one directory per key
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]  # no temporary left over


@pytest.mark.parametrize("damage", ["truncate", "flip", "incomplete"])
def test_a_damaged_cache_is_detected_reported_and_rebuilt(chatml, tmp_path, encodes, capsys, damage):
    options = CacheOptions(str(tmp_path), 1)
    good, _ = load_tokens(f"{DATA}/sft_example.jsonl", chatml, 512, options=options)
    want = rows(good)
    (directory,) = entries(tmp_path)
    arrow = directory / ARROW
    if damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(arrow.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        arrow.write_bytes(bytes(raw))
    else:
        (directory / "complete.json").unlink()
    capsys.readouterr()
    calls = len(encodes)
    ds, _ = load_tokens(f"{DATA}/sft_example.jsonl", chatml, 512, options=options)
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "rebuilding" in l]
    assert str(directory) in line and {"truncate": "wrong size", "flip": "checksum", "incomplete": "incomplete"}[damage] in line
    assert len(encodes) > calls and rows(ds) == want


def test_bad_records_are_all_reported_with_file_and_line_from_the_streaming_path(chatml, tmp_path):
    good = Path(DATA, "sft_example.jsonl").read_text(encoding="utf-8").splitlines()
    lines = good[:3] + ["{not json", '{"messages": []}'] + good[3:6] + ['{"messages": [{"role": "user", "content": "q"}]}']
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from datasets import Dataset

    records = [dict(json.loads(line), id=f"p{i}") for i, line in enumerate(good[:4])] + [{"id": "p_bad", "messages": [{"role": "bot", "content": "x"}]}]
    Dataset.from_list(records).to_parquet(str(tmp_path / "bad.parquet"))
    paths = f"{tmp_path / 'bad.jsonl'},{tmp_path / 'bad.parquet'}"
    with pytest.raises(DataError) as old:
        load_conversations(paths)
    with pytest.raises(DataError) as new:
        load_tokens(paths, chatml, 512, options=CacheOptions(str(tmp_path / "cache"), 2))
    assert new.value.problems == old.value.problems and len(new.value.problems) == 4
    assert [p.split(" ", 1)[0].rstrip(":") for p in new.value.problems] == [
        f"{tmp_path / 'bad.jsonl'}:4", f"{tmp_path / 'bad.jsonl'}:5", f"{tmp_path / 'bad.jsonl'}:9", f"{tmp_path / 'bad.parquet'}:row"]
    assert "table rows count from 1" in str(new.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]  # nothing half-written is left


def test_mixtures_and_val_size_from_the_cache_give_the_same_splits(chatml, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(Path(DATA, "sft_example.jsonl").read_bytes())
    b.write_text(Path(DATA, "sft_example.jsonl").read_text(encoding="utf-8").replace('"id": "', '"id": "b_'), encoding="utf-8")
    options = CacheOptions(str(tmp_path / "cache"), 2)
    for paths in [f"{a}:0.8,{b}:0.2", f"{a}:1,{b}:3", f"{a},{b}"]:
        for seed in (0, 7):
            encoded, report = load_sft_dataset(paths, chatml, 60, seed=seed)
            ds, cached = load_tokens(paths, chatml, 60, seed=seed, options=options)
            assert rows(ds) == expected(encoded), paths
            assert cached.__dict__ == report.__dict__
            train, held, split = hold_out(encoded, 3, seed)
            ctrain, cheld, csplit = hold_out(ds, 3, seed)
            assert rows(ctrain) == expected(train) and rows(cheld) == expected(held) and csplit == split
    assert len(entries(tmp_path / "cache")) == 1  # weights and seed mix the same tokens


def test_a_tokens_directory_made_for_another_tokenizer_or_length_is_refused(chatml, tokenizer, tmp_path):
    from qwen_tune.data.cache import build_tokens

    out = tmp_path / "tokens"
    build_tokens(f"{DATA}/sft_example.jsonl", chatml, 512, out, 1)
    ds, report = load_tokens(str(out), chatml, 512)
    assert len(ds) == report.kept == 12
    with pytest.raises(UserError, match=r"tokenized differently.*model_max_length: 512 there, 64 in this run"):
        load_tokens(str(out), chatml, 64)
    with pytest.raises(UserError, match="chat_template"):
        load_tokens(str(out), resolve_format(copy.copy(tokenizer), chat_template="qwen3"), 512)
    with pytest.raises(UserError, match="not a tokens directory"):
        build_tokens(f"{DATA}/sft_example.jsonl", chatml, 512, Path(DATA), 1)


@pytest.mark.slow
def test_preprocess_out_dir_then_sft_trains_from_it(tmp_path):
    """As a user would: preprocess without --tokenizer tokenizes for the embedded model, which sft then trains."""
    out = tmp_path / "tokens"
    proc = run_cli("preprocess", "--data", f"{DATA}/sft_example.jsonl", "--out", str(out))
    assert "12 samples, 12 kept" in proc.stdout and (out / "complete.json").is_file()
    run = run_cli("sft", "--data_path", str(out), "--output_dir", str(tmp_path / "o"), "--max_steps", "2",
                  "--report_to", "none", "--save_strategy", "no")
    assert f"tokens: training from {out}" in run.stderr and "train: 12 samples, 12 kept" in run.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()
    bad = run_cli("sft", "--data_path", str(out), "--output_dir", str(tmp_path / "o2"), "--model_max_length", "64",
                  check=False)
    assert bad.returncode == 2 and "tokenized differently" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_two_ranks_tokenize_once(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run(
        ["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         "-m", "qwen_tune", "sft", "--data_path", f"{DATA}/sft_example.jsonl", "--output_dir", str(tmp_path / "o"),
         "--max_steps", "1", "--per_device_train_batch_size", "1", "--report_to", "none", "--save_strategy", "no",
         "--tokens_cache", str(cache)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=fresh_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    # searched anywhere: two ranks share one stderr, so a line may follow another rank's partial line
    built = re.findall(r"\[rank (\d)\] tokens: built the cache", proc.stderr)
    loaded = re.findall(r"\[rank (\d)\] tokens: loaded from the cache", proc.stderr)
    assert len(built) == len(loaded) == 1 and {built[0], loaded[0]} == {"0", "1"}, proc.stderr[-5000:]
    assert len(entries(cache)) == 1
    # one synchronised world of 2 (DDP over gloo), not two lone runs: one step of 2 x 1 samples is 2/12 of an epoch
    metrics = json.loads((tmp_path / "o" / "train_metrics.json").read_text())
    assert metrics["epoch"] == pytest.approx(2 / 12, abs=1e-3)
