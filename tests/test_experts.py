import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import draw_segment
from mtt import trajectories as experts
from mtt.trajectories import SIDECAR, Experts, buffer_dir
from utils import UsageError

EPOCHS, PARAMS = 2, 3


def value(n, row, epoch):
    """Every entry of a test buffer says where it is: file n, row, epoch."""
    return 100 * n + 10 * row + epoch


def make_buffer(root, rows_per_file):
    """A buffer directory as buffer.py writes it, listing every row of every file, in the order given."""
    directory = Path(buffer_dir(str(root), "FashionMNIST-mini", "ConvNetW8", False))
    directory.mkdir(parents=True)
    entries = []
    for n, rows in rows_per_file.items():
        array = np.empty((rows, EPOCHS + 1, PARAMS), np.float32)
        for row in range(rows):
            for epoch in range(EPOCHS + 1):
                array[row, epoch] = value(n, row, epoch)
        np.save(directory / f"replay_buffer_{n}.npy", array)
        entries += [{"file": f"replay_buffer_{n}.npy", "index": len(entries) + row, "row": row, "seed": None,
                     "train_acc": [], "test_acc": []} for row in range(rows)]
    write_sidecar(directory, {"dataset": "FashionMNIST-mini", "model": "ConvNetW8", "zca": False,
                              "num_params": PARAMS, "param_shapes": [[PARAMS]], "train_epochs": EPOCHS,
                              "next_index": len(entries), "experts": entries})
    return directory


def write_sidecar(directory, meta):
    (directory / SIDECAR).write_text(json.dumps(meta))


def sidecar(directory):
    return json.loads((directory / SIDECAR).read_text())


