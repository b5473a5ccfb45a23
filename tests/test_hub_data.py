"""`--data_path org/name[:config][:split]`: a dataset in the local Hugging Face cache, read offline, validated like a
file, its problems located as `org/name:split:row N`.

The caches are written here as the libraries leave them: the hub cache as a repository's files under
`datasets--org--name/snapshots/REV` with `refs/main` (what `load_dataset` or `hf download` downloads), the datasets
cache as the Arrow tables `load_dataset` prepares (`org___name/CONFIG/VERSION/HASH`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen_tune.data.read import load_conversations
from qwen_tune.errors import DataError, UserError

REVISION = "0123456789abcdef0123456789abcdef01234567"
MULTI_README = """---
configs:
- config_name: short
  data_files:
  - split: train
    path: short/train.parquet
- config_name: long
  data_files:
  - split: train
    path: long/train.parquet
---
"""


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def write_snapshot(hub_cache, repo_id: str, files: dict) -> None:
    """A dataset repository in the hub cache: `files` (path -> rows, or text) in a snapshot that refs/main names."""
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    for name, content in files.items():
        path = repo / "snapshots" / REVISION / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            pq.write_table(pa.Table.from_pylist(content), path)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)


def bad_train_rows() -> list[dict]:
    rows = [chat(i) for i in range(4)]
    rows[2] = {"messages": [{"role": "user", "content": "no reply"}]}  # row 3: nothing to learn from
    return rows


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty hub and datasets caches under tmp_path, in this process (the libraries read the variables at import),
    and offline mode off, as in a shell without HF_HUB_OFFLINE: qwen-tune forces it while it loads."""
    hub_cache, datasets_cache = tmp_path / "hub", tmp_path / "datasets"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(datasets_cache))
    monkeypatch.chdir(tmp_path)
    return hub_cache, datasets_cache


def test_a_cached_dataset_is_read_offline_and_its_problems_name_the_split_and_row(caches):
    write_snapshot(caches[0], "org/chat", {"data/train-00000-of-00001.parquet": bad_train_rows(),
                                           "data/test-00000-of-00001.parquet": [chat(10), chat(11)]})
    with pytest.raises(DataError) as bad:
        load_conversations("org/chat")  # no split named: train
    assert "org/chat:train:row 3: no assistant turn" in str(bad.value) and "table rows count from 1" in str(bad.value)
    test = load_conversations("org/chat:test")
    assert [(c.id, c.source, c.messages[1]["content"]) for c in test] == [
        ("chat-test-0", "org/chat:test:row 1", "answer 10"), ("chat-test-1", "org/chat:test:row 2", "answer 11")]
    # a mixture weight still follows the last colon
    (caches[0].parent / "extra.jsonl").write_text(json.dumps(chat(5)) + "\n")
    mixed = load_conversations("org/chat:test:1,extra.jsonl:1")
    assert [c.id for c in mixed] == ["chat-test-0", "chat-test-1", "extra-0", "extra-0#2"]
    with pytest.raises(UserError, match=r"^org/chat:dev: org/chat has no split 'dev' in the cache; its splits: train, test"):
        load_conversations("org/chat:dev")


def test_an_unknown_name_says_what_the_cache_holds_and_how_to_download_it(caches):
    write_snapshot(caches[0], "org/chat", {"data/train-00000-of-00001.parquet": [chat(0)]})
    with pytest.raises(UserError) as missing:
        load_conversations("org/other:train")
    message = str(missing.value)
    assert "\n" not in message and message.startswith("org/other:train: no such file or directory")
    assert str(caches[0]) in message and "it holds org/chat" in message
    assert "datasets.load_dataset('org/other')" in message
    with pytest.raises(UserError, match="data path not found: org/missing.jsonl"):  # a file's name stays a file
        load_conversations("org/missing.jsonl")


def test_a_local_path_wins_over_a_dataset_name(caches):
    write_snapshot(caches[0], "org/chat", {"data/train-00000-of-00001.parquet": [chat(0)]})
    local = caches[0].parent / "org" / "chat"
    local.mkdir(parents=True)
    (local / "mine.jsonl").write_text(json.dumps(chat(7)) + "\n")
    [sample] = load_conversations("org/chat")
    assert sample.source == "org/chat/mine.jsonl:1" and sample.messages[1]["content"] == "answer 7"


