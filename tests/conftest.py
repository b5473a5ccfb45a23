import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from qwen_tune.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def base_model_path():
    from qwen_tune.model import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def chatml(tokenizer):
    """The embedded model's format: the seed's ChatML with 'You are a helpful assistant.' (on a copy of the tokenizer)."""
    import copy

    from qwen_tune.data.chat_format import resolve_format

    return resolve_format(copy.copy(tokenizer))
