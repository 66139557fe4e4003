"""The scripts under torchrun: two CPU processes with the Gloo backend give what one process gives."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrun_gradients import CASES, gradients

import distill
from mtt.trajectories import buffer_dir, numbered_files

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
TINY = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW16", "--ipc", "2", "--batch_syn", "3",
        "--syn_steps", "3", "--expert_epochs", "1", "--max_start_epoch", "1", "--num_eval", "2",
        "--epoch_eval_train", "2", "--lr_img", "100", "--lr_lr", "1e-5", "--device", "cpu"]


def torchrun(*argv, processes=2, timeout=240):
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 ARGV` from the repository root."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *map(str, argv)]
    return subprocess.run(command, cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=timeout)


def python(*argv, timeout=240):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=ONE_THREAD, capture_output=True,
                          text=True, timeout=timeout)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_the_gradient_of_an_iteration_split_over_two_processes_equals_one_process(tmp_path):
    """Unroll and low-memory replay, DSA on, texture crops and soft labels, minibatches of 3, 3 and
    1 image split 2+1, 2+1 and 1+0: every gradient within 1e-5 of the one-process gradient."""
    result = torchrun("tests/torchrun_gradients.py", tmp_path / "grads.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "grads.pt", weights_only=False)
    assert saved["world"] == 2
    for case in CASES:
        loss, grads = gradients(*case)
        split_loss, split_grads = saved["results"][case]
        assert abs(split_loss.item() - loss.item()) <= 1e-6 * loss.item(), case
        assert sorted(split_grads) == sorted(grads)
        for name in grads:
            assert grads[name].abs().sum() > 0 and relative_error(split_grads[name], grads[name]) <= 1e-5, (case, name)


def test_distill_under_torchrun_gives_the_one_process_images_and_resumes(buffers, tmp_path):
    flags = TINY + ["--buffer_path", buffers, "--eval_it", "2"]
    distill.main([*map(str, flags), "--Iteration", "4", "--save_path", str(tmp_path / "one")])
    first = torchrun("distill.py", *flags, "--Iteration", "2", "--save_path", tmp_path / "two")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun("distill.py", *flags, "--Iteration", "4", "--save_path", tmp_path / "two", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed") == 1  # only rank 0 prints
    load = lambda run, name: torch.load(tmp_path / run / name, weights_only=True)
    assert not torch.equal(load("one", "images_4.pt"), load("one", "images_0.pt"))
    for name in ("images_4.pt", "syn_lr_4.pt"):
        one, two = load("one", name), load("two", name)
        assert (one - two).abs().max() <= 1e-4 * one.abs().max(), name
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]
    iterations = [[(row["it"], row["expert"], row["start_epoch"]) for row in log if row["type"] == "iteration"]
                  for log in logs]
    assert iterations[0] == iterations[1] and len(iterations[0]) == 4


def test_a_failing_rank_ends_the_job_with_its_line_not_a_hang(buffers, tmp_path):
    """Rank 1 is given a buffer path with no experts: the job must stop with rank 1's one-line error
    and a non-zero status while rank 0 waits in a collective (subprocess's timeout catches a hang)."""
    wrapper = tmp_path / "rank1_elsewhere.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"if os.environ['RANK'] == '1':\n    sys.argv = [a.replace({str(buffers)!r}, {str(tmp_path / 'none')!r}) "
        "for a in sys.argv]\n"
        f"sys.path.insert(0, {str(REPO)!r})\nrunpy.run_path({str(REPO / 'distill.py')!r}, run_name='__main__')\n")
    result = torchrun(wrapper, *TINY, "--buffer_path", buffers, "--Iteration", "2",
                      "--save_path", tmp_path / "run", timeout=180)
    assert result.returncode != 0
    assert "error (rank 1): no expert trajectories in" in result.stderr
    assert not list((tmp_path / "run").glob("images_*.pt"))


@pytest.mark.parametrize("gsam", [[], ["--rho_max", "0.05", "--alpha", "0.3"]], ids=["sgd", "gsam"])
def test_buffer_under_torchrun_writes_the_experts_of_one_process(tmp_path, gsam):
    """Whole files per process (file j on rank j mod 2, so rank 1 has none in the second round):
    the same arrays, bit for bit, one sidecar equal to one process's, and rank 0 printing every
    expert's progress once, in one process's order (one epoch each)."""
    flags = ["buffer.py", "--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--num_experts", "3",
             "--train_epochs", "1", "--save_interval", "1", "--dsa", "False", "--device", "cpu", *gsam]
    one = python(*flags, "--buffer_path", tmp_path / "one")
    two = torchrun(*flags, "--buffer_path", tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    directories = [Path(buffer_dir(str(tmp_path / run), "FashionMNIST-mini", "ConvNetW8", False))
                   for run in ("one", "two")]
    arrays = [[np.load(path) for path in numbered_files(directory, "npy")] for directory in directories]
    assert len(arrays[0]) == len(arrays[1]) == 3
    assert all(np.array_equal(a, b) for a, b in zip(*arrays))
    assert not np.array_equal(arrays[1][0][0, 1], arrays[1][0][0, 0])  # the experts trained
    sidecars = [json.loads((directory / "buffer.json").read_text()) for directory in directories]
    assert sidecars[0] == sidecars[1] and sidecars[1]["next_index"] == 3
    assert sidecars[1]["rho_max"] == (0.05 if gsam else 0)
    progress = lambda out: [re.sub(r", \d+ images/s, .*", "", line) for line in out.splitlines()
                            if line.startswith("expert ")]
    assert progress(two.stdout) == progress(one.stdout) and len(progress(one.stdout)) == 3
    assert [line for line in two.stdout.splitlines() if line.startswith("wrote ")] == [
        f"wrote {directories[1] / f'replay_buffer_{n}.npy'} (1 expert)" for n in range(3)]
    # the bar counts every rank's expert-epochs, 3 experts x 1 epoch, not rank 0's share (2)
    for out in (one.stderr, two.stderr):
        assert re.search(r"^experts x epochs: 100% 3/3 \[", out, re.M), out[-1000:]


def test_eval_and_its_scores_under_torchrun_equal_one_process(tmp_path):
    """eval.py --scores on a set (10 images, class ids): its five rows spread over two processes; the
    rows, the printed table, the scores and every accuracy they come from equal one process's."""
    (tmp_path / "set").mkdir()
    torch.save(torch.randn(10, 1, 28, 28), tmp_path / "set" / "images_best.pt")
    torch.save(torch.arange(10), tmp_path / "set" / "labels_best.pt")
    flags = ["eval.py", "--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--syn_path", tmp_path / "set",
             "--scores", "--num_eval", "3", "--epoch_eval_train", "2", "--epochs_full", "1", "--device", "cpu"]
    one = python(*flags, "--out", tmp_path / "one.json")
    two = torchrun(*flags, "--out", tmp_path / "two.json")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    found = [json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json")]
    assert found[0]["rows"] == found[1]["rows"] and found[0]["scores"] == found[1]["scores"]
    assert len(found[0]["rows"]) == 5 and (found[0]["processes"], found[1]["processes"]) == (1, 2)
    table = lambda out: [line for line in out.splitlines() if line.startswith(("set", "random", "full", "ConvNetW8"))]
    assert table(one.stdout) == table(two.stdout) and len(table(one.stdout)) == 7  # a header, 5 rows, the scores
    # a line per network, once each, the networks of rank 1 too: 5 rows x 3 networks, equal to one process's
    networks = lambda out: sorted(line for line in out.splitlines() if re.match(r"\[.* run [123]/3\] ", line))
    assert networks(one.stdout) == networks(two.stdout) and len(networks(two.stdout)) == 15
