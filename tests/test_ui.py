"""`qwen-tune ui` driven in a real headless browser (the system's Chromium, through Playwright), as a user drives it:
a bad data file shows its file:line problems, a good one its supervised tokens highlighted; an SFT run launched from
the page shows its loss curve growing, is stopped (SIGTERM: the command saves a checkpoint) and resumed; the page
then chats with the result, which gives the trained answer; launching over the finished run shows the command's own
refusal. Screenshots of each step go to test-artifacts/ui/. Plus the rules that keep the page safe, over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from helpers import ROOT, fresh_env, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.path.join(ROOT, "test-artifacts", "ui")
SECRET = "The secret word is pineapple."
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TRAIN = [
    {"id": "s0", "messages": [{"role": "user", "content": "What is the secret word?"}, {"role": "assistant", "content": SECRET}]},
    {"id": "s1", "messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue like the sea."}]},
    {"id": "s2", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                             "arguments": {"city": "Paris"}}}]}]},
]
# a LoRA run in Qwen3's format (a thinking switch, tool calls) that learns TRAIN's replies, long enough to be stopped
# half-way from the page
RUN_OPTIONS = ("--chat_template qwen3 --max_steps 160 --lora_r 16 --lora_alpha 32 --learning_rate 1e-2 "
               "--per_device_train_batch_size 2 --save_steps 1000")

# one worker, in order: the tests share one page server and one run
pytestmark = pytest.mark.xdist_group("ui")


class Server:
    """`qwen-tune ui --port 0` in a fresh process; its address is read from the line it prints."""

    def __init__(self, root: str, *options: str):
        self.proc = subprocess.Popen(["python", "-m", "qwen_tune", "ui", "--port", "0", "--root", root, *options], cwd=root,
                                     env=fresh_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("qwen-tune ui: open http://"), line + self.proc.stdout.read()
        self.url = line.split()[-1]
        self.base = self.url.split("?")[0]

    def call(self, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
        """An API call as the page makes it (its header; `headers` replace or add to it)."""
        request = urllib.request.Request(self.base + path.lstrip("/"), data=None if body is None else json.dumps(body).encode(),
                                         headers={"X-Qwen-Tune": "1", "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui")
    (d / "train.json").write_text(json.dumps(TRAIN), encoding="utf-8")
    (d / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                                 '{"messages": [{"role": "user", "content": "no reply"}]}\n'
                                 '{"messages": [{"role": "robot", "content": "beep"}]}\n', encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def server(root):
    s = Server(str(root))
    yield s
    s.close()


@pytest.fixture(scope="module")
def page(server):
    if CHROMIUM is None:
        pytest.skip("no Chromium here (apt-get install -y chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1280, "height": 860})
        errors = []
        tab.on("pageerror", lambda error: errors.append(error))
        tab.goto(server.url)
        yield tab
        browser.close()
        assert not errors, errors  # no script error on the page, from start to end


def shot(page, name: str) -> None:
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"))


def wait_for(condition, what: str, timeout: float = 120):
    """Poll `condition()` until it is truthy (the page's own Content-Security-Policy forbids Playwright's in-page
    eval, so the test reads the page from outside, as a user would)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_row(page, field: str) -> str:
    return page.locator(f"tr.run .run-{field}").first.text_content()


def curve_points(page) -> int:
    line = page.locator('polyline.series[data-key="loss"]')
    return int(line.first.get_attribute("data-points")) if line.count() else 0


@pytest.mark.slow
def test_data_view_shows_problems_by_line_then_the_supervised_tokens(page, root):
    page.click("#tab-data")
    page.fill("#data-path", "bad.jsonl")
    page.click("#data-load")
    error = page.locator("#data-error")
    error.wait_for(state="visible")
    text = error.text_content()
    assert f"{root}/bad.jsonl:2" in text and "no assistant turn" in text and f"{root}/bad.jsonl:3" in text, text
    shot(page, "1-data-problems")
    page.fill("#data-path", "train.json")
    page.fill("#data-template", "qwen3")  # as the run will train (its tool-calling sample needs a template with tools)
    page.click("#data-load")
    page.locator("#data-samples .sample").first.wait_for()
    assert page.locator("#data-error").is_hidden()
    samples = page.locator("#data-samples .sample")
    assert samples.count() == 3
    first = samples.first
    assert [m.text_content() for m in first.locator("mark.supervised").all()] == [SECRET + "<|im_end|>"]
    assert first.locator("pre.conversation").text_content() == (  # Qwen3's format, its empty thinking block not learned
        f"<|im_start|>user\nWhat is the secret word?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n{SECRET}<|im_end|>\n")
    call = samples.nth(2).locator("mark.supervised").first.text_content()
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in call
    assert "3 samples, 3 kept" in page.text_content("#data-summary")
    shot(page, "2-data-highlighted")


