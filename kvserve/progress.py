"""Progress of long loops: a tqdm bar on a terminal, otherwise a plain log line now and then."""
from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any, Iterable, Iterator

log = logging.getLogger("kvserve.progress")


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             stream: IO[str] | None = None, logger: logging.Logger | None = None):
    """A bar when `stream` (default stderr) is a terminal and tqdm imports; else a `LogProgress`.

    Both wrap an iterable or count `update(n)` calls, and `close()` (or a `with` block) ends them."""
    stream = stream or sys.stderr
    if _is_tty(stream):
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                        mininterval=0.5)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, logger=logger)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LogProgress:
    """Logs `desc: done/total unit (pct%), elapsed, rate` at each 10% step or every 10 s, and once at the end."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", logger: logging.Logger | None = None, every_fraction: float = 0.1,
                 every_s: float = 10.0, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.log = logger or log
        self.every_fraction, self.every_s, self.clock = every_fraction, every_s, clock
        self.n = 0
        self.start = self.last_time = clock()
        self.last_step = 0
        self.closed = False

    def __iter__(self) -> Iterator:
        assert self.iterable is not None, "LogProgress without an iterable: call update()"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        step = int(self.n / self.total / self.every_fraction) if self.total else 0
        if step > self.last_step or now - self.last_time >= self.every_s:
            if self.total is None or self.n < self.total:
                self._emit(now)
            self.last_step, self.last_time = step, now

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit(self.clock(), done=True)

    def _emit(self, now: float, done: bool = False) -> None:
        elapsed = now - self.start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        self.log.info("%s: %s %s%s%s, %.1f s%s", self.desc or "progress", count, self.unit, pct,
                      " done" if done else "", elapsed, rate)
