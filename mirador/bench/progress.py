"""A progress bar: tqdm when it is installed (it comes with huggingface_hub), else a line every few seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, unit: str, *, disabled: bool = False, every_s: float = 5.0):
        self.total, self.unit, self.disabled, self.every_s = total, unit, disabled, every_s
        self.done = 0
        self._bar = None
        self._started = self._last = time.monotonic()
        if disabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.disabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            print(
                f"{self.done}/{self.total} {self.unit} done, {now - self._started:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