def test_a_dataset_with_several_configs_needs_one_named(caches):
    write_snapshot(caches[0], "org/multi", {"README.md": MULTI_README, "short/train.parquet": [chat(1)],
                                            "long/train.parquet": [chat(2), chat(3)]})
    with pytest.raises(UserError) as ambiguous:
        load_conversations("org/multi")
    assert str(ambiguous.value) == ("org/multi: org/multi has several configs in the cache (short, long) and none is "
                                    '"default"; name one, e.g. org/multi:short:train')
    samples = load_conversations("org/multi:long:train")
    assert [c.source for c in samples] == ["org/multi:long:train:row 1", "org/multi:long:train:row 2"]
    with pytest.raises(UserError, match=r"has no config 'medium' in the cache; its configs: short, long"):
        load_conversations("org/multi:medium:train")


class Lines(logging.Handler):
    """What a logger passes on to its handlers (the console), after the loggers' own filters."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_tables_prepared_by_load_dataset_are_read_without_the_repository_files(caches, tmp_path, capfd):
    """What a connected `load_dataset("org/prepared")` leaves in the datasets cache (its Arrow tables), alone."""
    source = tmp_path / "prepared"
    (source / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(bad_train_rows()), source / "data" / "train-00000-of-00001.parquet")
    datasets.load_dataset(str(source), split="train")  # prepares prepared/default/0.0.0/HASH in the datasets cache
    [prepared] = [p for p in caches[1].glob("prepared/default/0.0.0/*") if p.is_dir()]
    shutil.copytree(prepared, caches[1] / "org___prepared" / "default" / "0.0.0" / prepared.name)
    shutil.rmtree(source)
    capfd.readouterr()
    library = Lines()
    logging.getLogger("datasets").addHandler(library)
    try:
        with pytest.raises(DataError, match=r"org/prepared:train:row 3: no assistant turn"):
            load_conversations("org/prepared")
    finally:
        logging.getLogger("datasets").removeHandler(library)
    # said once, where the data came from; not datasets' "couldn't reach the hub, found a cached version" lines
    assert capfd.readouterr().err.count("data: org/prepared:train from the Hugging Face cache (4 rows") == 1
    assert not [line for line in library.lines if "cached" in line], library.lines


def run_in_process(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`qwen-tune ARGV` in this process (the caches fixture's locations hold): (exit code, stdout, stderr)."""
    from qwen_tune.cli import entry

    monkeypatch.setattr(sys, "argv", ["qwen-tune", *argv])
    try:
        entry()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_preprocess_shows_a_cached_dataset_and_sft_names_its_bad_row(caches, monkeypatch, capsys):
    write_snapshot(caches[0], "org/chat", {"data/train-00000-of-00001.parquet": bad_train_rows(),
                                           "data/test-00000-of-00001.parquet": [chat(10), chat(11)]})
    code, out, err = run_in_process(["preprocess", "--data", "org/chat:test", "--show", "1", "--tokens_cache", "none"],
                                    monkeypatch, capsys)
    assert code == 0 and "[[answer 10<|im_end|>]]" in out and "2 samples, 2 kept" in out, err
    code, out, err = run_in_process(["sft", "--data_path", "org/chat", "--output_dir", str(caches[0].parent / "o")],
                                    monkeypatch, capsys)
    assert code == 2 and "org/chat:train:row 3: no assistant turn" in err and "Traceback" not in err


def test_sft_trains_a_step_on_a_cached_dataset(caches, monkeypatch, capsys):
    """The run says where its data came from, and the card names it (in this process: the caches fixture points the
    libraries' cache locations where HF_HUB_CACHE / HF_DATASETS_CACHE would)."""
    write_snapshot(caches[0], "org/chat", {"data/test-00000-of-00001.parquet": [chat(10), chat(11)]})
    out = caches[0].parent / "o"
    code, _, err = run_in_process(["sft", "--data_path", "org/chat:test", "--output_dir", str(out), "--max_steps", "1",
                                   "--report_to", "none", "--save_strategy", "no", "--tokens_cache", "none"], monkeypatch, capsys)
    assert code == 0, err
    assert "data: org/chat:test from the Hugging Face cache (2 rows" in err
    assert "`org/chat:test (Hugging Face cache)` | 2 |" in (out / "README.md").read_text()
