"""A torchrun job that fails ends with one line from one process, not with tracebacks or a hang:
bad input that rank 0 finds or every rank finds alike, and a rank that is killed or stops answering
in the middle of a training step."""
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest
from helpers import TINY, one_line_error

import eval as eval_script

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def command(*argv):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, argv)]


def torchrun(*argv, timeout=180):
    return subprocess.run(command(*argv), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def our_lines(stderr):
    """The lines the scripts print for a failure (not the launcher's report of the exit)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "error (rank"))]


def test_bad_input_rank_0_finds_is_one_line_from_rank_0(buffers, tmp_path):
    (tmp_path / "in_the_way").write_text("")
    result = torchrun("distill.py", *TINY, "--buffer_path", buffers, "--save_path", tmp_path / "in_the_way")
    assert result.returncode != 0
    assert our_lines(result.stderr) == [f"error: --save_path {tmp_path / 'in_the_way'}: a file is in the way "
                                        f"(not a folder)"]
    assert "Connection closed by peer" not in result.stderr and "gloo" not in result.stderr.lower()


@pytest.mark.parametrize("case", ["missing", "not_a_tensor", "ipc_too_large"])
def test_bad_input_every_rank_finds_is_one_line_from_rank_0(tmp_path, case):
    """eval.py reads its input on every rank: the verdict is said once, as one process says it."""
    (tmp_path / "images_x.pt").write_text("not a torch file")
    (tmp_path / "labels_x.pt").write_text("not a torch file")
    flags = {"missing": ["--syn_path", tmp_path / "none"], "not_a_tensor": ["--syn_path", tmp_path / "images_x.pt"],
             "ipc_too_large": ["--baseline", "random", "--ipc", "1000"]}[case]
    argv = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--device", "cpu", *flags]
    result = torchrun("eval.py", *argv)
    assert result.returncode != 0
    assert our_lines(result.stderr) == [one_line_error(eval_script.main, argv)]


def test_a_verdict_every_rank_reaches_in_a_step_is_one_line_from_rank_0(buffers, tmp_path):
    """The set is replicated: a step that diverges stops every rank alike, and only rank 0 says so."""
    result = torchrun("distill.py", *TINY, "--buffer_path", buffers, "--lr_img", "1e12", "--Iteration", "1",
                      "--save_path", tmp_path / "run")
    assert result.returncode != 0
    lines = our_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: images reached"), lines


def in_second_step(tmp_path, rank, action):
    """A script that runs distill.py, `rank` doing `action` (a line of Python) inside its second training step."""
    wrapper = tmp_path / f"rank{rank}_in_step.py"
    wrapper.write_text(
        "import os, runpy, signal, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from mtt import matching\n"
        "real, calls = matching.BACKWARD[False], []\n"
        "def step(*args):\n"
        "    calls.append(1)\n"
        f"    if os.environ['RANK'] == '{rank}' and len(calls) == 2:\n"
        f"        {action}\n"
        "    return real(*args)\n"
        "matching.BACKWARD[False] = step\n"
        f"runpy.run_path({str(REPO / 'distill.py')!r}, run_name='__main__')\n")
    return wrapper


def test_a_rank_that_stops_answering_ends_the_job_with_a_line_naming_it(buffers, tmp_path):
    """Rank 1 sleeps inside its second training step (as a stopped process would): with
    --step_timeout 3 rank 0 gives up on the step's collective, names rank 1, and the job ends in
    seconds, not after the hours evaluations may wait."""
    start = time.monotonic()
    result = torchrun(in_second_step(tmp_path, 1, "time.sleep(600)"), *TINY, "--buffer_path", buffers,
                      "--Iteration", "4", "--step_timeout", "3", "--save_path", tmp_path / "run")
    assert result.returncode != 0 and time.monotonic() - start < 120
    assert our_lines(result.stderr) == ["error: rank 1 stopped answering: a training step's collective waited for it "
                                        "past its timeout (--step_timeout); the job stops here"]
    assert (tmp_path / "run" / "checkpoint.pt").exists()  # iteration 0's evaluation was saved before


def test_a_rank_that_is_killed_ends_the_job_with_a_line_naming_it(buffers, tmp_path):
    """Rank 1 is killed (kill -9) inside its second training step: rank 0's collective fails
    ("Connection reset by peer"), or torchrun's agent, seeing the death first, SIGTERMs it; either
    way rank 0 names rank 1 in one line. The one traceback left is the launcher's report of the
    exit (its ChildFailedError), not one of our ranks' (those would read "[rank0]: Traceback")."""
    result = torchrun(in_second_step(tmp_path, 1, "os.kill(os.getpid(), signal.SIGKILL)"), *TINY,
                      "--buffer_path", buffers, "--Iteration", "4", "--save_path", tmp_path / "run")
    assert result.returncode != 0
    assert our_lines(result.stderr) == ["error: rank 1 stopped (its connection closed): the job stops here"]
    tracebacks = [line for line in result.stderr.splitlines() if "Traceback" in line]
    assert tracebacks == ["Traceback (most recent call last):"] and "ChildFailedError" in result.stderr
    assert "by peer" not in result.stderr and "KeyboardInterrupt" not in result.stderr


def test_a_rank_0_that_stops_answering_is_named_by_rank_1(buffers, tmp_path):
    """Rank 0 is stopped (SIGSTOP) inside its second training step, so it cannot say anything: after
    --step_timeout rank 1 names it. torchrun's agent then SIGTERMs rank 0, which a stopped process
    holds, and SIGKILLs it 30 s later; the test kills it as soon as the line is out."""
    pid_file, log = tmp_path / "rank0.pid", tmp_path / "stderr"
    stops = f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); os.kill(os.getpid(), signal.SIGSTOP)"
    argv = [in_second_step(tmp_path, 0, stops), *TINY, "--buffer_path", buffers, "--Iteration", "4",
            "--step_timeout", "3", "--save_path", tmp_path / "run"]
    with open(log, "w") as stderr:
        job = subprocess.Popen(command(*argv), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not our_lines(log.read_text()) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if pid_file.exists():
            with suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)  # a stopped process takes SIGKILL too
        job.wait(60)
    assert our_lines(log.read_text()) == ["error: rank 0 stopped answering: a training step's collective waited for "
                                          "it past its timeout (--step_timeout); the job stops here"]
    assert job.returncode != 0
