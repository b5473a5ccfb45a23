"""Data loading: formats, normalisation, and every validation problem named by file and line."""

import json
from pathlib import Path

import pytest

from qwen_tune.data.read import (
    PREFERENCE_FORMAT,
    PROMPT_FORMAT,
    SFT_FORMAT,
    Conversation,
    detect_kind,
    load_conversations,
    load_preference_pairs,
    load_prompts,
    resolve_files,
)
from qwen_tune.errors import DataError, UserError

DATA = Path(__file__).resolve().parent.parent / "data"
GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems(loader, path, **kw) -> list[str]:
    with pytest.raises(DataError) as info:
        loader(path, **kw)
    return info.value.problems


def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


# ---------------------------------------------------------------- shipped examples


def test_shipped_sft_formats_agree():
    seed = load_conversations(DATA / "sft_example.json")
    openai = load_conversations(DATA / "sft_example.jsonl")
    assert len(seed) >= 10
    assert [c.id for c in seed] == [c.id for c in openai]
    assert [c.messages for c in seed] == [c.messages for c in openai]
    assert any(c.messages[0]["role"] == "system" for c in seed)
    assert any(sum(m["role"] == "assistant" for m in c.messages) >= 2 for c in seed)
    assert all({m["role"] for m in c.messages} <= {"system", "user", "assistant"} for c in seed)
    # sources point at the line where each sample starts
    lines = (DATA / "sft_example.json").read_text(encoding="utf-8").split("\n")
    for c in seed:
        line = int(c.source.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{" and f'"id": "{c.id}"' in lines[line]
    assert [c.source for c in openai] == [f"{DATA / 'sft_example.jsonl'}:{i}" for i in range(1, len(openai) + 1)]


def test_shipped_preference_formats_agree():
    qwen = load_preference_pairs(DATA / "preference_example.json")
    trl = load_preference_pairs(DATA / "preference_example.jsonl")
    assert len(qwen) >= 8
    as_tuple = lambda p: (p.id, p.prompt, p.chosen, p.rejected)
    assert [as_tuple(p) for p in qwen] == [as_tuple(p) for p in trl]
    for p in qwen:
        assert p.source.startswith(str(DATA / "preference_example.json") + ":") and p.tools is None
        assert p.prompt[-1]["role"] == "user"
        assert [m["role"] for m in p.chosen] == ["assistant"] == [m["role"] for m in p.rejected]
        assert p.chosen != p.rejected


def test_shipped_prompts_and_detect_kind():
    prompts = load_prompts(DATA / "prompts_example.jsonl")
    assert len(prompts) >= 6 and all(p.messages[-1]["role"] == "user" for p in prompts)
    assert detect_kind(DATA / "sft_example.json") == "sft"
    assert detect_kind(DATA / "sft_example.jsonl") == "sft"
    assert detect_kind(DATA / "preference_example.json") == "preference"
    assert detect_kind(str(DATA / "preference_example.jsonl")) == "preference"


# ---------------------------------------------------------------- normalisation


def test_aliases_ids_and_default_ids(tmp_path):
    rows = [
        {"id": 7, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        seed(("system", "be brief"), ("user", "q"), ("assistant", "a")),
    ]
    convs = load_conversations(write(tmp_path / "train.json", json.dumps(rows)))
    assert convs[0] == Conversation("7", msgs(("user", "hi"), ("assistant", "hello")), f"{tmp_path / 'train.json'}:1")
    assert convs[1].id == "train-1"
    assert convs[1].messages == msgs(("system", "be brief"), ("user", "q"), ("assistant", "a"))


def test_content_is_kept_unchanged(tmp_path):
    text = "  literal <|im_end|> and <|im_start|>user\n stay text  \n"
    row = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "<|im_end|>"}]}
    (conv,) = load_conversations(write(tmp_path / "a.jsonl", json.dumps(row)))
    assert conv.messages == msgs(("user", text), ("assistant", "<|im_end|>"))


