"""Progress of a long job: a bar on a terminal (tqdm), a log line every ``log_every`` seconds elsewhere."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("runner")


class Progress:
    """Rows done of ``total`` (when known), tokens/s and the time left."""

    def __init__(self, total: int | None, *, initial: int = 0, log_every: float = 30.0):
        self.total, self.done, self.tokens = total, initial, 0
        self.log_every = log_every
        self.start = self.last_log = time.monotonic()
        self._initial = initial
        self.bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, file=sys.stderr,
                        smoothing=0.1) if sys.stderr.isatty() else None

    def update(self, rows: int, *, tokens: int = 0) -> None:
        self.done += rows
        self.tokens += tokens
        now = time.monotonic()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            self.bar.update(rows)
        elif now - self.last_log >= self.log_every:
            self.last_log = now
            log.info("%s rows, %.0f tokens/s%s", f"{self.done}/{self.total}" if self.total else self.done, rate,
                     self._left(now))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _left(self, now: float) -> str:
        """The time left at the pace so far (rows this session over its time)."""
        ran = self.done - self._initial
        if not self.total or ran <= 0:
            return ""
        seconds = (self.total - self.done) * (now - self.start) / ran
        return f", {time.strftime('%H:%M:%S', time.gmtime(seconds))} left"
