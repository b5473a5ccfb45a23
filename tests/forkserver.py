"""Fresh processes without paying the imports each time.

Every end-to-end test runs qwen-tune as a user does: a new `python` / `qwen-tune` process, alone or inside a recipe's
shell script. Each such process used to spend about 6 s (9 s on a loaded machine) importing torch, transformers,
PEFT, TRL and DeepSpeed before doing anything, which was a third of the suite's time.

Here a zygote imports them once and forks a child per command. The tests call `python` and `qwen-tune` through
small client programs (`write_clients`, put first on PATH by `helpers.fresh_env`) that hand the zygote their
argv, working directory, environment and their stdin / stdout / stderr file descriptors, wait, and exit with the
child's status. Signals sent to a client (SIGTERM, SIGINT) are passed on to the child; a client that dies kills it.

A child is a new process in everything a test relies on: its own pid, environment, working directory, argv,
standard streams and exit status, and nothing of any model, tokenizer or training: the zygote only imports.
What it shares is what the imports did, so a command whose environment differs from the zygote's in anything but
the variables in RUN_TIME_VARIABLES (which libraries read when they run, not when they are imported), or that uses
an interpreter option (`python -X importtime`), runs in a real interpreter instead: the client simply execs it.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading

PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed", "safetensors", "qwen_tune.cli")
# and then every command's module (qwen_tune.cli.COMMANDS), so that a new command is preloaded too
RUN_TIME_VARIABLES = {"PWD", "OLDPWD", "SHLVL", "_", "MASTER_PORT", "MASTER_ADDR", "QWEN_TUNE_CACHE",
                      # what torchrun gives each rank (read by torch.distributed, accelerate and DeepSpeed at init)
                      "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_NAME",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_MAX_RESTARTS",
                      "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_SIGNALS_TO_HANDLE",
                      "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                      # what the recipes' launcher reads (recipes/_launch.sh), passed on by torchrun; no library reads them
                      "DS_CONFIG", "NPROC_PER_NODE", "NNODES", "NODE_RANK",
                      "HANG_MARKER"}  # read by a test's reward function when it is called (tests/test_grpo.py)

CLIENT = '''#!{python} -S
"""`{name} ARGS` through the test suite's forkserver (tests/forkserver.py); a real interpreter when it declines."""
import json, os, signal, socket, sys
argv = {prefix} + sys.argv[1:]
real = lambda: os.execv({python!r}, [{python!r}] + argv)
try:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(os.environ["QWEN_TUNE_TEST_FORKSERVER"])
    request = json.dumps({{"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
    socket.send_fds(conn, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
except (KeyError, OSError):
    real()
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: conn.sendall(b"%d\\n" % signum))
reply = b""
while not reply.endswith(b"\\n"):
    chunk = conn.recv(64)
    if not chunk:
        sys.exit("qwen-tune test forkserver: the connection to the forkserver was lost")
    reply += chunk
status = json.loads(reply)
if status == "real":
    real()
if status < 0:  # the child died of a signal: so does the client (SIGKILL's action cannot be set, nor needs to be)
    if -status != signal.SIGKILL:
        signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
'''


def write_clients(directory: str) -> None:
    """`python` and `qwen-tune` clients in `directory`, for the front of PATH."""
    os.makedirs(directory, exist_ok=True)
    for name, prefix in (("python", []), ("python3", []), ("qwen-tune", ["-m", "qwen_tune"])):
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(CLIENT.format(python=sys.executable, name=name, prefix=prefix))
        os.chmod(path, 0o755)


def parse_python_argv(argv: list[str]) -> tuple[str, str, list[str], bool] | None:
    """(kind, target, its arguments, unbuffered) for the command lines a child can run: `[-u] -c CODE ...`,
    `[-u] -m MODULE ...`, `[-u] SCRIPT.py ...` (torchrun gives its ranks -u); None for anything else."""
    unbuffered = argv[:1] == ["-u"]
    argv = argv[1:] if unbuffered else argv
    if len(argv) >= 2 and argv[0] in ("-c", "-m"):
        return argv[0], argv[1], argv[2:], unbuffered
    if argv and argv[0].endswith(".py") and not argv[0].startswith("-"):
        return "script", argv[0], argv[1:], unbuffered
    return None


def run_child(request: dict, set_by_imports: dict) -> None:
    """In the forked child, with the client's streams on fds 0-2: become `python ARGV` and exit with its status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"], **set_by_imports)  # as the imports did in a real process
    kind, target, rest, unbuffered = parse_python_argv(request["argv"])
    if unbuffered:
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(write_through=True)
    status = 0
    try:
        if kind == "-c":
            sys.argv, sys.path[0] = ["-c", *rest], ""
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif kind == "-m":
            sys.argv, sys.path[0] = [target, *rest], os.getcwd()
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[0] = [target, *rest], os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:  # as the interpreter reads it
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    exit_as_python_does(status)


def exit_as_python_does(status: int) -> None:
    """What an interpreter does at exit that a test can see: wait for non-daemon threads, run atexit handlers,
    flush the streams. Not the teardown of every module (2-3 s for these libraries; nothing observable)."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)


def handle(conn: socket.socket, listener: socket.socket, zygote_env: dict, set_by_imports: dict) -> None:
    """A forked handler per client: run its command in a grandchild, pass signals on, report the exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    listener.close()
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = int.from_bytes(message[:8], "big")
    while len(message) < 8 + size:
        message += conn.recv(1 << 20)
    request = json.loads(message[8:])
    # what the imports set counts as the zygote's own: a command started by a forkserver child (torchrun's ranks) has it
    differs = {k for k in set(request["env"]) | set(zygote_env)
               if request["env"].get(k) not in (zygote_env.get(k), set_by_imports.get(k, zygote_env.get(k)))}
    if parse_python_argv(request["argv"]) is None or differs - RUN_TIME_VARIABLES:
        conn.sendall(b'"real"\n')
        os._exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        conn.close()
        for fd, target in zip(fds, (0, 1, 2)):
            os.dup2(fd, target)
            os.close(fd)
        run_child(request, set_by_imports)
    for fd in fds:
        os.close(fd)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            conn.sendall(b"%d\n" % os.waitstatus_to_exitcode(status))
            os._exit(0)
        if select.select([conn], [], [], 0.05)[0]:
            data = conn.recv(64)
            if not data:  # the client died: so does its command
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os._exit(0)
            for signum in data.split():
                os.kill(pid, int(signum))


def serve(path: str) -> None:
    zygote_env = dict(os.environ)  # what a client must have to be served
    for name in PRELOAD:
        __import__(name)
    from qwen_tune.cli import COMMANDS

    for module, _ in COMMANDS.values():
        __import__(module)
    import matplotlib  # the loss plot of every save (qwen_tune/report.py), set up as it does: 0.4 s of imports

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    set_by_imports = {k: v for k, v in os.environ.items() if zygote_env.get(k) != v}  # torch sets two
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while select.select([listener, sys.stdin], [], [])[0] != [sys.stdin]:  # stdin at EOF: the test process ended
        conn, _ = listener.accept()
        if os.fork() == 0:
            handle(conn, listener, zygote_env, set_by_imports)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