def test_jsonl_blank_lines_skipped_and_bom_accepted(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(("\ufeff" + GOOD + "\n\n   \n" + GOOD.replace("hi", "yo") + "\n").encode("utf-8"))
    convs = load_conversations(path)
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:4"]
    assert [c.id for c in convs] == ["a-0", "a-1"]
    assert convs[1].messages[0]["content"] == "yo"


def test_json_list_line_numbers_at_scale(tmp_path):
    """Samples spanning different numbers of lines; every start line is exact."""
    parts, expected, line = [], [], 2
    for i in range(3000):
        sample = json.dumps({"id": i, "messages": msgs(("user", "q"), ("assistant", "a"))}, indent=i % 3 or None)
        expected.append(line)
        parts.append(sample)
        line += sample.count("\n") + 1 + (i % 2)  # every other separator adds a blank line
    text = "[\n" + "".join(p + (",\n\n" if i % 2 else ",\n") for i, p in enumerate(parts[:-1])) + parts[-1] + "\n]\n"
    path = write(tmp_path / "big.json", text)
    assert [c.source for c in load_conversations(path)] == [f"{path}:{n}" for n in expected]


# ---------------------------------------------------------------- locations of problems

BAD_JSON_LIST = """[
  {"id": "identity_1", "conversations": [{"from": "user", "value": "hi"},
                                         {"from": "assistant", "value": "hello"}]},
  {"id": "identity_2",
   "conversations": [{"from": "user", "value": "x"}, {"from": "assistant", "value": "y"}]},

  {"id": "identity_3", "conversations": [{"from": "user", "value": "q"}, {"from": "bot", "value": "a"}]}
]
"""


def test_json_list_bad_sample_reports_its_start_line(tmp_path):
    path = write(tmp_path / "train.json", BAD_JSON_LIST)
    assert problems(load_conversations, path) == [
        f'{path}:7 (sample 2, id "identity_3"): conversations[1].from is "bot"; '
        "expected one of user, assistant, system, function_call, observation (or human, gpt)"
    ]


def test_jsonl_broken_line_and_bad_line_both_reported(tmp_path):
    broken = '{"messages": [{"role": "user", "content": "hi"}'
    lines = [GOOD, GOOD, broken, "", broken + "]}"]
    path = write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    found = problems(load_conversations, path)
    assert len(found) == 2
    assert found[0].startswith(f"{path}:3: invalid JSON: ")
    assert found[1] == f"{path}:5: no assistant turn, so nothing to learn from; SFT data needs at least one"


def test_json_syntax_error_reports_its_line(tmp_path):
    path = write(tmp_path / "train.json", '[\n  {"messages": []},\n  {"messages": [}\n]\n')
    (found,) = problems(load_conversations, path)
    assert found.startswith(f"{path}:3: invalid JSON: ") and "column 17" in found


def test_jsonl_content_in_json_file_gets_a_hint(tmp_path):
    path = write(tmp_path / "train.json", GOOD + "\n" + GOOD + "\n")
    (found,) = problems(load_conversations, path)
    assert found.startswith(f"{path}:2: invalid JSON: a second object after the first") and "name the file .jsonl" in found


@pytest.mark.parametrize("name, text, says", [
    ("trailing.json", '[\n  {"messages": []},\n  {"messages": []},\n]\n',
     "trailing.json:3: invalid JSON: a trailing comma at column 19, before ']' (JSON allows none: remove it)"),
    ("object.jsonl", '{"messages": [], "id": "a",}\n',
     "object.jsonl:1: invalid JSON: a trailing comma at column 27, before '}' (JSON allows none: remove it)"),
    ("quotes.json", "[\n  {'messages': []}\n]\n",
     "quotes.json:2: invalid JSON: a single quote at column 4; JSON strings and keys take double quotes (\")"),
    ("python.jsonl", '{"messages": [], "ok": True}\n', "python.jsonl:1: invalid JSON: True at column 24 is Python; JSON writes true"),
])
def test_common_json_mistakes_are_named_where_they_are(name, text, says, tmp_path):
    path = write(tmp_path / name, text)
    (found,) = problems(load_conversations, path)
    assert found == f"{tmp_path}/{says}"


def test_top_level_not_a_list(tmp_path):
    path = write(tmp_path / "train.json", "\n" + GOOD)
    (found,) = problems(load_conversations, path)
    assert found.startswith(f"{path}:2: top level is {{") and "expected a list of samples" in found


@pytest.mark.parametrize("name,text", [("e.json", ""), ("e.jsonl", "\n  \n"), ("e.json", "[]"), ("e.json", " [ ] ")])
def test_empty_files(tmp_path, name, text):
    path = write(tmp_path / name, text)
    (found,) = problems(load_conversations, path)
    assert found.startswith(f"{path}:1: ") and "empty" in found and "no samples" in found


def test_invalid_utf8_is_a_problem_not_a_traceback(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    (found,) = problems(load_conversations, path)
    assert found.startswith(f"{path}:2: not valid UTF-8")


def turns(*pairs):
    return {"messages": msgs(*pairs)}


def seed(*pairs):
    return {"conversations": [{"from": r, "value": c} for r, c in pairs]}


QA = (("user", "q"), ("assistant", "a"))
SFT_CASES = [
    ([1, 2], f"sample is [1, 2], not an object; {SFT_FORMAT}"),
    ({"id": "x", "text": "hi"}, f'missing "conversations" or "messages"; {SFT_FORMAT}'),
    ({"conversations": "hi"}, 'conversations is "hi"; expected a non-empty list of turns'),
    ({"conversations": []}, "conversations is []; expected a non-empty list of turns"),
    (
        {"conversations": ["hi", {"from": "gpt", "value": "a"}]},
        'conversations[0] is "hi"; expected an object like {"from": "user", "value": "..."}',
    ),
    (
        {"conversations": [{"role": "user", "value": "q"}, {"from": "gpt", "value": "a"}]},
        'conversations[0] has no "from"; expected an object like {"from": "user", "value": "..."}',
    ),
    (
        seed(("user", "q"), ("bot", "a")),
        'conversations[1].from is "bot"; expected one of user, assistant, system, function_call, observation (or human, gpt)',
    ),
    (turns(("user", "q"), ("gpt", "a")), 'messages[1].role is "gpt"; expected one of user, assistant, system'),
    (turns(("user", "q"), ("assistant", 5)), "messages[1].content is 5; expected a string"),
    (turns(("user", "q"), ("assistant", None)), "messages[1].content is null; expected a string"),
    (turns(("user", " \n\t"), ("assistant", "a")), "messages[0].content is empty"),
    (turns(("user", "q")), "no assistant turn, so nothing to learn from; SFT data needs at least one"),
    (
        turns(("user", "q"), ("system", "s"), ("assistant", "a")),
        "messages[1] is a system turn; the system turn must be the first turn",
    ),
    (
        turns(("system", "s"), ("system", "t"), *QA),
        "messages[1] is a second system turn; only one is allowed, as the first turn",
    ),
    ({**turns(*QA), "conversations": []}, 'has both "conversations" and "messages"; use one'),
    ({"id": [1], **turns(*QA)}, "id is [1]; expected a non-empty string or an integer"),
    (
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        f'this is a preference pair (it has "chosen"/"rejected"); {SFT_FORMAT}',
    ),
    ({**seed(("user", "q")), "chosen": "a", "rejected": "b"}, "this is a preference pair"),
]


@pytest.mark.parametrize("record,message", SFT_CASES)
def test_sft_record_problems(tmp_path, record, message):
    """Each bad record sits on line 2 after a good one; exactly one problem, located and explained."""
    path = write(tmp_path / "train.jsonl", GOOD + "\n" + json.dumps(record) + "\n")
    (found,) = problems(load_conversations, path)
    assert found.startswith((f"{path}:2: ", f'{path}:2 (id "x"): '))
    assert message in found


def test_several_problems_in_one_sample_all_reported(tmp_path):
    record = {"id": "s1", "conversations": [{"from": "bot", "value": 1}, {"from": "user", "value": ""}]}
    path = write(tmp_path / "t.json", json.dumps([record]))
    assert problems(load_conversations, path) == [
        f'{path}:1 (sample 0, id "s1"): conversations[0].from is "bot"; expected one of user, assistant, system, function_call, observation (or human, gpt)',
        f'{path}:1 (sample 0, id "s1"): conversations[0].value is 1; expected a string',
        f'{path}:1 (sample 0, id "s1"): conversations[1].value is empty',
    ]


def test_duplicate_ids_name_both_locations(tmp_path):
    a = write(tmp_path / "a.jsonl", '{"id": "x", ' + GOOD[1:] + "\n")
    b = write(tmp_path / "b.jsonl", GOOD + "\n" + '{"id": "x", ' + GOOD[1:] + "\n")
    assert problems(load_conversations, [a, b]) == [f'{b}:2 (id "x"): duplicate id "x" (first at {a}:1)']


def test_max_problems_limits_the_list_not_the_count(tmp_path):
    path = write(tmp_path / "bad.jsonl", "\n".join(["{not json"] * 30) + "\n")
    other = write(tmp_path / "other.json", "{}")
    with pytest.raises(DataError) as info:
        load_conversations([path, other], max_problems=5)
    assert len(info.value.problems) == 5 and info.value.total == 31
    assert all(p.startswith(f"{path}:{i}: invalid JSON") for i, p in enumerate(info.value.problems, 1))
    assert "... and 26 more" in str(info.value)


# ---------------------------------------------------------------- resolving inputs


def test_directory_comma_and_list_inputs(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    b = write(d / "b.jsonl", '{"id": "b", ' + GOOD[1:] + "\n")
    a = write(d / "a.json", json.dumps([{"id": "a", **turns(("user", "q"), ("assistant", "r"))}]))
    write(d / "notes.txt", "ignored")
    write(d / "sub" / "c.jsonl", "ignored: not recursive")
    c = write(tmp_path / "c.jsonl", '{"id": "c", ' + GOOD[1:] + "\n")
    assert resolve_files(str(d)) == [Path(a), Path(b)]
    assert [x.id for x in load_conversations(str(d))] == ["a", "b"]
    assert [x.id for x in load_conversations(f"{c}, {d}")] == ["c", "a", "b"]
    assert [x.id for x in load_conversations([f"{a},{c}", Path(b)])] == ["a", "c", "b"]


def test_resolve_errors(tmp_path):
    with pytest.raises(UserError, match="nope.json"):
        resolve_files(f"{DATA / 'sft_example.json'},{tmp_path / 'nope.json'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no data files in directory"):
        resolve_files(tmp_path / "empty")
    with pytest.raises(UserError, match=r"unsupported data file type; expected \.json .*\.parquet, \.arrow"):
        resolve_files(write(tmp_path / "x.txt", "a,b"))
    with pytest.raises(UserError, match="no data files"):
        resolve_files([])


# ---------------------------------------------------------------- prompts (PPO)


def test_load_prompts(tmp_path):
    rows = [
        turns(("system", "s"), ("user", "q")),
        seed(("human", "a"), ("gpt", "b"), ("human", "c")),
        {"prompt": "just text"},
    ]
    prompts = load_prompts(write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, rows))))
    assert [p.messages for p in prompts] == [
        msgs(("system", "s"), ("user", "q")),
        msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
        msgs(("user", "just text")),
    ]
    bad = write(tmp_path / "bad.jsonl", GOOD + "\n" + '{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    assert problems(load_prompts, bad) == [
        f"{bad}:1: messages ends with an assistant turn; a prompt must end with a user turn (or a tool result)",
        f'{bad}:2: this is a preference pair (it has "chosen"/"rejected"); {PROMPT_FORMAT}',
    ]


