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
last at the end.
"""
import sys
import time

from tqdm import tqdm

import parallel

LINE_SECONDS = 60
LINE_FRACTION = 0.1
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_UNSIZED = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # a loop of unknown length


class Bar(tqdm):
    # No monitor thread: data.py forks its decoding workers while a bar is open.
    monitor_interval = 0


class Lines(Bar):
    """The bar's figures as whole lines, for output that is not a terminal."""

    def __init__(self, iterable=None, total=None, **kwargs):
        self.last_line = None  # (time, n) when the last line was printed
        sized = total is not None or hasattr(iterable, "__len__")
        super().__init__(iterable, total=total, bar_format=LINE_FORMAT if sized else LINE_FORMAT_UNSIZED,
                         leave=False, smoothing=0, mininterval=0, miniters=1, **kwargs)

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


def progress(iterable=None, total=None, desc=None, unit="it", file=None):
    """A tqdm bar over `iterable` (or updated by hand up to `total`) on stderr: drawn in place on a
    terminal, plain lines otherwise, silent on torchrun ranks other than 0."""
    file = file or sys.stderr
    kind = Bar if getattr(file, "isatty", lambda: False)() else Lines
    return kind(iterable, total=total, desc=desc, unit=unit, file=file, disable=not parallel.is_main(),
                dynamic_ncols=True)
