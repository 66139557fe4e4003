"""Progress of the long loops: a tqdm bar on a terminal, plain lines in a log file, nothing on
torchrun ranks other than 0.

    with progress(total=len(files), desc="decoding", unit="img") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{loss:.4f}")    # shown after the rate and the ETA

A bar redrawn in place is unreadable in a log file (a cluster job's output, `> run.log`): one
line of carriage returns. There the same figures come as whole lines: the first at once, then one
whenever a tenth of the work is done or LINE_SECONDS have passed, whichever comes first, and the
last at the end. The ETA is the whole loop's average rate (smoothing 0), so the pauses that recur
in it, distill.py's evaluations, are in the estimate.
"""
import contextlib
import sys
import time

from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

import parallel

LINE_SECONDS = 60
LINE_FRACTION = 0.1
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_UNSIZED = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # a loop of unknown length


class Bar(tqdm):
    monitor_interval = 0  # no monitor thread: data.py forks its decoding workers while a bar is open


class Terminal(Bar):
    """A bar drawn in place; what the loop prints meanwhile goes above it, not through it."""

    def __enter__(self):
        self.printing_above = contextlib.ExitStack()
        if not self.disable and not isinstance(sys.stdout, DummyTqdmFile):
            self.printing_above.enter_context(contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)))
        return super().__enter__()

    def __exit__(self, *exc):
        self.printing_above.close()
        return super().__exit__(*exc)


class Lines(Bar):
    """The bar's figures as whole lines, for output that is not a terminal."""

    def __init__(self, iterable=None, total=None, **kwargs):
        self.last_line = None  # (time, n) when the last line was printed
        sized = total is not None or hasattr(iterable, "__len__")
        super().__init__(iterable, total=total, bar_format=LINE_FORMAT if sized else LINE_FORMAT_UNSIZED,
                         leave=False, mininterval=0, miniters=1, **kwargs)

    def display(self, msg=None, pos=None):
        if msg is not None:  # tqdm clearing its bar (msg ""): a printed line stays
            return False
        if self.line_due():
            self.print_line()
        return True

    def line_due(self):
        if self.last_line is None:
            return True
        seconds, n = self.last_line
        step = LINE_FRACTION * self.total if self.total else float("inf")
        return time.monotonic() - seconds >= LINE_SECONDS or self.n - n >= step

    def print_line(self):
        self.fp.write(f"{self}\n")
        self.fp.flush()
        self.last_line = (time.monotonic(), self.n)

    def close(self):
        if not self.disable and self.last_line is not None and self.last_line[1] != self.n:
            self.print_line()  # the final figures: how long the whole loop took
        super().close()


def progress(iterable=None, total=None, desc=None, unit="it", initial=0, file=None):
    """A tqdm bar over `iterable` (or updated by hand from `initial` to `total`) on stderr: drawn
    in place on a terminal, plain lines otherwise, silent on torchrun ranks other than 0. Use it
    as a context manager, so that on a terminal what the loop prints goes above the bar."""
    file = file or sys.stderr
    kind = Terminal if getattr(file, "isatty", lambda: False)() else Lines
    return kind(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, smoothing=0,
                disable=not parallel.is_main(), dynamic_ncols=True)