# ---------------------------------------------------------------- preference pairs


def test_preference_string_forms_equal_message_forms(tmp_path):
    as_text = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    as_msgs = {"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "good"))}
    as_msgs["rejected"] = msgs(("assistant", "bad"))
    as_seed = {**seed(("human", "q")), "chosen": "good", "rejected": "bad"}
    want = (msgs(("user", "q")), msgs(("assistant", "good")), msgs(("assistant", "bad")))
    for i, record in enumerate([as_text, as_msgs, as_seed]):
        (pair,) = load_preference_pairs(write(tmp_path / f"p{i}.jsonl", json.dumps(record)))
        assert (pair.id, pair.prompt, pair.chosen, pair.rejected) == (f"p{i}-0", *want)


PAIR_CASES = [
    (json.loads(GOOD), f'missing "chosen" and "rejected" (this looks like SFT data); {PREFERENCE_FORMAT}'),
    ({"prompt": "q", "chosen": "a"}, f'missing "rejected"; {PREFERENCE_FORMAT}'),
    ({"chosen": "a", "rejected": "b"}, f'missing "prompt" or "conversations" or "messages"; {PREFERENCE_FORMAT}'),
    (
        {"prompt": msgs(*QA), "chosen": "a", "rejected": "b"},
        "prompt ends with an assistant turn; a prompt must end with a user turn (or a tool result)",
    ),
    ({**seed(("user", "q"), ("gpt", "a")), "chosen": "a", "rejected": "b"}, "conversations ends with an assistant turn"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "chosen is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": []}, "rejected is []; expected a non-empty list of turns"),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen is 5; expected a string or a list of assistant messages"),
    (
        {"prompt": "q", "chosen": "a", "rejected": msgs(("user", "b"))},
        "rejected[0] is a user turn; rejected must hold assistant messages only",
    ),
    ({"prompt": "q", "chosen": msgs(("assistant", "")), "rejected": "b"}, "chosen[0].content is empty"),
]


