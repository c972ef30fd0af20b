"""A one-line progress bar on stderr (no tqdm dependency).

On a terminal the line is redrawn in place at most every ``interval`` seconds; in a log file
(not a TTY) it prints one line at each quarter of the way, so logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


class Progress:
    def __init__(self, total: int, desc: str = "", stream: Optional[TextIO] = None,
                 enabled: bool = True, width: int = 24, interval: float = 0.2):
        self.total, self.desc, self.width, self.interval = max(total, 0), desc, width, interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.n = 0
        self.t0 = self._last = time.perf_counter()
        self._quarter = 0
        self._width_drawn = 0

    def update(self, n: int = 1, postfix: Optional[Callable[[], str]] = None) -> None:
        """Advance by ``n``; ``postfix`` (called only when the line is drawn, since it may
        synchronise the device) returns text such as the running loss."""
        self.n += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last >= self.interval or self.n >= self.total:
                self._draw(postfix, end="")
                self._last = now
        elif self.total and self.n * 4 // self.total > self._quarter:
            self._quarter = self.n * 4 // self.total
            self._draw(postfix, end="\n")

    def _draw(self, postfix, end: str) -> None:
        frac = min(1.0, self.n / self.total) if self.total else 0.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        text = (f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:5.1f}s "
                f"eta {eta:5.1f}s" + (f" {postfix()}" if postfix else ""))
        if self.tty:
            pad = max(0, self._width_drawn - len(text))
            self.stream.write("\r" + text + " " * pad + end)
            self._width_drawn = len(text)
        else:
            self.stream.write(text + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width_drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._width_drawn = 0
