"""Progress for long loops: a live bar on a terminal, periodic lines in logs."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any


class Progress:
    """Count work done; draw a tqdm bar on a TTY, else log a line every ``every_s`` seconds."""

    def __init__(self, total: int, what: str, *, every_s: float = 10.0) -> None:
        self.total, self.what, self.every_s = total, what, every_s
        self.done = 0
        self._started = self._last_line = time.perf_counter()
        self._bar: Any = None
        if sys.stderr.isatty() and total:
            from tqdm import tqdm  # only where a bar is drawn

            self._bar = tqdm(total=total, desc=what, unit="file", file=sys.stderr)

    def update(self, count: int = 1) -> None:
        """Count ``count`` more items done; advance the bar, or log a line when one is due."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._log(now)

    def _log(self, now: float) -> None:
        rate = self.done / max(now - self._started, 1e-9)
        share = self.done / self.total if self.total else 1.0
        print(
            f"{self.what}: {self.done}/{self.total} ({share:.0%}), {rate:.0f}/s",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.total and kind is None:
            self._log(time.perf_counter())
