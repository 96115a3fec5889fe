"""The progress line: rewritten in place once a second on a terminal, printed every few seconds
otherwise (so logs stay readable)."""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, log_every: int = 5) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every
        self._n = 0
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        self._n += 1
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
            self.stream.flush()
        elif self._n % self.log_every == 1 or self.log_every == 1:
            self.stream.write(text + "\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        """A line of its own (ends the in-place line first)."""
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
