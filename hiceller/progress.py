"""Progress bars for long stages: tqdm on a terminal, one line per stage elsewhere (CI logs)."""

from __future__ import annotations

import sys
from typing import Callable

from tqdm.auto import tqdm

__all__ = ["ProgressFactory", "progress_factory", "close_all"]

ProgressFactory = Callable[[str, int], Callable[[int], None]]

_bars: list[tqdm] = []


def progress_factory(enabled: bool = True) -> ProgressFactory | None:
    """A factory making one bar per stage; each bar is advanced by calling it with a cell count."""
    if not enabled:
        return None

    def make(desc: str, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=desc, unit="cells", unit_scale=True, file=sys.stderr, leave=True, mininterval=1.0)
        _bars.append(bar)

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