def where(chosen):
    """(file, row) of every expert, read back from the values of its trajectory."""
    return [divmod(int(chosen.trajectory(k)[0, 0]) // 10, 10) for k in range(len(chosen))]


def test_the_sidecar_alone_says_which_files_and_rows_are_experts(tmp_path):
    directory = make_buffer(tmp_path, {10: 2, 2: 3})
    meta = sidecar(directory)
    meta["experts"] = [e for e in meta["experts"] if (e["file"], e["row"]) != ("replay_buffer_2.npy", 1)]
    write_sidecar(directory, meta)
    np.save(directory / "replay_buffer_3.npy", np.zeros((1, EPOCHS + 1, PARAMS), np.float32))  # never listed
    chosen = Experts(directory)
    assert where(chosen) == [(2, 0), (2, 2), (10, 0), (10, 1)]  # by file number, then row
    assert (len(chosen), chosen.num_snapshots, chosen.meta) == (4, EPOCHS + 1, meta)
    assert np.array_equal(chosen.trajectory(1), [[value(2, 2, t)] * PARAMS for t in range(EPOCHS + 1)])


def test_experts_are_memory_mapped_unless_load_all(tmp_path):
    directory = make_buffer(tmp_path, {0: 3, 1: 2})
    mapped, loaded = Experts(directory), Experts(directory, load_all=True)
    assert all(isinstance(array, np.memmap) for array, _ in mapped.trajectories)
    assert not any(isinstance(array, np.memmap) for array, _ in loaded.trajectories)
    assert [np.array(mapped.trajectory(k)).tolist() for k in range(5)] == [
        loaded.trajectory(k).tolist() for k in range(5)]


@pytest.mark.parametrize("load_all", [False, True])
def test_max_experts_keeps_the_first_experts_of_each_file(tmp_path, load_all):
    directory = make_buffer(tmp_path, {0: 3, 1: 1, 2: 3})
    assert where(Experts(directory, max_experts=2, load_all=load_all)) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]


@pytest.mark.parametrize("load_all", [False, True])
def test_max_files_is_a_subset_drawn_by_its_own_seeded_generator(tmp_path, load_all):
    directory = make_buffer(tmp_path, {n: 1 for n in range(6)})
    state = torch.get_rng_state()
    subsets = [[n for n, _ in where(Experts(directory, max_files=3, load_all=load_all, seed=seed))]
               for seed in range(4)]
    assert torch.equal(torch.get_rng_state(), state)
    assert subsets == [sorted(torch.randperm(6, generator=torch.Generator().manual_seed(seed))[:3].tolist())
                       for seed in range(4)]
    assert len({tuple(subset) for subset in subsets}) > 1
    assert [n for n, _ in where(Experts(directory, max_files=9))] == list(range(6))


def test_draw_segment_draws_the_expert_then_the_start_epoch_from_the_global_rng(tmp_path):
    """distill.py's draws, unchanged: the distilled images repeat those of earlier versions."""
    directory = make_buffer(tmp_path, {0: 2, 1: 3})
    chosen = Experts(directory)
    torch.manual_seed(3)
    drawn = [draw_segment(chosen, (0, 2), 1, "cpu") for _ in range(6)]
    torch.manual_seed(3)
    expected = [(torch.randint(5, ()).item(), torch.randint(2, ()).item()) for _ in range(6)]
    assert [(expert, start) for _, _, expert, start in drawn] == expected
    assert len(set(expected)) > 2
    files = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    for (theta, target, expert, start) in drawn:
        assert theta.tolist() == [value(*files[expert], start)] * PARAMS
        assert target.tolist() == [value(*files[expert], start + 1)] * PARAMS


def damage(directory, what):
    path = directory / "replay_buffer_1.npy"
    good = np.load(path)
    if what == "missing":
        path.unlink()
    elif what == "truncated":
        path.write_bytes(path.read_bytes()[:-4])
    elif what == "not an array":
        path.write_bytes(b"not numpy")
    elif what == "fewer rows":
        np.save(path, good[:1])
    elif what == "float64":
        np.save(path, good.astype(np.float64))
    elif what == "other epochs":
        np.save(path, good[:, :EPOCHS])
    return path


@pytest.mark.parametrize("what,message", [
    ("missing", "{path} is listed in buffer.json but missing"),
    ("truncated", "{path} is truncated or not a .npy array: numpy cannot map it"),
    ("not an array", "{path} is truncated or not a .npy array: numpy cannot map it"),
    ("fewer rows", "{path} holds float32 of shape (1, 3, 3), but buffer.json expects float32 of shape "
                   "(at least 2, 3, 3)"),
    ("float64", "{path} holds float64 of shape (2, 3, 3), but buffer.json expects float32 of shape "
                "(at least 2, 3, 3)"),
    ("other epochs", "{path} holds float32 of shape (2, 2, 3), but buffer.json expects float32 of shape "
                     "(at least 2, 3, 3)"),
])
def test_a_listed_file_that_is_not_what_the_sidecar_says_is_one_line(tmp_path, what, message):
    directory = make_buffer(tmp_path, {0: 1, 1: 2})
    path = damage(directory, what)
    with pytest.raises(UsageError) as raised:
        Experts(directory)
    assert str(raised.value) == message.format(path=path)


@pytest.mark.parametrize("contents,message", [
    ("[]", "{path} is not a buffer.py sidecar: it holds a JSON list, not an object"),
    ("{", "cannot read {path} as a buffer.py sidecar (Expecting property name enclosed in double quotes: line 1 "
          "column 2 (char 1))"),
    ('{"experts": []}', "{path} is not a buffer.py sidecar: missing or mistyped dataset, model, zca, num_params, "
                        "param_shapes, train_epochs"),
])
def test_a_sidecar_that_buffer_py_did_not_write_is_one_line(tmp_path, contents, message):
    directory = make_buffer(tmp_path, {0: 1})
    (directory / SIDECAR).write_text(contents)
    with pytest.raises(UsageError) as raised:
        Experts(directory)
    assert str(raised.value) == message.format(path=directory / SIDECAR)


@pytest.mark.parametrize("entry", [{"file": "../replay_buffer_0.npy", "row": 0},
                                   {"file": "replay_buffer_0.pt", "row": 0}, {"file": "replay_buffer_0.npy", "row": -1},
                                   {"file": "replay_buffer_0.npy"}, 7])
def test_an_expert_entry_must_name_a_buffer_file_and_row(tmp_path, entry):
    directory = make_buffer(tmp_path, {0: 2})
    meta = sidecar(directory)
    write_sidecar(directory, {**meta, "experts": [meta["experts"][0], entry]})
    with pytest.raises(UsageError) as raised:
        Experts(directory)
    assert str(raised.value) == (f'{directory / SIDECAR} is not a buffer.py sidecar: expert entry 1 is not '
                                 f'{{"file": "replay_buffer_N.npy", "row": R, ...}}')


def test_no_experts_says_how_to_train_them(tmp_path):
    directory = make_buffer(tmp_path, {})
    with pytest.raises(UsageError) as raised:
        Experts(directory)
    assert str(raised.value) == (f"{directory / SIDECAR} lists no experts: train them with python buffer.py "
                                 f"--dataset FashionMNIST-mini --model ConvNetW8 --buffer_path {tmp_path}")


def test_files_sort_by_number_and_an_empty_directory_says_how_to_fill_it(tmp_path):
    for n in (10, 2, 9, 0):
        (tmp_path / f"replay_buffer_{n}.npy").write_bytes(b"")
    (tmp_path / "replay_buffer_1.npy.tmp123").write_bytes(b"")
    found = [p.name for p in experts.numbered_files(tmp_path, "npy")]
    assert found == [f"replay_buffer_{n}.npy" for n in (0, 2, 9, 10)]
    empty = tmp_path / "buffers" / "CIFAR10" / "ConvNet"
    with pytest.raises(UsageError, match=re.escape(f"no expert trajectories in {empty}: train them with "
                                                   f"python buffer.py --dataset CIFAR10 --zca --model ConvNet "
                                                   f"--buffer_path {tmp_path / 'buffers'}")):
        experts.read_sidecar(empty)


def test_buffer_dir_follows_the_original_layout_and_fill_command_inverts_it():
    cases = {("CIFAR10", "ConvNet", False, "imagenette", 128): "b/CIFAR10_NO_ZCA/ConvNet",
             ("CIFAR10", "ConvNet", True, "imagenette", 128): "b/CIFAR10/ConvNet",
             ("FashionMNIST", "ConvNet", False, "imagenette", 128): "b/FashionMNIST/ConvNet",
             ("ImageNet", "ConvNetD5", False, "imagewoof", 64): "b/ImageNet/imagewoof/64/ConvNetD5"}
    for (dataset, model, zca, subset, res), path in cases.items():
        assert buffer_dir("b", dataset, model, zca, subset, res) == path
        flags = (f"--dataset {dataset}" + " --zca" * zca + (f" --subset {subset} --res {res}" if dataset == "ImageNet"
                                                             else "") + f" --model {model} --buffer_path b")
        assert experts.fill_command(path) == f"python buffer.py {flags}"