@pytest.mark.parametrize("record,message", PAIR_CASES)
def test_preference_record_problems(tmp_path, record, message):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    path = write(tmp_path / "pairs.jsonl", good + "\n\n" + json.dumps(record) + "\n")
    (found,) = problems(load_preference_pairs, path)
    assert found.startswith(f"{path}:3: ")
    assert message in found


def test_detect_kind_on_broken_file(tmp_path):
    with pytest.raises(DataError, match="invalid JSON"):
        detect_kind(write(tmp_path / "x.json", "[{"))


# ---------------------------------------------------------------- --val_size


def test_val_size_holds_out_a_reproducible_fraction_or_count_and_names_it():
    from types import SimpleNamespace

    from qwen_tune.data.splits import hold_out

    samples = [SimpleNamespace(id=f"s{i}") for i in range(20)]
    train, held, split = hold_out(samples, 0.25, seed=42)
    assert len(held) == 5 and len(train) == 15 and {s.id for s in train} | {s.id for s in held} == {s.id for s in samples}
    assert split.ids == [s.id for s in held] and "5 of 20 training samples held out" in split.summary("eval")
    assert hold_out(samples, 0.25, seed=42)[2].ids == split.ids  # the same seed, the same split
    assert hold_out(samples, 0.25, seed=7)[2].ids != split.ids
    assert len(hold_out(samples, 3, seed=42)[1]) == 3 and len(hold_out(samples, 0.01, seed=42)[1]) == 1  # a count; at least one


