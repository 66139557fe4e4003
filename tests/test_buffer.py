import copy
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import replace
from functools import partial
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import locked_by_another_process, one_line_error

import buffer
from mtt.augment import DSA_STRATEGY
from mtt.training import train_epoch
from mtt.trajectories import Experts, buffer_dir, numbered_files
from networks import flatten_params, forward_flat, get_network, unflatten
from utils import set_seed

# A ConvNet of width 16 trains at ~1.7 s per epoch on the embedded set on 2 cores (width 32: ~5 s).
MODEL = "ConvNetW16"
TINY = ["--dataset", "FashionMNIST-mini", "--model", MODEL]
FAST = "ConvNetW8"  # for tests about files, seeds and steps: 0.1 s per sliced epoch


@pytest.fixture
def sliced(monkeypatch, mini):
    """buffer.py sees 512 training and 200 test images (two batches an epoch), for tests about
    files and seeds rather than learning."""
    small = replace(mini, images_train=mini.images_train[:512], labels_train=mini.labels_train[:512],
                    images_test=mini.images_test[:200], labels_test=mini.labels_test[:200])
    monkeypatch.setattr(buffer, "get_dataset", lambda *args: small)


def directory_of(buffer_path, model=MODEL):
    return buffer_dir(str(buffer_path), "FashionMNIST-mini", model, False)


def run(buffer_path, *flags, model=MODEL):
    buffer.main(["--dataset", "FashionMNIST-mini", "--model", model, "--buffer_path", str(buffer_path), *flags])
    return directory_of(buffer_path, model)


