"""Progress of the long loops: a tqdm bar on a terminal, nothing on torchrun ranks other than 0, and in a log file
(`> run.log`, where a bar redrawn in place is one unreadable line of carriage returns) or without tqdm, whole lines:
the first at once, then one per tenth of the work or LINE_SECONDS, and the last at the end. The rate leaves out the
time in `with bar.pause():` blocks (distill.py's evaluations, which would otherwise count as slow steps), and the time
left adds their mean for each one still to come, so a first evaluation does not make a 20-minute run read 4 hours.
"""
import contextlib
import statistics
import sys
import time

from utils import is_main

try:
    from tqdm import tqdm
except ImportError:  # optional: without it, progress comes as lines on a terminal too
    tqdm = None

LINE_SECONDS, LINE_FRACTION = 60, 0.1


def clock(seconds):
    """12:05, or 1:02:03 past an hour (tqdm's format)."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class Pauses:
    """What both kinds of bar share: the time in pause() blocks, kept out of the rate and added to the time left."""

    def count_pauses(self, pauses_left):
        self.pauses, self.pauses_left = [], pauses_left

    @contextlib.contextmanager
    def pause(self):
        start = time.monotonic()
        try:
            yield
        finally:
            self.pauses.append(time.monotonic() - start)

    def timing(self, elapsed):
        """(rate in units a second outside the pauses, seconds left), or (None, None) before any unit."""
        done, working = self.n - self.initial, elapsed - sum(self.pauses)
        if done <= 0 or working <= 0:
            return None, None
        later = statistics.mean(self.pauses) * self.pauses_left(self.n) if self.pauses else 0
        return done / working, (self.total - self.n) * working / done + later

    def speed(self, rate):
        return (f"?{self.unit}/s" if rate is None else f"{rate:.2f}{self.unit}/s" if rate >= 1
                else f"{1 / rate:.2f}s/{self.unit}")


class Lines(Pauses):
    """The bar's figures as whole lines: `desc: 40% 20/50 [00:12<00:18, 1.67img/s, postfix]`."""

    def __init__(self, total, desc, unit, initial, file, disable, pauses_left):
        self.total, self.desc, self.unit, self.file, self.disable = total, desc, unit, file, disable
        self.n = self.initial = initial
        self.start, self.postfix, self.last_line = time.monotonic(), "", None  # last_line: (time, n, postfix)
        self.count_pauses(pauses_left)

    def __enter__(self):
        self.print_line()
        return self

    def __exit__(self, *exc):
        if self.last_line[1:] != (self.n, self.postfix):
            self.print_line()  # the final figures: how long the whole loop took

    def update(self, n=1):
        self.n += n
        seconds, done, _ = self.last_line
        if time.monotonic() - seconds >= LINE_SECONDS or self.n - done >= LINE_FRACTION * self.total:
            self.print_line()

    def set_postfix_str(self, text, refresh=False):
        self.postfix = text

    def __str__(self):
        elapsed = time.monotonic() - self.start
        rate, left = self.timing(elapsed)
        return (f"{self.desc}: {100 * self.n / max(self.total, 1):3.0f}% {self.n}/{self.total} "
                f"[{clock(elapsed)}<{'?' if left is None else clock(left)}, {self.speed(rate)}"
                f"{', ' * bool(self.postfix)}{self.postfix}]")

    def print_line(self):
        self.last_line = (time.monotonic(), self.n, self.postfix)
        if not self.disable:
            self.file.write(f"{self}\n")
            self.file.flush()


class Above:
    """stdout while a bar is drawn: each whole line is written with every bar cleared first and redrawn after it
    (tqdm.write misses bars on stderr while stdout is redirected, and a printed line then ran into the bar's)."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text):
        self.pending += text
        if "\n" in self.pending:
            lines, self.pending = self.pending.rsplit("\n", 1)
            with tqdm.get_lock():
                bars = [bar for bar in tqdm._instances if not bar.disable]
                for bar in bars:
                    bar.clear(nolock=True)
                self.stream.write(lines + "\n")
                self.stream.flush()
                for bar in bars:
                    bar.refresh(nolock=True)
        return len(text)

    def flush(self):
        self.stream.flush()


if tqdm is not None:
    class Terminal(tqdm, Pauses):
        """A bar drawn in place; what the loop prints meanwhile goes above it (Above)."""
        monitor_interval = 0  # no monitor thread: mtt/data.py forks its decoding workers while a bar is open
        FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{left}, {speed}{postfix}]"

        def __init__(self, *args, pauses_left, **kwargs):
            self.count_pauses(pauses_left)  # before tqdm draws the bar the first time
            super().__init__(*args, bar_format=self.FORMAT, **kwargs)

        @property
        def format_dict(self):
            """tqdm's figures, and the rate and time left that keep the pauses apart (Pauses)."""
            figures = super().format_dict
            rate, left = self.timing(figures["elapsed"])
            return {**figures, "left": "?" if left is None else clock(left), "speed": self.speed(rate)}

        def __enter__(self):
            self.printing_above = contextlib.ExitStack()
            if not self.disable and not isinstance(sys.stdout, Above):
                self.printing_above.enter_context(contextlib.redirect_stdout(Above(sys.stdout)))
            return super().__enter__()

        def __exit__(self, *exc):
            self.printing_above.close()
            return super().__exit__(*exc)


def progress(total, desc, unit="it", initial=0, file=None, pauses_left=lambda n: 0):
    """A bar from `initial` to `total` on stderr, as a context manager, so that what the loop prints goes above it;
    `with bar.pause():` around work that is not the units' (pauses_left(n): how many such blocks are to come)."""
    file = file or sys.stderr
    if tqdm is None or not getattr(file, "isatty", lambda: False)():
        return Lines(total, desc, unit, initial, file, not is_main(), pauses_left)
    return Terminal(total=total, desc=desc, unit=unit, initial=initial, file=file, smoothing=0, disable=not is_main(),
                    dynamic_ncols=True, leave=not tqdm._instances, pauses_left=pauses_left)  # a bar within a bar goes
