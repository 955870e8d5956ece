"""Progress reporting for long solves: a tqdm bar, a plain text line, or a callback."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

from ._types import ProgressArg

_PLAIN_INTERVAL_S = 5.0


class Progress:
    """``progress=False``: nothing. ``True``: a tqdm bar when stderr is a terminal and
    tqdm is installed, else a plain line on stderr at most every few seconds (a bar's
    carriage returns make logs and pipes unreadable). A callable: called as
    ``progress(step, *values)`` after every step."""

    def __init__(self, progress: ProgressArg, *, total: Optional[int], desc: str):
        self._callback: Optional[Callable[..., Any]] = None
        self._bar = None
        self._desc = desc
        self._step = 0
        self._last_print = 0.0
        if callable(progress):
            self._callback = progress
        elif progress and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
        self._enabled = bool(progress)

    def update(self, *values: float, steps: int = 1) -> None:
        self._step += steps
        if not self._enabled:
            return
        if self._callback is not None:
            self._callback(self._step, *values)
        elif self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix_str(" ".join(f"{v:.4g}" for v in values), refresh=False)
        else:
            now = time.monotonic()
            if now - self._last_print >= _PLAIN_INTERVAL_S:
                self._last_print = now
                shown = " ".join(f"{v:.6g}" for v in values)
                print(f"{self._desc}: step {self._step} {shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
