"""The plumbing the three scripts share: flag parsing, safe writes, one-line reading errors."""
import ctypes
import os
import subprocess
import sys

import pytest
import torch

import utils
from mtt import flags, memory, parallel
from mtt.augment import DSA_STRATEGY
from utils import UsageError


def exits(code):
    def main():
        sys.exit(code)
    return main


def interrupted():
    raise KeyboardInterrupt


@pytest.mark.parametrize("main,status,said", [
    (lambda: None, 0, ""), (exits(None), 0, ""), (exits(2), 2, ""),  # 2: argparse's status
    (exits("error: --x is bad"), 1, "error: --x is bad\n"), (interrupted, 130, "stopped by Ctrl-C\n")])
def test_the_exit_status_and_line_of_a_script(monkeypatch, capsys, main, status, said):
    monkeypatch.setattr(parallel.signal, "signal", lambda *args: None)  # the suite's own SIGTERM handling stays
    monkeypatch.delenv("RANK", raising=False)
    assert parallel.exit_status(main) == status
    assert capsys.readouterr().err == said


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "file.pt"
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with utils.atomic_path(target) as tmp:
        torch.save(torch.arange(3), tmp)
    assert [p.name for p in tmp_path.iterdir()] == ["file.pt"]


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without the first fsync a renamed file can be empty after a power loss; without the second
    the rename itself can be lost."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "file.pt"
    with utils.atomic_path(target) as tmp:
        torch.save(torch.arange(3), tmp)
    assert events == [("fsync", str(tmp)), ("replace", str(target)), ("fsync", str(tmp_path))]


def parser():
    parser = flags.Parser("test")
    flags.add_common_args(parser)
    flags.switch(parser, "--flag", "a switch")
    return parser


@pytest.mark.parametrize("argv,expected", [
    ([], (True, False, False)), (["--zca"], (True, True, False)), (["--flag"], (True, False, True)),
    (["--dsa", "False", "--zca", "True", "--flag", "false"], (False, True, False)),
    (["--dsa", "0", "--zca", "yes", "--flag", "1"], (False, True, True)),
])
def test_every_boolean_flag_reads_true_and_false_alike(argv, expected):
    args = flags.parse(parser(), argv)
    assert (args.dsa, args.zca, args.flag) == expected
    assert args.augmentation == (DSA_STRATEGY if args.dsa else None)


@pytest.mark.parametrize("argv,message", [
    (["--dsa", "yes please"], "argument --dsa: expected True or False, not 'yes please'"),
    (["--flag", "maybe"], "argument --flag: expected True or False, not 'maybe'"),
    (["--seed", "99999999999999999999"], "argument --seed: must be in 0..2^63-1, not 99999999999999999999"),
    (["--batch_train", "1.5"], "argument --batch_train: expected an integer from 1 to 2^31-1, not '1.5'"),
    (["--res", "inf"], "argument --res: expected an integer from 1 to 2^31-1, not 'inf'"),
    (["--dataset", "CIFAR11"], "argument --dataset: invalid choice: 'CIFAR11'"),
])
def test_a_bad_flag_is_one_usage_error(argv, message):
    with pytest.raises(UsageError) as raised:
        flags.parse(parser(), argv)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "0"])
def test_a_learning_rate_is_positive_and_finite(text):
    with pytest.raises(Exception, match="a positive number up to"):
        flags.positive_float(text)
    assert flags.positive_float("1e-3") == 1e-3


@pytest.mark.parametrize("content,message", [
    (b"{", "cannot read {path} as a thing (Expecting property name"),
    (b"[1, 2]", "{path} is not a thing: it holds a JSON list, not an object; mend it"),
])
def test_json_that_is_not_an_object_is_one_line(tmp_path, content, message):
    path = tmp_path / "file.json"
    path.write_bytes(content)
    with pytest.raises(UsageError) as raised:
        utils.load_json(path, "a thing", fix="mend it")
    assert str(raised.value).startswith(message.format(path=path))


def test_a_torch_file_that_is_not_one_is_one_line(tmp_path):
    path = tmp_path / "file.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(UsageError, match=r"cannot read .*file.pt as a checkpoint \(UnpicklingError\); move it away"):
        utils.load_torch(path, "a checkpoint", fix="move it away")


FAULTS_OF_TEN_64MB_TENSORS = """
import resource, sys, torch
from mtt import parallel
if sys.argv[1] == "keep":
    parallel.keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # the heap settles: a small allocation may take the start of a freed block
    torch.ones(2**24).sum()  # 64 MB in float32, written then freed
rounds = []
for _ in range(3):  # the least of three rounds: one round of CI's busy run once mapped one tensor afresh
    before = faults()
    for _ in range(10):
        torch.ones(2**24).sum()
    rounds.append(faults() - before)
print(min(rounds))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="glibc's malloc only")
def test_memory_freed_by_torch_is_reused_without_page_faults():
    """A 64 MB tensor is over glibc's largest mmap threshold (32 MB): by default each allocation maps
    16,384 fresh 4 KB pages that fault in when written. Once freed memory is kept, a settled heap
    reuses them. In a fresh process: the suite's own allocations would decide where tensors land."""
    def faults(mode):
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_TEN_64MB_TENSORS, mode], cwd=utils.REPO,
                             capture_output=True, text=True, check=True)
        return int(run.stdout)

    assert faults("default") > 10 * 16_000 and faults("keep") < 1000


def test_tensors_that_would_not_fit_on_the_gpu_are_one_line(monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 2**30)
    images = torch.zeros(1).expand(2**29)  # 2 GB of float32 that take no memory here
    with pytest.raises(UsageError, match=r"^the images need 2.00 GB on cuda:0, more than its 1.00 GB free; free the "
                                         r"GPU or use --device cpu$"):
        memory.check_room(memory.moving([images], torch.device("cuda:0")), "the images need", torch.device("cuda:0"))
    # on the CPU they are in memory already
    memory.check_room(memory.moving([images], torch.device("cpu")), "the images need", torch.device("cpu"))
