"""Progress on stderr: a bar on a terminal, plain lines elsewhere (logs, CI, pipes).

Long commands (export, convert, calibrate, build) should never be silent for minutes, whatever
stderr is; ``-q`` turns progress off.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
LINE_INTERVAL_S = 5.0


def progress_bar(items: Iterable[T], enabled: bool, desc: str, unit: str, lines: bool = True) -> Iterable[T]:
    """``items``, reporting progress on stderr when ``enabled``.

    On a terminal a tqdm bar; otherwise, if ``lines``, one line per finished item (at most one per
    LINE_INTERVAL_S seconds, and always the last), such as ``calibrate capture: 3/8 generations (41 s)``.
    """
    if not enabled:
        return items
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit=unit, leave=False)
    return _lines(items, desc, unit) if lines else items


def _lines(items: Iterable[T], desc: str, unit: str) -> Iterator[T]:
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    plural = unit if total == 1 else f"{unit}s"

    def say(done: int, seconds: float) -> None:
        count = f"{done}/{total}" if total is not None else str(done)
        print(f"{desc}: {count} {plural} ({seconds:.0f} s)", file=sys.stderr, flush=True)

    start = last = time.perf_counter()
    say(0, 0.0)
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= LINE_INTERVAL_S or done == total:
            say(done, now - start)
            last = now
