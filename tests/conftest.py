import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One compute thread per test process (and the processes it starts): pytest-xdist runs one worker per core, and
    # two workers with a thread per core each would oversubscribe the cores (the tiny test models scale poorly anyway).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The suite's time budget on the CI machine (2 cores), enforced when CI is set: growth is seen the day it happens.
SUITE_BUDGET_S, TEST_BUDGET_S = 20 * 60, 90
_durations: dict[str, float] = {}
_started = time.monotonic()


@pytest.fixture(scope="session")
def tokenizer():
    from qwen_tune.models.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def qwen2_5_tokenizer(tokenizer):
    """Qwen2.5's tokenizer: the same ranks, without Qwen3's four later added tokens (<tool_response>, <think>, ...)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    official = json.loads((Path(__file__).parent / "golden" / "qwen2_5_added_tokens.json").read_text(encoding="utf-8"))
    official = official["added_tokens"] if isinstance(official, dict) else official
    keep = {t["content"] for t in official}
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in keep]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    assert len(tok) == 151665
    return tok


@pytest.fixture(scope="session")
def conversations(tokenizer):
    """The first three conversations of data/sft_example.json as sft encodes them (input_ids, labels, id)."""
    import copy

    from qwen_tune.data.chat_format import resolve_format
    from in_memory_sft import load_sft_dataset

    samples, _ = load_sft_dataset(os.path.join(os.path.dirname(__file__), "..", "data", "sft_example.json"),
                                  resolve_format(copy.copy(tokenizer)), 512)
    return [{"input_ids": s.input_ids, "labels": s.labels, "id": s.id} for s in samples[:3]]


@pytest.fixture(scope="session")
def base_model_path():
    from qwen_tune.models.model import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def chatml(tokenizer):
    """The embedded model's format: the seed's ChatML with 'You are a helpful assistant.' (on a copy of the tokenizer)."""
    import copy

    from qwen_tune.data.chat_format import resolve_format

    return resolve_format(copy.copy(tokenizer))


def pytest_runtest_logreport(report):
    """A test's time is its setup (the fixtures it builds first), call and teardown."""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    """Over budget with CI set: the run fails (it is reported in the terminal summary)."""
    if hasattr(session.config, "workerinput"):
        return
    total = time.monotonic() - _started
    over = sorted(((d, n) for n, d in _durations.items() if d > TEST_BUDGET_S), reverse=True)
    enforced = bool(os.environ.get("CI"))
    lines = [f"time budget: suite {total / 60:.1f} of {SUITE_BUDGET_S // 60} min, {len(over)} tests over {TEST_BUDGET_S} s "
             f"({'enforced: CI is set' if enforced else 'not enforced: CI is not set'})"]
    lines += [f"  {d:6.1f} s  {n}" for d, n in over]
    if enforced and (over or total > SUITE_BUDGET_S):
        lines.append("time budget exceeded: make the slowest tests above smaller (see the durations above)")
        if session.exitstatus == 0:
            session.exitstatus = 1
    session.config._qwen_tune_budget = lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in getattr(config, "_qwen_tune_budget", []):
        terminalreporter.write_line(line)
