"""Progress of long loops: a tqdm bar on a terminal, log lines everywhere else.

tqdm draws nothing when stderr is not a terminal (nohup, SLURM, `dvc queue`), so a run of
hours would say nothing until it ends. Off a terminal `Progress` logs one line every
`every_s` seconds (60 by default) or every `every_n` units (a twentieth of the total by
default), whichever comes first: position / total, rate, the caller's figures (loss, L0)
and the ETA. A loop whose length is not known in advance (a corpus read until its source
ends) passes `total=None`: its lines give position and rate, every `every_s` seconds.
"""
from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any, Callable

log = logging.getLogger("saelab.progress")


def _eta(seconds: float) -> str:
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """`update(n, **figures)` after each unit of work; `close()` at the end (or use `with`).

    `rate_unit` names what `rate_per` counts per unit (a training step is `batch_size`
    tokens), so lines report tokens/s whatever the loop counts. `enabled=False` (ranks
    other than 0) makes it silent.
    """

    def __init__(self, desc: str, total: int | None, *, initial: int = 0, unit: str = "step",
                 rate_per: float = 1.0, rate_unit: str = "tokens", every_s: float = 60.0,
                 every_n: int | None = None, enabled: bool = True,
                 interactive: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.n, self.unit = desc, total, initial, unit
        self.rate_per, self.rate_unit = rate_per, rate_unit
        self.every_s = every_s
        if total is None:  # no fraction of an unknown total: time only
            self.every_n = every_n or sys.maxsize
        else:
            self.every_n = every_n or max(1, (total - initial) // 20)
        self.enabled = enabled
        self.clock = clock
        self.t0 = self.t_last = clock()
        self.n0 = self.n_last = initial
        self.figures: dict[str, Any] = {}
        if interactive is None:
            interactive = sys.stderr.isatty()
        self.bar = None
        if enabled and interactive:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **figures: Any) -> None:
        self.n += n
        self.figures.update(figures)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if figures:
                self.bar.set_postfix({k: _fmt(v) for k, v in figures.items()}, refresh=False)
            return
        now = self.clock()
        if self.n - self.n_last >= self.every_n or now - self.t_last >= self.every_s \
                or (self.total is not None and self.n >= self.total):
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        done = self.n - self.n0
        rate = done * self.rate_per / elapsed if elapsed > 0 else float("nan")
        if self.total is None:
            parts = [f"{self.desc}: {self.unit} {self.n:,}", f"{rate:,.0f} {self.rate_unit}/s"]
        else:
            left = (self.total - self.n) * elapsed / done if done else float("inf")
            parts = [f"{self.desc}: {self.unit} {self.n}/{self.total} "
                     f"({100.0 * self.n / max(self.total, 1):.1f}%)",
                     f"{rate:,.0f} {self.rate_unit}/s"]
        parts += [f"{k} {_fmt(v)}" for k, v in self.figures.items()]
        if self.total is not None:
            parts.append(f"ETA {_eta(left)}")
        log.info(", ".join(parts))
        self.t_last, self.n_last = now, self.n

    def extend(self, n: int) -> None:
        """Add `n` units to the total (work found to be needed on the way)."""
        if self.total is not None:
            self.total += n
        if self.bar is not None and self.bar.total is not None:
            self.bar.total += n
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