@pytest.mark.parametrize("val_size,message", [(20, "would hold out 20 of the 20"), (2.5, "expected a fraction"), (-0.1, "expected a fraction")])
def test_val_size_that_leaves_nothing_or_is_not_a_size_is_an_error(val_size, message):
    from qwen_tune.data.splits import hold_out

    from types import SimpleNamespace

    with pytest.raises(UserError, match=message):
        hold_out([SimpleNamespace(id=f"s{i}") for i in range(20)], val_size, seed=42)


def test_val_size_counts_distinct_samples_evaluates_each_once_and_takes_all_its_copies_out_of_training():
    """A weighted mixture repeats samples as ID#2, ID#3: --val_size 3 is 3 distinct samples, evaluated once each, and
    training sees no copy of them."""
    from types import SimpleNamespace

    from qwen_tune.data.splits import hold_out

    ids = [f"s{i}" for i in range(10)] + [f"s{i}#2" for i in range(10)] + ["s0#3", "x#2"]  # "x#2": an id of its own
    samples = [SimpleNamespace(id=i) for i in ids]
    for seed in range(5):
        train, held, split = hold_out(samples, 3, seed=seed)
        original = lambda sid: sid.split("#")[0] if sid != "x#2" else sid  # noqa: E731
        assert {original(s.id) for s in train}.isdisjoint({original(s.id) for s in held})
        assert len(held) == len({original(s.id) for s in held}) == 3 and split.ids == [s.id for s in held]
        assert split.of == 11 and split.copies == sum(original(s.id) in split.ids for s in samples) - 3
        assert len(train) + len(held) + split.copies == len(samples)
        assert "3 of 11 distinct training samples held out" in split.summary()


def test_val_size_on_preference_pairs_splits_the_dataset(chatml):
    from qwen_tune.data.pairs import encode_pairs
    from qwen_tune.data.splits import hold_out

    pairs, _ = encode_pairs(str(DATA / "preference_example.jsonl"), chatml, 512)
    train, held, split = hold_out(pairs, 2, seed=1)
    assert len(held) == 2 and len(train) == len(pairs) - 2 and set(split.ids) == set(held["id"]) and not set(split.ids) & set(train["id"])