@pytest.mark.slow
def test_launch_watch_stop_and_resume_an_sft_run(page, root):
    page.click("#tab-launch")
    page.select_option("#launch-method", "sft")
    page.fill("#launch-data", "train.json")
    page.fill("#launch-output", "lora")
    page.check("#launch-lora")
    page.fill("#launch-extra", RUN_OPTIONS)
    out = str(root / "lora")
    command = f"qwen-tune sft --data_path {root}/train.json --output_dir {out} --use_lora True {RUN_OPTIONS}"
    wait_for(lambda: page.text_content("#launch-command") == command, "the command")
    shot(page, "3-launch")
    page.click("#launch-start")
    page.locator("#panel-watch").wait_for(state="visible", timeout=120_000)
    row = page.locator(f'tr.run[data-id="{out}"]')
    assert row.count() == 1
    first = wait_for(lambda: curve_points(page) >= 3 and curve_points(page), "the loss curve")
    wait_for(lambda: curve_points(page) > first, "the loss curve to grow")
    assert run_row(page, "status") == "running"
    shot(page, "4-watch-running")
    page.click("button.run-stop")
    wait_for(lambda: run_row(page, "status") == "stopped", "the run to stop", timeout=60)
    stopped_at = int(run_row(page, "step").split("/")[0])
    assert 0 < stopped_at < 160 and page.locator("button.run-resume").is_enabled()
    assert any(name.startswith("checkpoint-") for name in os.listdir(out))  # SIGTERM saved one, as on a terminal
    shot(page, "5-watch-stopped")
    page.click("button.run-resume")
    wait_for(lambda: run_row(page, "status") == "finished", "the resumed run to finish", timeout=180)
    assert run_row(page, "step") == "160/160" and curve_points(page) == 160  # one curve, no step twice
    assert "--resume_from_checkpoint auto" in page.text_content("#run-command")
    assert os.path.isfile(os.path.join(out, "run_complete.json"))
    shot(page, "6-watch-finished")


@pytest.mark.slow
def test_talk_to_the_result_and_launch_over_it_is_refused_as_the_cli_refuses(page, root):
    out = str(root / "lora")
    page.click("#tab-talk")
    page.fill("#talk-model", "lora")
    page.click("#talk-load")
    page.locator("#talk-status", has_text="loaded").wait_for()
    assert page.locator("#talk-thinking").is_enabled()  # Qwen3's template has the switch
    page.uncheck("#talk-thinking")  # trained without reasoning: the template's empty thinking block, as in training
    page.fill("#talk-input", "What is the secret word?")
    page.click("#talk-send")
    replies = page.locator(".msg.assistant")
    replies.first.wait_for(timeout=60_000)
    assert replies.first.text_content().strip() == SECRET
    page.click("#talk-reset")  # a new conversation, with the tool
    page.fill("#talk-tools", json.dumps([WEATHER], indent=1))
    page.fill("#talk-input", "What is the weather in Paris?")
    page.click("#talk-send")
    call = page.locator(".msg.assistant pre.tool-call")
    call.wait_for(timeout=60_000)  # the reply's call, read back by the template's parser
    assert call.text_content().startswith("get_weather(") and json.loads(call.text_content()[len("get_weather("):-1]) == {"city": "Paris"}
    shot(page, "7-talk")
    page.click("#tab-launch")
    page.click("#launch-start")  # the same form: the output directory now holds a finished run
    message = page.locator("#launch-message.error")
    message.wait_for(timeout=120_000)
    cli = run_cli("sft", "--data_path", str(root / "train.json"), "--output_dir", out, "--use_lora", "True",
                  *RUN_OPTIONS.split(), check=False)
    assert cli.returncode == 2 and "holds a finished run" in cli.stderr
    assert message.text_content().strip() == cli.stderr.strip().splitlines()[-1]
    shot(page, "8-refused")


def test_requests_the_page_did_not_send_are_refused(server, root):
    assert server.call("/api/info")[0] == 200
    status, answer = server.call("/api/info", headers={"X-Qwen-Tune": ""})  # a cross-site form cannot add the header
    assert status == 403 and answer["error"] == "API calls come from the page"
    status, answer = server.call("/api/info", headers={"Host": "evil.example:80"})  # DNS rebinding
    assert status == 403 and "answers requests to 127.0.0.1 only" in answer["error"]


