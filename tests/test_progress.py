"""Progress: a bar on a terminal with what the loop prints above it, whole lines in a file,
nothing on ranks other than 0."""
import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from helpers import TINY, run_distill

from mtt import progress

REPO = Path(__file__).resolve().parent.parent
BAR = re.compile(r"[\w ]+: +\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]")  # a bar line, and nothing else


class Terminal(io.StringIO):
    def isatty(self):
        return True


def screen(text):
    """The lines a terminal shows after `text`: carriage returns, newlines and cursor-up (ESC [ A)
    are followed, characters overwrite what was there, other escapes are dropped."""
    lines, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|\r|\n|[^\x1b\r\n]", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [[]] * (row == len(lines))
        elif token == "\x1b[A":
            row = max(row - 1, 0)
        elif not token.startswith("\x1b"):
            lines[row] = lines[row] + [" "] * (col + 1 - len(lines[row]))
            lines[row][col] = token
            col += 1
    return ["".join(line).rstrip() for line in lines]


def test_on_a_real_terminal_every_printed_line_is_above_the_bars(buffers, tmp_path):
    """distill.py in a pseudo-terminal of 120 columns, with an evaluation's bar inside the run's:
    every line the screen ends with is either a bar alone or a printed line alone (a line printed
    without clearing the bars landed on the bar's line: `distill:  52%|...| 21/40 [...]it 00020/40`)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "distill.py", *TINY, "--buffer_path", str(buffers), "--save_path",
                                str(tmp_path / "run"), "--Iteration", "4", "--eval_it", "2", "--num_eval", "2",
                                "--epoch_eval_train", "3"], cwd=REPO, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert process.wait(timeout=120) == 0
    lines = [line for line in screen(output.decode()) if line]
    assert any(BAR.fullmatch(line) for line in lines)
    mixed = [line for line in lines if "%|" in line and not BAR.fullmatch(line)]
    assert mixed == []
    assert sum(line.startswith("[images ConvNetW16 run ") for line in lines) == 6  # 3 evaluations x 2 networks
    assert any(line.startswith("it 00000/4 loss ") for line in lines)
    assert f"distilling into {tmp_path / 'run'}" in lines  # where the run writes, said at start



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
        assert isinstance(sys.stdout, progress.Above)  # print clears the bar, writes, and redraws it
        for step in range(3):
            print(f"line {step}")
            bar.update()
    assert sys.stdout is stdout
    assert capsys.readouterr().out == "line 0\nline 1\nline 2\n"
    assert "\r" in screen.getvalue() and "work: 100%" in screen.getvalue()


@pytest.mark.parametrize("file", [None, Terminal()], ids=["lines", "terminal"])
def test_the_time_left_keeps_the_pauses_apart(capsys, monkeypatch, file):
    """distill.py's first evaluation (a pause of a minute) then one step of a second, of 100, with
    two evaluations still to come: 99 steps of a second and two minutes of evaluations, 03:39 left,
    at a rate of 1 step a second (counted with the pause, 1:40:39 and 61 s a step)."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with progress.progress(total=100, desc="distill", unit="step", file=file, pauses_left=lambda n: 2) as bar:
        if file is not None:
            bar._time = lambda: now[0]  # tqdm's own clock
            bar.start_t = now[0]
        with bar.pause():
            now[0] += 60
        now[0] += 1
        bar.update()
        shown = str(bar)
    assert re.search(r" 1/100 \[01:01<03:39, 1\.00step/s\]", shown), shown


def test_distills_bar_moves_within_a_long_iteration(buffers, tmp_path, capsys):
    """One iteration of 10 student steps: the bar counts steps, so it has lines inside the iteration
    (a run of few iterations of many steps sat at 0/1 until each ended)."""
    run_distill(buffers, tmp_path, "--Iteration", "1", "--syn_steps", "10")
    counts = re.findall(r"^distill: +\d+% (\d+)/10 ", capsys.readouterr().err, re.M)
    assert {"0", "5", "10"} <= set(counts)
