"""qwen-tune's messages on the console: each on a line of its own, also while a progress bar is drawn.

A progress bar ends its line with a carriage return, not a newline, so a plain print after it is glued to it
(`9/30 [00:50<01:50, 5.25s/it]SIGTERM: stopped ...`). tqdm's own `write` clears the open bars, prints the message
and draws them again below it; with no bar open it is a plain print.
"""

from __future__ import annotations

import sys


def say(message: str, file=None) -> None:
    """Print `message` (stderr by default) on a fresh line, above any open progress bar."""
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    tqdm.write(message, file=stream)
    stream.flush()
