"""A process killed (SIGKILL: no handler runs, its temporary files stay) at every point of a save,
then started again: the folder ends as the uninterrupted run's, byte for byte. The kill is real: a
forked copy of the test process runs the script and kills itself at the named point, so its
temporary files belong to a dead process, as after a crash."""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_distill, small

import buffer
import eval as eval_script
from mtt import data, run_folder, zca
from mtt.trajectories import SIDECAR, buffer_dir

# Commits at 0, 4 and 5; the kills strike the one of 4 (at seed 2 its evaluation improves on 0's)
RUN = ["--Iteration", "5", "--eval_it", "4", "--seed", "2", "--resume"]
KILLED_COMMIT = 4
# What the commit of iteration 4 renames, in order: the journal, the checkpoint first, the sets (an
# improved evaluation: best and its own iteration's), the grid, the curves, the journal marked done.
RENAMES = [run_folder.JOURNAL, "checkpoint.pt", "images_best.pt", "labels_best.pt", "syn_lr_best.pt", "lr_best.pt",
           "images_4.pt", "labels_4.pt", "syn_lr_4.pt", "lr_4.pt", "synthetic_4.png", "curves.png", run_folder.JOURNAL]
# Nothing is written between two renames of the files: a kill just after one leaves the folder as a kill just
# before the next does
KILL_POINTS = ["writing its files"] + [f"before rename {k + 1} ({name})" for k, name in enumerate(RENAMES)] \
    + [f"after rename {len(RENAMES)} ({RENAMES[-1]})"]


def killed_at(run, renames=None, writes=None, counting=lambda: True):
    """run() in a forked child that SIGKILLs itself just before its renames[0]-th os.replace (with
    renames[1] "after": just after it) or its writes-th run_folder file, counting only while counting()."""
    pid = os.fork()
    if pid == 0:
        try:
            count, replace, file_bytes = {"renames": 0, "writes": 0}, os.replace, run_folder.file_bytes

            def kill_at(kind, target, when):
                if target and counting() and count[kind] == target[0] and target[1] == when:
                    os.kill(os.getpid(), signal.SIGKILL)

            def replacing(source, target):
                count["renames"] += counting()
                kill_at("renames", renames, "before")
                replace(source, target)
                kill_at("renames", renames, "after")

            def writing(name, value):
                count["writes"] += counting()
                kill_at("writes", writes and (writes, "before"), "before")
                return file_bytes(name, value)

            os.replace, run_folder.file_bytes = replacing, writing
            run()
        finally:
            os._exit(3)  # the kill point was never reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child exited with {status}"


def kill_point(point):
    """killed_at's arguments for a KILL_POINTS entry."""
    if point == "writing its files":
        return {"writes": 3}  # the third of the commit's temporary files
    when, _, k = point.split()[:3]
    return {"renames": (int(k), when)}


def folder_contents(folder):
    """{name: bytes} of a run folder, log.jsonl's rows without their timings (the one thing that
    differs from run to run); a leftover temporary file or lock of a writer shows as a name."""
    found = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name == run_folder.LOG:
            found[path.name] = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                                for line in path.read_text().splitlines()]
        elif path.name != ".lock":
            found[path.name] = path.read_bytes()
    return found


def distill_in(buffers, parent):
    """distill.py's RUN into {parent}/run, named by the relative path "run" (checkpoint.pt and
    run.json record --save_path, so that every run's files compare byte for byte)."""
    parent.mkdir(exist_ok=True)
    here = os.getcwd()
    os.chdir(parent)  # contextlib.chdir is Python 3.11's
    try:
        run_distill(buffers, Path("run"), *RUN)
    finally:
        os.chdir(here)
    return parent / "run"


