"""Progress a person can see, wherever the output goes: a live bar on a terminal, and in a
file (a pipeline's `launch.log`, a Slurm output file) plain lines every PLAIN_EVERY_S seconds
with no carriage-return frames. A plain line starts with PREFIX, which `orlhf pipeline`
looks for to show each running stage's progress."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

PREFIX = "[progress] "
PLAIN_EVERY_S = 10.0
QUIET_FOR_S = 10.0  # `quiet_progress`: work done within this long shows nothing
ETA_AFTER = 0.05  # a plain line shows an ETA once this run has done this share of its units...
ETA_MIN_UNITS = 2  # ...and at least this many (one unit's rate is mostly start-up)


class Progress:
    """`update(n, **shown)` after each unit of work; `write(text)` for a line between units.
    With `delay`, nothing shows before the work has run that many seconds. As a context
    manager it closes on leaving, an error included (a terminal's bar then ends its line
    before the error's message)."""

    def __init__(self, desc: str, total: int, initial: int = 0, enabled: bool = True, unit: str = "step",
                 stream: TextIO | None = None, every_s: float = PLAIN_EVERY_S, delay: float = 0.0):
        self.desc, self.total, self.done, self.unit = desc, total, initial, unit
        self.stream = stream or sys.stderr
        self.enabled, self.every_s, self.delay = enabled, every_s, delay
        self.started, self.last_line, self.shown = time.monotonic(), float("-inf"), {}
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream,
                        delay=delay, disable=not (enabled and _is_terminal(self.stream)))
        self.first = self.printed = initial

    def update(self, n: int = 1, **shown: str) -> bool:
        """True when this update ended a shown interval: it printed a plain line (on a terminal,
        whose bar shows every update: every_s had passed since the last such update). A caller
        showing a mean over the units since the last line starts its next one then."""
        self.done += n
        self.shown = shown
        if not self.bar.disable:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
            if time.monotonic() - self.last_line >= self.every_s:
                self.last_line = time.monotonic()
                return True
        elif self.enabled and self._due() and (time.monotonic() - self.last_line >= self.every_s
                                               or self.done >= self.total):
            self._plain_line()
            return True
        return False

    def write(self, text: str) -> None:
        if self.bar.disable:
            print(text, file=self.stream, flush=True)
        else:
            self.bar.write(text, file=self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar.disable and self.enabled and self.done != self.printed and self._due():
            self._plain_line()
        self.bar.close()

    def _due(self) -> bool:
        return self.delay <= 0 or time.monotonic() - self.started >= self.delay

    def _plain_line(self) -> None:
        self.last_line, self.printed = time.monotonic(), self.done
        print(PREFIX + plain_status(self.desc, self.done, self.total, self.first, self.last_line - self.started,
                                    self.shown, self.unit), file=self.stream, flush=True)


def quiet_progress(desc: str, total: int, unit: str, enabled: bool = True, initial: int = 0) -> Progress:
    """Progress for work that may be long or short (building a dataset, scoring a small
    file): only on rank 0 (`main_process`), and only once it has run QUIET_FOR_S, so that
    small work adds no line. `enabled` False (logging.progress=false) shows nothing."""
    return Progress(desc, total, initial, enabled=enabled and main_process(), unit=unit, delay=QUIET_FOR_S)


def main_process() -> bool:
    """Whether this process is rank 0 of its stage's world (or alone): torch.distributed's
    rank once a stage started it, else torchrun's RANK. torch is not imported for this."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def plain_status(desc: str, done: int, total: int, first: int, elapsed: float, shown: dict, unit: str) -> str:
    """`sft: step 40/120 (33%) loss=2.31 | 0:40 elapsed, ETA 1:20`; the ETA from the rate of
    this run (units done before a resume do not count). No ETA until this run has done at
    least ETA_AFTER (5%) of the units it has to do and at least ETA_MIN_UNITS (2) of them:
    an estimate from the first unit, start-up included, can be off many times over."""
    ran = done - first
    rate = ran / elapsed if elapsed > 0 else 0.0
    enough = ran >= max(ETA_MIN_UNITS, ETA_AFTER * (total - first))
    eta = f", ETA {clock((total - done) / rate)}" if enough and rate > 0 and done < total else ""
    values = "".join(f" {key}={value}" for key, value in shown.items())
    percent = f" ({100 * done / total:.0f}%)" if total else ""
    return f"{desc}: {unit} {done}/{total}{percent}{values} | {clock(elapsed)} elapsed{eta}"


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_terminal(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()
