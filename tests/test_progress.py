"""Progress: a bar on a terminal with what the loop prints above it, whole lines in a file,
nothing on ranks other than 0."""
import io
import sys

import pytest
from tqdm.contrib import DummyTqdmFile

from mtt import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True




def test_progress_prints_whole_lines_when_not_on_a_terminal(capsys):
    with progress.progress(total=50, desc="work", unit="img") as bar:
        for step in range(25):
            bar.update(2)
            bar.set_postfix_str(f"loss={step / 10:.4f}")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split("%")[0] for line in lines] == [f"work: {p:3d}" for p in range(0, 101, 12)] + ["work: 100"]
    assert lines[0].startswith("work:   0% 0/50 [00:00<?") and lines[-1].startswith("work: 100% 50/50 [")
    assert lines[-1].endswith(", loss=2.4000]")


def test_progress_prints_a_line_when_enough_time_has_passed_however_little_was_done(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0)
    with progress.progress(total=1000, desc="slow") as bar:
        for _ in range(5):
            bar.update(1)
    assert [line.split(" [")[0] for line in capsys.readouterr().err.splitlines()] == [
        f"slow:   0% {n}/1000" for n in range(6)]


@pytest.mark.parametrize("file", [None, Terminal()], ids=["lines", "terminal"])
def test_progress_is_silent_on_other_ranks(capsys, monkeypatch, file):
    monkeypatch.setenv("RANK", "1")
    with progress.progress(total=7, desc="work", file=file) as bar:
        bar.update(7)
    assert capsys.readouterr() == ("", "") and (file is None or file.getvalue() == "")


def test_on_a_terminal_what_the_loop_prints_goes_above_the_bar(capsys):
    screen, stdout = Terminal(), sys.stdout
    with progress.progress(total=3, desc="work", file=screen) as bar:
        assert isinstance(sys.stdout, DummyTqdmFile)  # print clears the bar, writes, and redraws it
        for step in range(3):
            print(f"line {step}")
            bar.update()
    assert sys.stdout is stdout
    assert capsys.readouterr().out == "line 0\nline 1\nline 2\n"
    assert "\r" in screen.getvalue() and "work: 100%" in screen.getvalue()
