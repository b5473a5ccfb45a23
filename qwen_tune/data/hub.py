"""A dataset in the local Hugging Face cache as a `--data_path`, offline: `org/name`, `org/name:SPLIT` or
`org/name:CONFIG:SPLIT` (a mixture weight still follows the last colon: `org/name:train_sft:0.5`).

Where it is looked for, never on the network (offline mode is forced while loading):
  1. the hub cache (`HF_HUB_CACHE/datasets--org--name/snapshots/...`): the repository's files as `load_dataset`,
     `snapshot_download` or `hf download` left them; `datasets` reads them as a local directory (its configs and
     splits from the README's YAML or the file names, as it would on the hub);
  2. the datasets cache (`HF_DATASETS_CACHE/org___name/...`): the Arrow tables `load_dataset` prepared.
Rows are then records like a Parquet file's, located as `org/name:split:row N` (row 1 the first).
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..train.distributed import log

# org/name, then up to two `:part`s (config, split); a name ending like a data file is a missing file, not a dataset
_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<a>[\w.-]+))?(?::(?P<b>[\w.-]+))?$")
_FILE_SUFFIX = re.compile(r"\.(jsonl?|csv|parquet|arrow|gz)$", re.IGNORECASE)


def looks_like_name(text: str) -> bool:
    """`text` is written like a hub dataset (`org/name[:config][:split]`), not like a data file's path."""
    match = _NAME.match(text)
    return bool(match) and not _FILE_SUFFIX.search(match["repo"])


@dataclass(frozen=True)
class HubDataset:
    """One split of a cached dataset; `str()` is how it is written in --data_path and in problems' locations."""

    repo_id: str
    config: str  # as `datasets` names it (named, or the default or only one)
    split: str
    source: str  # what `datasets.load_dataset` reads: the snapshot directory, or the repo id (its prepared tables)
    label: str = field(compare=False)
    base_dir: Path = field(compare=False)  # where relative image paths start: the snapshot (or cache) directory

    @property
    def name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.label

    def dataset(self):
        """The split as a memory-mapped `datasets.Dataset` (loaded once per process)."""
        return _load(self.source, self.config, self.split, self.label, _caches()[1])

    def data_files(self) -> list[Path]:
        """The Arrow files the split is read from (its content, for cache keys and the model card)."""
        return [Path(f["filename"]) for f in self.dataset().cache_files]


@contextmanager
def offline():
    """Offline mode for `datasets` and `huggingface_hub`, whatever the environment said when they were imported."""
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _caches() -> tuple[str, str]:
    import datasets
    import huggingface_hub.constants as hub

    return str(hub.HF_HUB_CACHE), str(datasets.config.HF_DATASETS_CACHE)


def _snapshot(repo_id: str) -> Path | None:
    """The repository's files in the hub cache (its `main`), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        with offline():
            return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _prepared(repo_id: str) -> Path | None:
    """The dataset's directory in the datasets cache (Arrow tables `load_dataset` prepared), or None."""
    import datasets

    org, name = repo_id.split("/")
    folder = Path(_caches()[1]) / f"{org}___{datasets.naming.camelcase_to_snakecase(name)}"
    return folder if folder.is_dir() else None


def cached_names() -> list[str]:
    """The datasets the local caches hold, as `org/name` (for messages)."""
    hub_cache, datasets_cache = _caches()
    names = set()
    if Path(hub_cache).is_dir():
        names |= {p.name[len("datasets--"):].replace("--", "/", 1) for p in Path(hub_cache).glob("datasets--*--*")}
    if Path(datasets_cache).is_dir():
        names |= {p.name.replace("___", "/", 1) for p in Path(datasets_cache).glob("*___*") if p.is_dir()}
    return sorted(names)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def find(text: str) -> HubDataset:
    """The cached dataset `text` names (`org/name[:config][:split]`); a UserError of one line that says what the
    cache holds when it names none, or more than one, of its configs or splits."""
    return _find(text, *_caches())


@functools.lru_cache(maxsize=None)  # --data_path is resolved more than once a run; keyed by the caches too
def _find(text: str, hub_cache: str, datasets_cache: str) -> HubDataset:
    import datasets

    match = _NAME.match(text)
    repo_id, parts = match["repo"], [p for p in (match["a"], match["b"]) if p]
    snapshot = _snapshot(repo_id)
    where = snapshot or _prepared(repo_id)
    if where is None:
        held = ", ".join(cached_names()) or "no datasets"
        raise UserError(f"{text}: no such file or directory, and no dataset {repo_id} in the local Hugging Face cache "
                        f"({hub_cache}, {datasets_cache}; it holds {held}); qwen-tune never downloads: on a connected "
                        f"machine run python -c \"import datasets; datasets.load_dataset('{repo_id}')\" and copy its "
                        f"~/.cache/huggingface (or HF_HOME) here")
    source = str(snapshot) if snapshot else repo_id  # a snapshot is read as a local directory of the repo's files
    try:
        with offline():
            configs = datasets.get_dataset_config_names(source)
            config = parts[0] if len(parts) == 2 else _only(text, repo_id, "config", configs, "default")
            if config not in configs:
                how = f"{repo_id}:CONFIG:SPLIT" if len(configs) > 1 else f"{repo_id}:SPLIT (it has one config)"
                raise UserError(f"{text}: {repo_id} has no config {config!r} in the cache; its configs: "
                                f"{', '.join(configs)}; write {how}")
            splits = datasets.get_dataset_split_names(source, config)
    except UserError:
        raise
    except Exception as e:  # datasets raises many kinds for a damaged or partial cache
        raise UserError(f"{text}: the cached dataset {repo_id} ({where}) is not readable: {type(e).__name__}: {_one_line(e)}")
    split = parts[-1] if parts else _only(text, repo_id, "split", splits, "train")
    if split not in splits:
        named = f"{repo_id}:{config}" if len(configs) > 1 else repo_id
        raise UserError(f"{text}: {named} has no split {split!r} in the cache; its splits: {', '.join(splits)}; "
                        f"write {named}:SPLIT, e.g. {named}:{splits[0]}")
    label = ":".join([repo_id] + ([config] if len(configs) > 1 else []) + [split])
    return HubDataset(repo_id, config, split, source, label, where)


def _only(text: str, repo_id: str, kind: str, names: list[str], usual: str) -> str:
    """The config or split meant when none is named: the usual one (`default`, `train`) or the only one."""
    if usual in names or len(names) == 1:
        return usual if usual in names else names[0]
    example = f"{repo_id}:{names[0]}" + (":train" if kind == "config" else "")
    raise UserError(f"{text}: {repo_id} has several {kind}s in the cache ({', '.join(names)}) and none is "
                    f"\"{usual}\"; name one, e.g. {example}")


@functools.lru_cache(maxsize=None)
def _load(source: str, config: str, split: str, label: str, datasets_cache: str):
    """`datasets.load_dataset`, offline: a snapshot's files (turned into Arrow once, in the datasets cache), or the
    Arrow tables already prepared."""
    import datasets

    try:
        with offline():
            ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # datasets raises many kinds for a damaged or partial cache
        raise UserError(f"{label}: the cached dataset is not readable: {type(e).__name__}: {_one_line(e)}")
    log(f"data: {label} from the Hugging Face cache ({len(ds)} rows, {Path(ds.cache_files[0]['filename']).parent})")
    return ds
