"""Progress for long stages: a tqdm bar on a terminal, one line per stage elsewhere (CI and job logs).

A bar redrawn with carriage returns turns a log file into one endless line, so off a terminal a
stage prints a single line when it ends: what it did, how much, in how long (and its last postfix,
e.g. the loss).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm.auto import tqdm

__all__ = ["ProgressFactory", "progress_factory", "stage_bar", "close_all"]

ProgressFactory = Callable[[str, int], Callable[[int], None]]

_bars: list = []


class _LineProgress:
    """The tqdm calls the project makes, printing one line when the stage ends."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.start, self.postfix, self.leave, self._closed = time.perf_counter(), "", True, False
        self._initial = initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave:
            done = self.n - self._initial
            extra = f", {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {done:,} {self.unit} in {time.perf_counter() - self.start:.1f} s{extra}", file=sys.stderr, flush=True)


def stage_bar(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar on a terminal, else a :class:`_LineProgress` (same calls)."""
    if sys.stderr.isatty():
        bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "cells", file=sys.stderr,
                   leave=True, mininterval=1.0)
    else:
        bar = _LineProgress(total, desc, unit, initial)
    _bars.append(bar)
    return bar


def progress_factory(enabled: bool = True) -> ProgressFactory | None:
    """A factory making one bar per stage; each bar is advanced by calling it with a cell count."""
    if not enabled:
        return None

    def make(desc: str, total: int) -> Callable[[int], None]:
        bar = stage_bar(total, desc, "cells")

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return advance

    return make


def close_all() -> None:
    """Erase bars still open (a stage that failed), so an error message gets a clean line."""
    while _bars:
        bar = _bars.pop()
        if bar.n < (bar.total or 0):
            bar.leave = False
        bar.close()