def load_all(directory):
    return [np.load(path) for path in numbered_files(directory, "npy")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real run, shared by the tests that inspect it: 2 experts x 2 epochs on the whole set."""
    out = StringIO()
    with redirect_stdout(out):
        directory = run(tmp_path_factory.mktemp("buffers"), "--num_experts", "2", "--train_epochs", "2",
                        "--save_interval", "2")
    return directory, out.getvalue()


def test_a_run_writes_one_array_of_experts_by_snapshots_by_parameters(trained):
    directory, _ = trained
    files = numbered_files(directory, "npy")
    num_params = sum(p.numel() for p in get_network(MODEL, 1, 10, (28, 28)).parameters())
    assert [f.name for f in files] == ["replay_buffer_0.npy"]
    array = np.load(files[0], mmap_mode="r")
    assert array.shape == (2, 3, num_params) and array.dtype == np.float32
    assert sorted(p.name for p in Path(directory).iterdir()) == [".lock", "buffer.json", "replay_buffer_0.npy"]


def test_the_sidecar_describes_the_run_and_every_expert(trained):
    directory, _ = trained
    meta = buffer.read_sidecar(directory)
    net = get_network(MODEL, 1, 10, (28, 28))
    expected = {"dataset": "FashionMNIST-mini", "model": MODEL, "channel": 1, "im_size": [28, 28], "num_classes": 10,
                "zca": False, "num_params": flatten_params(net).numel(),
                "param_shapes": [list(p.shape) for p in net.parameters()], "lr_teacher": 0.01, "train_epochs": 2,
                "batch_train": 256, "batch_real": 256, "dsa": True,
                "dsa_strategy": "color_crop_cutout_flip_scale_rotate",
                "mom": 0, "l2": 0, "decay": False, "rho_max": 0, "rho_min": 0, "alpha": 0, "adaptive": False, "seed": 0,
                "torch_version": torch.__version__, "next_index": 2}
    assert {key: meta[key] for key in expected} == expected
    assert {"subset", "res"} <= set(meta)
    assert [(e["file"], e["index"], e["row"], e["seed"]) for e in meta["experts"]] == [
        ("replay_buffer_0.npy", 0, 0, buffer.expert_seed(0, 0)),
        ("replay_buffer_0.npy", 1, 1, buffer.expert_seed(0, 1))]
    assert all(len(e["train_acc"]) == len(e["test_acc"]) == 2 for e in meta["experts"])


def test_snapshot_zero_is_the_seeded_initialisation(trained):
    """Expert k of a directory starts from set_seed(expert_seed(--seed, k)), as buffer.py documents."""
    directory, _ = trained
    array = np.load(numbered_files(directory, "npy")[0])
    for k in range(2):
        set_seed(buffer.expert_seed(0, k))
        assert torch.equal(torch.from_numpy(array[k, 0]), flatten_params(get_network(MODEL, 1, 10, (28, 28))))
    assert not np.array_equal(array[0, 0], array[1, 0])


def test_snapshot_t_is_the_network_after_epoch_t(trained, mini):
    """The network at snapshot t scores the test accuracy recorded for epoch t (instance norm:
    the flat forward is the network's eval-mode forward)."""
    directory, _ = trained
    array = np.load(numbered_files(directory, "npy")[0])
    expert = buffer.read_sidecar(directory)["experts"][1]
    net = get_network(MODEL, 1, 10, (28, 28))
    for t in (1, 2):
        with torch.no_grad():
            predicted = forward_flat(net, torch.from_numpy(array[1, t]), mini.images_test).argmax(1)
        assert (predicted == mini.labels_test).float().mean().item() == pytest.approx(expert["test_acc"][t - 1])


def test_the_experts_learn(trained):
    """Measured: test accuracy 0.566 and 0.643 after 2 epochs for these two experts, 0.54-0.68 over
    eight seeds. Chance is 0.1; asserting > 0.4 (4x chance) leaves 14 points below the worst seed."""
    directory, _ = trained
    for expert in buffer.read_sidecar(directory)["experts"]:
        assert expert["test_acc"][-1] > 0.4
        assert expert["train_acc"][-1] > 0.3


def test_one_progress_line_per_epoch_with_accuracy_speed_and_eta(trained):
    _, output = trained
    lines = [line for line in output.splitlines() if line.startswith("expert ")]
    pattern = r"expert (\d)/2 \(#\d\) epoch (\d)/2: train acc 0\.\d{4} test acc 0\.\d{4}, \d+ images/s, \d+m\d\ds left"
    assert [re.fullmatch(pattern, line).groups() for line in lines] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]


def test_the_same_seed_gives_bit_identical_buffers(tmp_path, sliced):
    flags = ["--num_experts", "2", "--train_epochs", "1"]
    first, second = run(tmp_path / "a", *flags, model=FAST), run(tmp_path / "b", *flags, model=FAST)
    other_seed = run(tmp_path / "c", *flags, "--seed", "1", model=FAST)
    assert np.array_equal(load_all(first)[0], load_all(second)[0])
    assert buffer.read_sidecar(first)["experts"] == buffer.read_sidecar(second)["experts"]
    assert not np.array_equal(load_all(first)[0], load_all(other_seed)[0])


def test_save_interval_one_writes_a_file_per_expert_and_leftovers_are_saved(tmp_path, sliced):
    directory = run(tmp_path, "--num_experts", "3", "--train_epochs", "1", "--save_interval", "1", model=FAST)
    assert [array.shape[0] for array in load_all(directory)] == [1, 1, 1]
    directory = run(tmp_path / "leftover", "--num_experts", "3", "--train_epochs", "1", "--save_interval", "2",
                    model=FAST)
    assert [array.shape[0] for array in load_all(directory)] == [2, 1]


def test_a_rerun_appends_new_experts(tmp_path, sliced):
    flags = ["--num_experts", "2", "--train_epochs", "1", "--save_interval", "1"]
    directory = run(tmp_path, *flags, model=FAST)
    before = load_all(directory)
    run(tmp_path, *flags, model=FAST)
    after = load_all(directory)
    assert [f.name for f in numbered_files(directory, "npy")] == [f"replay_buffer_{n}.npy" for n in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    first_run, second_run = np.concatenate(after[:2])[:, 0], np.concatenate(after[2:])[:, 0]
    assert not any(np.array_equal(a, b) for a in first_run for b in second_run)
    assert [e["index"] for e in buffer.read_sidecar(directory)["experts"]] == [0, 1, 2, 3]


def test_a_crash_mid_write_leaves_no_partial_file(tmp_path, sliced, monkeypatch):
    """3 experts, 2 per file: Ctrl-C during the third expert keeps the finished first file only."""
    calls = []

    def interrupted_on_third_expert(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 0.5

    monkeypatch.setattr(buffer, "accuracy", interrupted_on_third_expert)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--num_experts", "3", "--train_epochs", "1", "--save_interval", "2", model=FAST)
    directory = directory_of(tmp_path, FAST)
    assert sorted(p.name for p in Path(directory).iterdir()) == [".lock", "buffer.json", "replay_buffer_0.npy"]
    assert len(buffer.read_sidecar(directory)["experts"]) == 2

    monkeypatch.setattr(buffer, "accuracy", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(tmp_path / "first", "--num_experts", "1", "--train_epochs", "1", model=FAST)
    assert [p.name for p in Path(directory_of(tmp_path / "first", FAST)).iterdir()] == [".lock"]


def test_ctrl_c_says_the_num_experts_that_ends_with_the_experts_asked_for(tmp_path, sliced, monkeypatch):
    """4 experts asked, a file each, Ctrl-C in the third: 2 are kept, and the line's command (--num_experts
    2, not the same command, which added 4 more) ends with the 4 asked for. A Ctrl-C before training
    starts keeps the general line."""
    real_accuracy, calls = buffer.accuracy, []

    def interrupted_on_third_expert(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_accuracy(*args)

    monkeypatch.setattr(buffer, "accuracy", interrupted_on_third_expert)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(tmp_path, "--num_experts", "4", "--train_epochs", "1", "--save_interval", "1", model=FAST)
    directory = directory_of(tmp_path, FAST)
    assert str(stopped.value) == (
        f"stopped by Ctrl-C: 2 of the 4 experts this command asked for are complete and kept in {directory} (the file "
        f"being written was discarded); run it again with --num_experts 2 to add the other 2")
    assert len(buffer.read_sidecar(directory)["experts"]) == 2
    monkeypatch.setattr(buffer, "accuracy", real_accuracy)
    run(tmp_path, "--num_experts", "2", "--train_epochs", "1", "--save_interval", "1", model=FAST)
    assert [e["index"] for e in buffer.read_sidecar(directory)["experts"]] == [0, 1, 2, 3]
    assert len(load_all(directory)) == 4

    def stopped_while_loading(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(buffer, "load_data", stopped_while_loading)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(tmp_path, "--num_experts", "4", "--train_epochs", "1", "--save_interval", "1", model=FAST)
    assert str(stopped.value) == (
        f"stopped by Ctrl-C: the experts listed in {directory}/buffer.json are complete and kept; the file being "
        f"written was discarded; run the command again to add experts")


def test_decay_divides_the_learning_rate_by_ten_after_epoch_train_epochs_over_2_plus_1(tmp_path, monkeypatch, mini):
    """One batch an epoch and no momentum, so an epoch is one step -lr * grad; with the same seed
    both runs agree up to the decay (after 0-based epoch 5 // 2 + 1 = 3, as in the original),
    and the last step, from the same point with the same batch and augmentation, is a tenth."""
    small = replace(mini, images_train=mini.images_train[:256], labels_train=mini.labels_train[:256],
                    images_test=mini.images_test[:100], labels_test=mini.labels_test[:100])
    monkeypatch.setattr(buffer, "get_dataset", lambda *args: small)
    flags = ["--num_experts", "1", "--train_epochs", "5"]
    plain = load_all(run(tmp_path / "plain", *flags))[0][0]
    decayed = load_all(run(tmp_path / "decay", *flags, "--decay"))[0][0]
    assert np.array_equal(plain[:5], decayed[:5])
    step, decayed_step = plain[5] - plain[4], decayed[5] - decayed[4]
    assert np.abs(step).max() > 1e-4
    np.testing.assert_allclose(decayed_step, 0.1 * step, rtol=1e-3, atol=1e-7)


def error_of(*argv):
    return one_line_error(buffer.main, argv)


BAD_FLAGS = [
    (["--num_experts", "0"], "argument --num_experts: must be an integer from 1 to 2^31-1, not 0"),
    (["--train_epochs", "0"], "argument --train_epochs: must be an integer from 1 to 2^31-1, not 0"),
    (["--save_interval", "0"], "argument --save_interval: must be an integer from 1 to 2^31-1, not 0"),
    (["--batch_train", "0"], "argument --batch_train: must be an integer from 1 to 2^31-1, not 0"),
    (["--lr_teacher", "-0.01"],
     "argument --lr_teacher: must be a positive number up to 3.4e38 (float32's largest), not -0.01"),
    (["--lr_teacher", "0"], "argument --lr_teacher: must be a positive number up to 3.4e38 (float32's largest), not 0"),
    (["--mom", "-0.9"], "argument --mom: must be a number from 0 to 3.4e38 (float32's largest), not -0.9"),
    (["--rho_max", "-0.01"], "argument --rho_max: must be a number from 0 to 3.4e38 (float32's largest), not -0.01"),
    (["--rho_min", "-0.01"], "argument --rho_min: must be a number from 0 to 3.4e38 (float32's largest), not -0.01"),
    (["--alpha", "-0.3", "--rho_max", "0.01"],
     "argument --alpha: must be a number from 0 to 3.4e38 (float32's largest), not -0.3"),
    (["--rho_min", "0.02", "--rho_max", "0.01"], "--rho_min 0.02 is above --rho_max 0.01"),
    (["--alpha", "0.3"], "--alpha and --adaptive set up GSAM: give --rho_max too (GSAM is off at rho 0)"),
    (["--adaptive"], "--alpha and --adaptive set up GSAM: give --rho_max too (GSAM is off at rho 0)"),
    (["--seed", "-1"], "argument --seed: must be in 0..2^63-1, not -1"),
    (["--model", "ConvNetW7"], "argument --model: invalid choice: 'ConvNetW7' (choose from "),
    (["--device", "gpu"], "unknown --device 'gpu'; use cuda, cuda:N or cpu"),
    pytest.param(["--device", "cuda"],
                 "--device cuda: this machine has no CUDA GPU (torch sees none); use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flags_are_one_line_errors_before_any_folder_exists(tmp_path, flags, message):
    assert error_of(*TINY, "--buffer_path", str(tmp_path / "buffers"), *flags).startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_a_buffer_path_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    assert error_of(*TINY, "--buffer_path", str(not_a_directory)) == (
        f"error: --buffer_path {directory_of(not_a_directory)}: cannot create it (Not a directory)")
    monkeypatch.setattr(os, "access", lambda *args: False)  # a read-only folder (root may write to any)
    assert error_of(*TINY, "--buffer_path", str(tmp_path)) == (
        f"error: --buffer_path {directory_of(tmp_path)}: not writable")


def test_a_missing_dataset_is_one_line(tmp_path):
    message = error_of("--dataset", "Tiny", "--data_path", str(tmp_path / "nothing"), "--buffer_path", str(tmp_path))
    assert "Tiny ImageNet not found" in message


def test_a_rerun_with_other_settings_is_refused(tmp_path, sliced):
    directory = run(tmp_path, "--num_experts", "1", "--train_epochs", "1")
    error = error_of(*TINY, "--buffer_path", str(tmp_path), "--zca", "--train_epochs", "1")
    assert "zca False (this run: True)" in error
    assert "train_epochs 1 (this run: 2)" in error_of(*TINY, "--buffer_path", str(tmp_path), "--train_epochs", "2")
    sidecar = Path(directory) / buffer.SIDECAR  # a directory renamed by hand: the sidecar disagrees with the path
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "model": "ConvNetW32"}))
    assert f"model 'ConvNetW32' (this run: '{MODEL}')" in error_of(*TINY, "--buffer_path", str(tmp_path),
                                                                   "--train_epochs", "1")
    assert len(numbered_files(directory, "npy")) == 1


# ---------------------------------------------------------------------------------------------
# Import of the original's replay_buffer_{n}.pt


def original_buffer(path, experts, snapshots, model=MODEL, seed=0):
    """A file in the original's structure: experts x snapshots x [per-parameter tensors]."""
    torch.manual_seed(seed)
    shapes = [p.shape for p in get_network(model, 1, 10, (28, 28)).parameters()]
    trajectories = [[[torch.randn(shape) for shape in shapes] for _ in range(snapshots)] for _ in range(experts)]
    torch.save(trajectories, path)
    return trajectories


def test_the_original_buffers_import_exactly(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    originals = [original_buffer(old / f"replay_buffer_{n}.pt", experts, 3, seed=n) for n, experts in ((0, 2), (1, 1))]
    buffer.main([*TINY, "--import_pt", str(old), "--train_epochs", "2", "--buffer_path", str(tmp_path)])
    directory = directory_of(tmp_path)
    meta = buffer.read_sidecar(directory)
    shapes = [torch.Size(s) for s in meta["param_shapes"]]
    for trajectories, array in zip(originals, load_all(directory), strict=True):
        assert array.shape == (len(trajectories), 3, meta["num_params"])
        for expert, rows in zip(trajectories, array):
            for snapshot, row in zip(expert, rows):
                views = unflatten(torch.from_numpy(row), shapes)
                assert all(torch.equal(a, b) for a, b in zip(snapshot, views, strict=True))
    assert [(e["file"], e["row"], e["seed"], e["test_acc"]) for e in meta["experts"]] == [
        ("replay_buffer_0.npy", 0, None, []), ("replay_buffer_0.npy", 1, None, []),
        ("replay_buffer_1.npy", 0, None, [])]


def test_an_import_that_does_not_fit_the_model_is_refused(tmp_path):
    original_buffer(tmp_path / "replay_buffer_0.pt", 1, 3, model="ConvNetW32")
    argv = [*TINY, "--import_pt", str(tmp_path), "--buffer_path", str(tmp_path / "buffers")]
    assert "pass --train_epochs 2" in error_of(*argv)
    assert "parameter shapes [[32, 1, 3, 3]" in error_of(*argv, "--train_epochs", "2")
    assert numbered_files(directory_of(tmp_path / "buffers"), "npy") == []
    assert "no replay_buffer_{n}.pt files" in error_of(*TINY, "--import_pt", str(tmp_path / "buffers"))
    (tmp_path / "replay_buffer_0.pt").write_bytes(b"not a torch file")
    assert "cannot read" in error_of(*argv)


def test_an_original_buffer_with_aliased_snapshots_is_refused(tmp_path):
    """The original's buffer.py on a CPU saved p.detach().cpu(), which is p itself there: every
    snapshot of an expert is its final parameters."""
    params = [torch.randn(p.shape) for p in get_network(MODEL, 1, 10, (28, 28)).parameters()]
    old = tmp_path / "old"
    old.mkdir()
    torch.save([[[p.detach() for p in params] for _ in range(3)]], old / "replay_buffer_0.pt")
    assert error_of(*TINY, "--import_pt", str(old), "--train_epochs", "2", "--buffer_path", str(tmp_path)) == (
        f"error: {old / 'replay_buffer_0.pt'}: expert 0's 3 snapshots are all equal: aliased snapshots from the "
        f"original's buffer.py on CPU (.cpu() does not copy a CPU tensor); retrain, or fix the original with .clone()")
    assert [p.name for p in Path(directory_of(tmp_path)).iterdir()] == [".lock"]


def test_export_writes_the_original_format_and_imports_back_exactly(trained, tmp_path):
    directory, _ = trained
    exported = tmp_path / "pt"
    export = [*TINY, "--buffer_path", str(Path(directory).parents[1]), "--export_pt", str(exported),
              "--save_interval", "1"]
    buffer.main(export)
    original = load_all(directory)[0]
    shapes = [p.shape for p in get_network(MODEL, 1, 10, (28, 28)).parameters()]
    assert sorted(p.name for p in exported.iterdir()) == [".lock", "replay_buffer_0.pt", "replay_buffer_1.pt"]
    for n in range(2):
        experts = torch.load(exported / f"replay_buffer_{n}.pt", weights_only=True)
        assert len(experts) == 1 and len(experts[0]) == 3
        for t, snapshot in enumerate(experts[0]):
            assert [p.shape for p in snapshot] == shapes
            assert all(p.untyped_storage().nbytes() == 4 * p.numel() for p in snapshot)  # one tensor each
            assert torch.equal(torch.cat([p.reshape(-1) for p in snapshot]), torch.from_numpy(original[n, t]))
    buffer.main([*TINY, "--import_pt", str(exported), "--train_epochs", "2", "--buffer_path", str(tmp_path / "back")])
    assert np.array_equal(np.concatenate(load_all(directory_of(tmp_path / "back"))), original)
    assert error_of(*export) == (f"error: --export_pt {exported} already holds replay_buffer_{{n}}.pt files; "
                                 f"choose an empty folder")


# ---------------------------------------------------------------------------------------------
# One writer per directory, and what killed runs leave behind


def test_a_second_buffer_py_on_a_directory_in_use_is_refused(tmp_path):
    directory = Path(directory_of(tmp_path / "buffers"))
    directory.mkdir(parents=True)
    original_buffer(tmp_path / "replay_buffer_0.pt", 1, 2)
    message = (f"error: {directory} is in use by another buffer.py run (it holds {directory}/.lock); wait for it to "
               f"finish or choose another folder")
    with locked_by_another_process(directory):
        assert error_of(*TINY, "--buffer_path", str(tmp_path / "buffers")) == message
        assert error_of(*TINY, "--buffer_path", str(tmp_path / "buffers"), "--import_pt", str(tmp_path),
                        "--train_epochs", "1") == message
    assert [p.name for p in directory.iterdir()] == [".lock"]


def test_temporary_files_of_killed_runs_are_removed_and_said(tmp_path, capsys):
    directory = Path(directory_of(tmp_path / "buffers"))
    directory.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()  # a process id that has ended
    killed = [f".buffer.json.mtt-partial-{child.pid}", f".replay_buffer_0.npy.mtt-partial-{child.pid}"]
    alive, users = f".replay_buffer_1.npy.mtt-partial-{os.getpid()}", f"notes.tmp{child.pid}"
    for name in [*killed, alive, users]:
        (directory / name).write_bytes(b"partial")
    original_buffer(tmp_path / "replay_buffer_0.pt", 1, 2)
    buffer.main([*TINY, "--buffer_path", str(tmp_path / "buffers"), "--import_pt", str(tmp_path),
                 "--train_epochs", "1"])
    assert capsys.readouterr().out.splitlines()[0] == (
        f"removed the temporary files of killed runs in {directory}: {', '.join(killed)}")
    assert sorted(p.name for p in directory.iterdir()) == [".lock", alive, "buffer.json", users, "replay_buffer_0.npy"]


@pytest.fixture
def killed_after_rename(tmp_path, sliced):
    """A directory where a run was killed between renaming replay_buffer_1.npy into place and
    listing it in the sidecar: the sidecar is as the first run left it."""
    directory = Path(run(tmp_path, "--num_experts", "1", "--train_epochs", "1", model=FAST))
    before = (directory / buffer.SIDECAR).read_text()
    run(tmp_path, "--num_experts", "1", "--train_epochs", "1", model=FAST)
    (directory / buffer.SIDECAR).write_text(before)
    return directory, np.load(directory / "replay_buffer_1.npy")


def summary(directory):
    meta = buffer.read_sidecar(directory)
    return meta["next_index"], [(e["file"], e["index"], e["seed"], len(e["train_acc"]), e.get("recovered"))
                                for e in meta["experts"]]


def test_a_complete_file_the_sidecar_missed_is_recovered(tmp_path, killed_after_rename, capsys):
    directory, unlisted = killed_after_rename
    capsys.readouterr()
    run(tmp_path, "--num_experts", "1", "--train_epochs", "1", model=FAST)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"recovered {directory / 'replay_buffer_1.npy'}: 1 expert a killed run wrote but never listed in buffer.json "
        f"(indices 1..1; their per-epoch accuracies are unknown)")
    seed = partial(buffer.expert_seed, 0)
    assert summary(directory) == (3, [("replay_buffer_0.npy", 0, seed(0), 1, None),
                                      ("replay_buffer_1.npy", 1, seed(1), 0, True),
                                      ("replay_buffer_2.npy", 2, seed(2), 1, None)])
    assert np.array_equal(np.load(directory / "replay_buffer_1.npy"), unlisted)
    assert [e.trajectory(k)[0].tolist() for e in [Experts(directory)] for k in range(3)] == [
        buffer.initialisation(buffer.read_sidecar(directory), seed(k)).tolist() for k in range(3)]


def test_an_unlisted_file_that_is_not_the_next_experts_is_set_aside(tmp_path, killed_after_rename, capsys):
    """Rerun with another --seed: the unlisted file's experts are not those of the next indices
    under it; a file numpy cannot read is set aside too. Neither index is given again."""
    directory, unlisted = killed_after_rename
    (directory / "replay_buffer_2.npy").write_bytes(b"junk")
    capsys.readouterr()
    run(tmp_path, "--num_experts", "1", "--train_epochs", "1", "--seed", "1", model=FAST)
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"set {directory / 'replay_buffer_1.npy'} aside as replay_buffer_1.npy.orphan: it is not listed in "
        f"buffer.json and its experts do not start from the initialisations of indices 1.. under --seed 1",
        f"set {directory / 'replay_buffer_2.npy'} aside as replay_buffer_2.npy.orphan: it is not listed in "
        f"buffer.json and {directory / 'replay_buffer_2.npy'} is truncated or not a .npy array: numpy cannot "
        f"map it"]
    assert sorted(p.name for p in directory.iterdir()) == [".lock", "buffer.json", "replay_buffer_0.npy",
                                                           "replay_buffer_1.npy.orphan", "replay_buffer_2.npy.orphan",
                                                           "replay_buffer_3.npy"]
    assert np.array_equal(np.load(directory / "replay_buffer_1.npy.orphan"), unlisted)
    assert (directory / "replay_buffer_2.npy.orphan").read_bytes() == b"junk"
    assert summary(directory) == (3, [("replay_buffer_0.npy", 0, buffer.expert_seed(0, 0), 1, None),
                                      ("replay_buffer_3.npy", 2, buffer.expert_seed(1, 2), 1, None)])


def test_a_file_of_a_round_a_killed_multi_process_run_cut_short_is_listed_at_its_planned_indices(
        tmp_path, sliced, capsys):
    """Two ranks, four files of one expert: killed in the second round after rank 1 renamed
    replay_buffer_3.npy into place but before rank 0 finished replay_buffer_2.npy. The sidecar
    lists the first round and plans index 3 for file 3 ("pending"), so the next run lists it
    there (the next index, 2, would set it aside) and starts at index 4; "pending" is gone."""
    directory = Path(run(tmp_path, "--num_experts", "2", "--train_epochs", "1", "--save_interval", "1", model=FAST))
    after_first_round = json.loads((directory / buffer.SIDECAR).read_text())
    run(tmp_path, "--num_experts", "2", "--train_epochs", "1", "--save_interval", "1", model=FAST)
    (directory / "replay_buffer_2.npy").unlink()
    unlisted = np.load(directory / "replay_buffer_3.npy")
    (directory / buffer.SIDECAR).write_text(json.dumps(
        {**after_first_round, "pending": {f"replay_buffer_{n}.npy": n for n in range(4)}}))
    capsys.readouterr()
    run(tmp_path, "--num_experts", "1", "--train_epochs", "1", model=FAST)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"recovered {directory / 'replay_buffer_3.npy'}: 1 expert a killed run wrote but never listed in buffer.json "
        f"(indices 3..3; their per-epoch accuracies are unknown)")
    seed = partial(buffer.expert_seed, 0)
    assert summary(directory) == (5, [("replay_buffer_0.npy", 0, seed(0), 1, None),
                                      ("replay_buffer_1.npy", 1, seed(1), 1, None),
                                      ("replay_buffer_3.npy", 3, seed(3), 0, True),
                                      ("replay_buffer_4.npy", 4, seed(4), 1, None)])
    assert np.array_equal(np.load(directory / "replay_buffer_3.npy"), unlisted)
    assert "pending" not in buffer.read_sidecar(directory)


def test_conversions_are_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for flag in ("--import_pt", "--export_pt"):
        assert error_of(*TINY, flag, str(tmp_path / "pt"), "--buffer_path", str(tmp_path / "buffers")) == (
            "error: --import_pt and --export_pt convert files in one process: run them with python, not torchrun")
    assert list(tmp_path.iterdir()) == []


def test_a_first_file_whose_sidecar_was_never_written_is_recovered(tmp_path, sliced):
    directory = Path(run(tmp_path, "--num_experts", "1", "--train_epochs", "1", model=FAST))
    (directory / buffer.SIDECAR).unlink()
    run(tmp_path, "--num_experts", "1", "--train_epochs", "1", model=FAST)
    assert summary(directory) == (2, [("replay_buffer_0.npy", 0, buffer.expert_seed(0, 0), 0, True),
                                      ("replay_buffer_1.npy", 1, buffer.expert_seed(0, 1), 1, None)])


def test_a_sidecar_written_before_gsam_and_next_index_is_appended_to(tmp_path):
    for seed, name in enumerate(("old", "new")):
        (tmp_path / name).mkdir()
        original_buffer(tmp_path / name / "replay_buffer_0.pt", 2, 3, seed=seed)
    argv = lambda name: [*TINY, "--import_pt", str(tmp_path / name), "--train_epochs", "2", "--buffer_path",
                         str(tmp_path)]
    buffer.main(argv("old"))
    sidecar = Path(directory_of(tmp_path)) / buffer.SIDECAR
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("next_index", *buffer.PLAIN_SGD)}))
    buffer.main(argv("new"))
    assert summary(directory_of(tmp_path)) == (4, [(f"replay_buffer_{n}.npy", 2 * n + row, None, 0, None)
                                                   for n in range(2) for row in range(2)])


