"""`qwen-tune ui`: a local web page to look at data, launch and watch runs, and talk to their results.

Python's own HTTP server and one static page (static/): no web framework to install, nothing fetched from the
internet (the page works offline), and a small surface to keep safe. The page only calls the commands' own code
(data/, tools/chat.py) and starts ordinary `qwen-tune` processes (runs.py); nothing is possible only in the page.

Safe by default: it listens on 127.0.0.1 and answers only requests addressed to that name (no DNS rebinding) that
carry the page's header (a cross-site form cannot send it); on another address every API call needs the token
printed at start. Every path it reads or writes lies under the --root directories (roots.py).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import sys
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from ..errors import UserError
from ..options import Method, load
from ..options.groups import Frozen
from . import command, data_view, talk
from .roots import Roots
from .runs import Runs, command_text

STATIC = os.path.join(os.path.dirname(__file__), "static")
PAGES = {"/": ("index.html", "text/html"), "/page.js": ("page.js", "text/javascript"), "/page.css": ("page.css", "text/css")}
MAX_BODY = 1 << 20
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


@dataclass
class UiOptions(Frozen):
    _argument_group_name = "ui"
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on. Another than this machine's loopback "
                                                             "needs a token (--token, or one is made and printed)."})
    port: int = field(default=7860, metadata={"help": "Port (0: any free one; the address is printed)."})
    root: str = field(default=".", metadata={"help": "Comma-separated directories the page may read and write (data, "
                                                     "recipes, models, outputs); relative paths start from the first."})
    token: str | None = field(default=None, metadata={"help": "A secret every API call must carry (given in the page's "
                                                              "address as ?token=...). Unset on loopback: none."})


def check_options(values: dict) -> None:
    ui = values["ui"]
    missing = [d for d in ui["root"].split(",") if not os.path.isdir(os.path.expanduser(d.strip()))]
    if missing:
        raise UserError(f"--root {', '.join(missing)}: no such directory")
    if not 0 <= ui["port"] < 65536:
        raise UserError(f"--port {ui['port']}: expected 0-65535")
    if not is_loopback(ui["host"]) and not ui["token"]:
        ui["token"] = secrets.token_urlsafe(24)  # listening beyond this machine: never without one


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


METHOD = Method("ui", groups={"ui": UiOptions}, resolve=check_options)


class Page:
    """What the handlers share: the roots, the runs, and the rules a request must pass."""

    def __init__(self, options: UiOptions):
        self.roots = Roots([d.strip() for d in options.root.split(",") if d.strip()])
        self.runs = Runs(self.roots)
        self.host, self.token = options.host, options.token

    def refusal(self, handler: BaseHTTPRequestHandler, api: bool) -> str | None:
        """Why this request is not answered, or None."""
        if is_loopback(self.host):
            name = (handler.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if not is_loopback(name):
                return f"this page answers requests to {self.host} only"
        if api and handler.headers.get("X-Qwen-Tune") != "1":
            return "API calls come from the page"
        if api and self.token and not hmac.compare_digest(handler.headers.get("X-Qwen-Tune-Token") or "", self.token):
            return "a token is needed: open the address qwen-tune ui printed, with its ?token="
        return None

    def run_id(self, value) -> str:
        if not isinstance(value, str) or not self.roots.inside(value):
            raise UserError(f"{value}: not a run under this page's directories")
        return os.path.realpath(value)

    # ---- the API: each takes the request's JSON (or query) and returns the answer's

    def info(self, query: dict) -> dict:
        return {"roots": self.roots.directories, "methods": list(command.TRAINING), **self.roots.listing()}

    def list_runs(self, query: dict) -> dict:
        return {"runs": [self.runs.describe(out) for out in self.runs.output_dirs()]}

    def run(self, query: dict) -> dict:
        return self.runs.describe(self.run_id(query.get("id")), detail=True)

    def data(self, body: dict) -> dict:
        return data_view.preview(self.roots, body)

    def command(self, body: dict) -> dict:
        args, _ = command.form_args(self.roots, body)
        return {"ok": True, "argv": args, "command": command_text(args)}

    def yaml(self, body: dict) -> dict:
        return {"ok": True, "path": command.save_yaml(self.roots, body)}

    def launch(self, body: dict) -> dict:
        args, out = command.form_args(self.roots, body)
        return self.runs.launch(args, out)

    def stop(self, body: dict) -> dict:
        return self.runs.stop(self.run_id(body.get("id")))

    def resume(self, body: dict) -> dict:
        return self.runs.resume(self.run_id(body.get("id")))

    def chat_load(self, body: dict) -> dict:
        return talk.load(self.roots, body)

    def chat(self, body: dict) -> dict:
        return talk.answer(self.roots, body)


GETS = {"/api/info": Page.info, "/api/runs": Page.list_runs, "/api/run": Page.run}
POSTS = {"/api/data": Page.data, "/api/command": Page.command, "/api/yaml": Page.yaml, "/api/launch": Page.launch,
         "/api/stop": Page.stop, "/api/resume": Page.resume, "/api/chat/load": Page.chat_load, "/api/chat": Page.chat}


class Handler(BaseHTTPRequestHandler):
    page: Page  # set on the subclass made for each server

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in PAGES:
            if (why := self.page.refusal(self, api=False)) is not None:
                return self.send(403, {"ok": False, "error": why})
            name, kind = PAGES[url.path]
            with open(os.path.join(STATIC, name), "rb") as f:
                return self.send(200, f.read(), kind)
        self.answer(GETS, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.send(413, {"ok": False, "error": "request too large"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self.send(400, {"ok": False, "error": "expected a JSON body"})
        self.answer(POSTS, urlsplit(self.path).path, body if isinstance(body, dict) else {})

    def answer(self, routes: dict, path: str, request: dict) -> None:
        if path not in routes:
            return self.send(404, {"ok": False, "error": f"no such page: {path}"})
        if (why := self.page.refusal(self, api=True)) is not None:
            return self.send(403, {"ok": False, "error": why})
        try:
            return self.send(200, routes[path](self.page, request))
        except UserError as e:  # a user's mistake: said as the command says it
            return self.send(200, {"ok": False, "error": str(e)})
        except Exception as e:  # noqa: BLE001  (the page stays up; the trace goes to the terminal)
            traceback.print_exc()
            return self.send(500, {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"})

    def send(self, status: int, content, kind: str = "application/json") -> None:
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002  (the standard library's name)
        pass  # the terminal shows the address and errors, not every poll


def main(argv: list[str] | None = None) -> None:
    options = load(METHOD, argv).ui
    page = Page(options)
    handler = type("PageHandler", (Handler,), {"page": page})
    try:
        server = ThreadingHTTPServer((options.host, options.port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on {options.host}:{options.port} ({e.strerror}); choose another --port") from e
    server.daemon_threads = True
    host = f"[{options.host}]" if ":" in options.host else options.host
    address = f"http://{host}:{server.server_address[1]}/" + (f"?token={options.token}" if options.token else "")
    print(f"qwen-tune ui: open {address}\n  directories it may use: {', '.join(page.roots.directories)}\n"
          f"  Ctrl-C stops the page (runs it started go on)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("qwen-tune ui: stopped", file=sys.stderr)
    finally:
        server.server_close()