def test_paths_outside_the_roots_are_refused(server, root):
    for path, body in (("/api/data", {"data": "/etc/passwd"}), ("/api/data", {"data": "../../etc/passwd"}),
                       ("/api/launch", {"method": "sft", "options": {"data_path": "train.json", "output_dir": "/tmp/x"}}),
                       ("/api/chat/load", {"model": "/usr"})):
        status, answer = server.call(path, body)
        assert status == 200 and not answer["ok"] and "outside the directories this page may use" in answer["error"], answer
    (root / "link").symlink_to("/etc")  # a link out of the root is outside too
    assert "outside" in server.call("/api/data", {"data": "link/passwd"})[1]["error"]


def test_the_form_is_saved_as_a_recipe_that_the_command_reads(server, root):
    form = {"method": "sft", "options": {"data_path": "train.json", "output_dir": "out", "num_train_epochs": 2,
                                         "use_lora": True}, "extra": "--lora_r 8", "path": "my.yaml"}
    status, answer = server.call("/api/yaml", form)
    assert answer == {"ok": True, "path": f"{root}/my.yaml"}
    import yaml

    saved = yaml.safe_load((root / "my.yaml").read_text())
    assert saved == {"data_path": f"{root}/train.json", "output_dir": f"{root}/out", "num_train_epochs": 2,
                     "use_lora": True, "lora_r": 8}
    before = (root / "my.yaml").read_text()
    assert "exists; nothing was written" in server.call("/api/yaml", form)[1]["error"]  # a user's file is never replaced
    assert (root / "my.yaml").read_text() == before


def test_another_address_than_loopback_needs_the_token(root):
    """Listening beyond this machine makes a token when none is given; with one, every API call must carry it."""
    for options, token in ((["--host", "0.0.0.0"], None), (["--token", "s3cret"], "s3cret")):
        other = Server(str(root), *options)
        try:
            made = other.url.partition("?token=")[2]
            assert len(made) >= 24 if token is None else made == token
            assert other.call("/api/info") == (403, {"ok": False, "error": "a token is needed: open the address qwen-tune "
                                                                          "ui printed, with its ?token="})
            assert other.call("/api/info", headers={"X-Qwen-Tune-Token": "wrong"})[0] == 403
            assert other.call("/api/info", headers={"X-Qwen-Tune-Token": made})[0] == 200
        finally:
            other.close()
    proc = run_cli("ui", "--port", "0", "--root", "/no/such/dir", check=False)
    assert proc.returncode == 2 and "--root /no/such/dir: no such directory" in proc.stderr


def test_the_data_view_says_what_the_length_limit_cuts(server, root):
    answer = server.call("/api/data", {"data": "train.json", "chat_template": "qwen3", "max_length": 24})[1]
    assert answer["ok"] and [(s["id"], s["truncated"], s["tokens"]) for s in answer["samples"][:2]] == [("s0", True, 24), ("s1", False, 23)]
    assert "raise --model_max_length to keep them whole: s0" in answer["summary"]


def test_runs_started_from_a_terminal_show_up(server, root):
    out = str(root / "from-terminal")
    run_cli("sft", "--data_path", str(root / "train.json"), "--chat_template", "qwen3", "--output_dir", out, "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--report_to", "none")
    [run] = [r for r in server.call("/api/runs")[1]["runs"] if r["id"] == out]
    assert (run["status"], run["method"], run["step"], run["max_steps"]) == ("finished", "sft", 3, 3)
    assert run["command"].startswith(f"qwen-tune sft --data_path {root}/train.json --chat_template qwen3 --output_dir {out}")
    detail = server.call(f"/api/run?id={urllib.parse.quote(out)}")[1]
    assert [step for step, _ in detail["series"]["loss"]] == [1, 2, 3] and "started outside this page" in detail["log"]


def test_the_form_names_each_methods_own_options(server, root):
    """PPO and GRPO start from a policy and read prompts; the form's model and data fields become those options."""
    form = {"options": {"model_name_or_path": "lora", "data_path": "train.json", "output_dir": "rl", "reward_model": "rm"},
            "extra": "--reward_funcs recipes/grpo_rewards.py:exact_answer"}
    answer = server.call("/api/command", {"method": "grpo", **form})[1]
    assert answer["command"] == (f"qwen-tune grpo --policy {root}/lora --prompts {root}/train.json --output_dir {root}/rl "
                                 f"--reward_model {root}/rm --reward_funcs recipes/grpo_rewards.py:exact_answer")
    assert server.call("/api/command", {"method": "sft", **form})[1]["argv"][:3] == ["sft", "--model_name_or_path", f"{root}/lora"]
    assert "choose one of sft, rm" in server.call("/api/command", {"method": "merge", **form})[1]["error"]