# ---------------------------------------------------------------------------------------------
# Plain SGD as before, and GSAM's flat experts (FTD)


def test_without_gsam_flags_an_expert_is_plain_sgd_bit_for_bit(tmp_path, sliced, monkeypatch):
    """The training buffer.py has always done, written out: training.train_epoch with torch's SGD,
    the lr x0.1 (and momentum restarted) after epoch train_epochs // 2 + 1."""
    monkeypatch.setattr(buffer, "gsam_step", None)  # calling it would fail the test
    array = load_all(run(tmp_path, "--num_experts", "1", "--train_epochs", "5", "--mom", "0.9", "--l2", "5e-4",
                         "--decay", model=FAST))[0][0]
    data = buffer.get_dataset()
    set_seed(buffer.expert_seed(0, 0))
    net = get_network(FAST, 1, 10, (28, 28))
    sgd = lambda lr: torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=5e-4)
    optimizer, expected = sgd(0.01), [flatten_params(net)]
    for epoch in range(5):
        train_epoch(net, data.images_train, data.labels_train, optimizer, 256, DSA_STRATEGY)
        expected.append(flatten_params(net))
        if epoch == 5 // 2 + 1:
            optimizer = sgd(0.001)
    assert torch.equal(torch.from_numpy(array), torch.stack(expected))


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_gsam_step_is_the_published_formula(adaptive):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    rho, alpha, lr, l2 = 0.5, 0.3, 0.1, 1e-3
    shapes = [p.shape for p in net.parameters()]
    w = flatten_params(net).clone()

    def gradient(flat):
        flat = flat.clone().requires_grad_()
        w1, b1, gamma, beta, w2, b2 = unflatten(flat, shapes)
        hidden = F.batch_norm(F.linear(x, w1, b1), None, None, gamma, beta, training=True)
        return torch.autograd.grad(F.cross_entropy(F.linear(hidden, w2, b2), y), flat)[0]

    g = gradient(w)
    e_w = rho * g / ((w.abs() * g).norm() + 1e-12) * w ** 2 if adaptive else rho * g / (g.norm() + 1e-12)
    g_p = gradient(w + e_w)
    cos = g @ g_p / (g_p.norm() * g.norm() + 1e-12)
    vertical = g - cos * g.norm() * g_p / (g_p.norm() + 1e-12)
    expected = w - lr * (g_p - alpha * vertical + l2 * w)  # SGD's first step: the momentum buffer is the gradient
    one_pass = copy.deepcopy(net)
    outputs = one_pass(x).detach()
    returned = buffer.gsam_step(net, x, y, torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=l2),
                                rho, alpha, adaptive)
    assert (flatten_params(net) - expected).abs().max().item() < 1e-12
    assert (expected - (w - lr * (g + l2 * w))).abs().max().item() > 1e-3  # not plain SGD's step
    assert torch.equal(returned, outputs)
    for stat in ("running_mean", "running_var"):  # as the first pass left them
        assert torch.equal(getattr(net[1], stat), getattr(one_pass[1], stat))


