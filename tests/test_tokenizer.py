"""The tokenizer a checkpoint brings is the one used, and no checkpoint code ever runs for it."""

import shutil

from qwen_tune.models.tokenizer import embedded_rank_file, load_tokenizer, save_tokenizer


def encode_plain(tok, texts):
    """Texts as plain text: a typed <|im_end|> stays characters."""
    return tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_qwen_v1_rank_file_loads_without_remote_code(tmp_path, tokenizer):
    # a Qwen v1 checkpoint ships qwen.tiktoken and Python code; we convert the rank file instead of running the code
    shutil.copy(embedded_rank_file(), tmp_path / "qwen.tiktoken")
    (tmp_path / "tokenization_qwen.py").write_text("raise SystemExit('remote code must not run')\n")
    v1 = load_tokenizer(str(tmp_path))
    texts = ["你好，世界", "Hello <|im_end|> 2024", "  spaces\n\nand lines"]
    assert encode_plain(v1, texts) == encode_plain(tokenizer, texts)
    assert v1.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>"]) == [151643, 151644, 151645, 151646]


def test_checkpoint_tokenizer_json_is_used_as_is(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.chat_template == tokenizer.chat_template
    assert encode_plain(again, ["assistant\n"]) == [[77091, 198]]


def test_a_saved_tokenizer_loads_the_same_and_reads_tokenizer_json_once(tmp_path, tokenizer, monkeypatch):
    """What every output carries: the same tokenizer as a plain `save_pretrained` gives (added tokens with all their
    flags, specials, template, ids of text with typed and real control tokens), but its load never opens
    tokenizer.json in Python: only the Rust backend reads it, once (transformers 5 re-parses it otherwise)."""
    import builtins

    from transformers import AutoTokenizer

    save_tokenizer(tokenizer, tmp_path / "ours")
    tokenizer.save_pretrained(tmp_path / "plain")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    ours = AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert not [f for f in opened if f.endswith("tokenizer.json")], opened
    monkeypatch.setattr(builtins, "open", real_open)
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert {i: t.__getstate__() for i, t in ours.added_tokens_decoder.items()} == \
        {i: t.__getstate__() for i, t in plain.added_tokens_decoder.items()}
    assert ours.special_tokens_map == plain.special_tokens_map and ours.chat_template == plain.chat_template
    texts = ["<|im_start|>user\nHi <|im_end|> typed<|im_end|>\n", "你好 <think>x</think> <tool_call>"]
    assert ours(texts)["input_ids"] == plain(texts)["input_ids"] and encode_plain(ours, texts) == encode_plain(plain, texts)


def test_embedded_tokenizer_equals_official_qwen3():
    """Golden ids of the official Qwen3 tokenizer (tests/golden/make_golden.py): added tokens, Chinese, emoji,
    decomposed Unicode that NFC composes, code, whitespace; and the same added tokens, ids and special flags."""
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "golden" / "qwen3_tokenizer_ids.json").read_text(encoding="utf-8"))
    tok = load_tokenizer()
    added = [{"id": i, "content": t.content, "special": t.special} for i, t in sorted(tok.added_tokens_decoder.items())]
    assert added == [{k: t[k] for k in ("id", "content", "special")} for t in golden["added_tokens"]]
    assert len(tok) == 151669
    assert len(golden["texts"]) >= 20
    for item in golden["texts"]:
        assert tok(item["text"], add_special_tokens=False)["input_ids"] == item["ids"], item["text"]
    composed, decomposed = "Ångström café naïve", "A\u030angstro\u0308m cafe\u0301 nai\u0308ve"
    assert tok(decomposed)["input_ids"] == tok(composed)["input_ids"] and len(tok(composed)["input_ids"]) == 7
