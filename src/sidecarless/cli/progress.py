"""What a long command waits for, on one line of stderr rewritten in place: only when both stdout and stderr
are a terminal (a pipe, a log or CI gets nothing), so scripts read the same output as before."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self.stream = stream
        self.enabled = stream.isatty() and sys.stdout.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self.last = ""

    def __call__(self, message: str) -> None:
        if not self.enabled or message == self.last:
            return
        self.last = message
        self.stream.write(f"\r\033[K[{time.monotonic() - self.started:5.1f} s] {message}")
        self.stream.flush()

    def done(self) -> None:
        """The line cleared: what follows is the command's own output."""
        if self.enabled and self.last:
            self.stream.write("\r\033[K")
            self.stream.flush()
