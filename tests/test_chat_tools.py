"""`qwen-tune chat --tools FILE`: the functions reach the model as the template renders a conversation's tools in
training, and the tool calls of a reply come back as JSON, in both of Qwen's call formats (Hermes JSON, Qwen3.5+ XML)."""

from __future__ import annotations

import copy
import json

import pytest

from helpers import run_cli
from qwen_tune.data.chat_format import resolve_format
from qwen_tune.data.templates import official_templates
from qwen_tune.data.read import load_tools
from qwen_tune.data.replies import ReplyParser
from qwen_tune.tools.chat import Chat, tool_call_lines

WEATHER = {"name": "get_weather", "description": "The weather of a city, for some days.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
# what each format's model writes for get_weather(city="Paris", days=3), after the generation prompt
HERMES = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
XML = ("</think>\n\nLet me look.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
       "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("template", ["qwen3", "qwen3_8"])
def test_the_prompt_holds_the_tools_file_token_for_token_as_the_template_renders_them(template, tokenizer, tmp_path):
    """Both file forms (OpenAI's wrapped list, bare functions one a line) give the ids of apply_chat_template(tools=...)."""
    fmt = resolve_format(copy.copy(tokenizer), chat_template=template)
    expected = fmt.tokenizer.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True, tokenize=True)["input_ids"]
    wrapped = write(tmp_path / "tools.json", json.dumps(TOOLS, indent=2))
    bare = write(tmp_path / "tools.jsonl", "".join(json.dumps(t["function"]) + "\n" for t in TOOLS))
    for path in (wrapped, bare):
        chat = Chat(None, fmt.tokenizer, fmt, max_new_tokens=8, temperature=0.0, tools=load_tools(path))
        chat.messages = list(ASK)
        assert chat.prompt_ids() == expected, path
    assert WEATHER["description"] in fmt.tokenizer.decode(expected)  # the tools are in it, not dropped


@pytest.mark.parametrize("template, reply", [("qwen3", HERMES), ("qwen3_8", XML),
                                             ("own revision of qwen3", HERMES), ("own revision of qwen3_8", XML)])
def test_a_replys_tool_call_is_read_back_and_shown_as_json(template, reply, tokenizer):
    """The official templates (TRL's parsers) and a checkpoint's own revision of one (parsed by the way it writes calls)."""
    name = template.split()[-1]
    text = official_templates()[name].read_text(encoding="utf-8")
    fmt = resolve_format(copy.copy(tokenizer), chat_template=name)
    if template != name:
        fmt.template = fmt.tokenizer.chat_template = text + "\n{#- a checkpoint's own revision #}"
    prompt = fmt.render(ASK, TOOLS, add_generation_prompt=True)
    message, why = ReplyParser(fmt).parse(reply, prompt, TOOLS)
    assert why is None and message["content"] == "Let me look."
    assert tool_call_lines(message) == [CALL_JSON]  # days=3 an integer, as the tool's schema says
    rendered = fmt.render(ASK + [message], TOOLS)  # the call goes back into the conversation as the template writes it
    assert rendered.startswith(prompt) and ("<function=get_weather>" if "<function=" in reply else CALL_JSON) in rendered


def test_an_unreadable_tool_call_is_kept_as_text_with_the_reason(tokenizer):
    fmt = resolve_format(copy.copy(tokenizer), chat_template="qwen3")
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
    message, why = ReplyParser(fmt).parse(broken, fmt.render(ASK, TOOLS, add_generation_prompt=True), TOOLS)
    assert message == {"role": "assistant", "content": broken} and "JSON" in why and "\n" not in why


def test_chat_tools_on_the_command_line(tmp_path):
    """The CLI path on the embedded model (its reply is noise: the output is one JSON message); a bad tools file is
    named line by line before the model loads, and a template with no place for tools is refused."""
    tools = write(tmp_path / "tools.json", json.dumps(TOOLS))
    proc = run_cli("chat", "--tools", tools, "--chat_template", "qwen3_8", "--prompt", "Weather in Paris?",
                   "--max_new_tokens", "4")
    message = json.loads(proc.stdout)
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    bad = write(tmp_path / "bad.json", '[\n  {"name": "get_time"},\n  {"name": "get_time"},\n  {"type": "function"}\n]')
    proc = run_cli("chat", "--tools", bad, "--prompt", "hi", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f'{bad}:3: tools[1] is a second function named "get_time" (the first is at line 2)' in proc.stderr
    assert f'{bad}:4: tools[2] is {{"type": "function"}}; expected {{"type": "function", "function": {{"name"' in proc.stderr
    proc = run_cli("chat", "--tools", tools, "--prompt", "hi", check=False)  # the embedded model's ChatML has no tools
    assert proc.returncode == 2 and "has a tools list, but the chat template (the seed's ChatML) has no place" in proc.stderr