def test_gsam_flags_train_flat_experts_with_rho_following_the_lr(tmp_path, sliced, monkeypatch):
    calls, gsam_step = [], buffer.gsam_step

    def recorded(net, x, y, optimizer, rho, alpha, adaptive):
        calls.append((rho, alpha, adaptive, optimizer.param_groups[0]["lr"], len(x)))
        return gsam_step(net, x, y, optimizer, rho, alpha, adaptive)

    monkeypatch.setattr(buffer, "gsam_step", recorded)
    flags = ["--num_experts", "1", "--train_epochs", "5", "--decay", "--rho_max", "0.01", "--rho_min", "0.005",
             "--alpha", "0.3", "--adaptive"]
    directory = run(tmp_path, *flags, model=FAST)
    assert calls == [(0.01, 0.3, True, 0.01, 256)] * 8 + [(0.005, 0.3, True, 0.001, 256)] * 2  # 2 batches an epoch
    meta = buffer.read_sidecar(directory)
    assert (meta["rho_max"], meta["rho_min"], meta["alpha"], meta["adaptive"]) == (0.01, 0.005, 0.3, True)
    assert error_of("--dataset", "FashionMNIST-mini", "--model", FAST, "--buffer_path", str(tmp_path),
                    *flags[:5]) == (
        f"error: {directory} holds experts with rho_max 0.01 (this run: 0), rho_min 0.005 (this run: 0), "
        f"alpha 0.3 (this run: 0), adaptive True (this run: False); choose another --buffer_path rather than mix "
        f"trajectories")