@pytest.fixture(scope="module")
def straight(buffers, tmp_path_factory):
    """The uninterrupted run, and the premise of RENAMES: iteration 4's evaluation improved."""
    folder = distill_in(buffers, tmp_path_factory.mktemp("straight"))
    assert [row["best_it"] for row in folder_contents(folder)[run_folder.LOG] if row["type"] == "evaluation"] \
        == [0, 4, 5]
    return folder_contents(folder)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_in_a_save_then_a_resume_leaves_the_uninterrupted_runs_files(buffers, tmp_path, straight, point):
    """Killed at `point` of iteration 4's save, then resumed: every file of the uninterrupted run,
    byte for byte. The same when eval.py reads the killed folder before the resume (it finishes the
    save as the resume would)."""
    committing, commit = [False], run_folder.commit

    def commit_counted(folder, files, iteration):
        committing[0] = iteration == KILLED_COMMIT
        commit(folder, files, iteration)

    def run():
        run_folder.commit = commit_counted
        distill_in(buffers, tmp_path / "killed")

    killed_at(run, **kill_point(point), counting=lambda: committing[0])
    (tmp_path / "read_first").mkdir()
    shutil.copytree(tmp_path / "killed" / "run", tmp_path / "read_first" / "run")
    eval_script.main(["--syn_path", str(tmp_path / "read_first" / "run"), "--num_eval", "1", "--epoch_eval_train", "1",
                      "--device", "cpu"])
    for parent in ("killed", "read_first"):
        assert folder_contents(distill_in(buffers, tmp_path / parent)) == straight, parent


# ---------------------------------------------------------------------------------------------
# buffer.py's files and the cache: temporary files that no journal lists, cleaned up by the next start

BUFFER = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--num_experts", "2", "--save_interval", "1",
          "--train_epochs", "1", "--dsa", "False", "--device", "cpu"]
BUFFER_RENAMES = ["replay_buffer_0.npy", SIDECAR, "replay_buffer_1.npy", SIDECAR]


def experts_by_index(root):
    directory = Path(buffer_dir(str(root), "FashionMNIST-mini", "ConvNetW8", False))
    meta = json.loads((directory / SIDECAR).read_text())
    leftovers = [p.name for p in directory.iterdir() if "mtt-partial" in p.name or p.name.endswith(".orphan")]
    return {e["index"]: np.load(directory / e["file"])[e["row"]] for e in meta["experts"]}, leftovers


def points(renames):
    return [f"{when} rename {k + 1} ({name})" for k, name in enumerate(renames) for when in ("before", "after")]


@pytest.fixture(scope="module")
def straight_experts(mini, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight_experts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(buffer, "get_dataset", lambda *args: small(mini))
        buffer.main(BUFFER + ["--buffer_path", str(root)])
    return experts_by_index(root)[0]


@pytest.mark.parametrize("point", points(BUFFER_RENAMES))
def test_a_kill_while_buffer_py_saves_loses_no_finished_expert(tmp_path, small_data, straight_experts, point):
    """Killed at `point`, then run again: every expert whose file was complete is listed, equal to
    the uninterrupted run's of the same index, and no temporary file is left."""
    killed_at(lambda: buffer.main(BUFFER + ["--buffer_path", str(tmp_path)]), **kill_point(point))
    buffer.main(BUFFER + ["--buffer_path", str(tmp_path)])
    found, leftovers = experts_by_index(tmp_path)
    renamed = int(point.split()[2]) - point.startswith("before")  # renames done before the kill
    assert leftovers == [] and len(found) == 2 + (renamed >= 1) + (renamed >= 3)
    for index, expected in straight_experts.items():
        assert np.array_equal(found[index], expected), index


CACHE_RENAMES = ["zca", "whitened train", "whitened test"]


@pytest.fixture
def one_thread(monkeypatch):
    """The ZCA fit on one thread: OpenMP's workers are not forked, so a child that asks for several waits forever."""
    monkeypatch.setattr(zca, "cpu_threads", lambda: 1)


@pytest.fixture(scope="module")
def whitened():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zca, "cpu_threads", lambda: 1)
        found = data.get_dataset("FashionMNIST-mini", None, zca=True)
    return found.images_train, found.images_test


@pytest.mark.parametrize("point", points(CACHE_RENAMES))
def test_a_kill_while_the_cache_is_written_leaves_a_cache_that_reads_the_same(tmp_path, one_thread, whitened, point):
    """Killed at `point` of the ZCA cache's first writes, then loaded again: the same whitened
    images as without a cache, and no temporary file left in it."""
    killed_at(lambda: data.get_dataset("FashionMNIST-mini", str(tmp_path), zca=True), **kill_point(point))
    found = data.get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    assert torch.equal(found.images_train, whitened[0]) and torch.equal(found.images_test, whitened[1])
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != ".lock" and not p.name.startswith(
        ("zca-", "whitened-"))] == []
