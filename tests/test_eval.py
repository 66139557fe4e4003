import inspect
import json
import math
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line_error, run_distill

import eval as eval_script
from mtt import evaluation, run_folder
from mtt.augment import DSA_STRATEGY
from mtt.data import MINI_PATH, ZCA, get_dataset, images_per_class
from mtt.trajectories import buffer_dir
from networks import ConvNet
from utils import torch_bytes

FAST = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW8"]


@pytest.fixture
def calls(monkeypatch):
    """Replace the training with a spy: each call's arguments by name; every run scores 50%."""
    seen, signature = [], inspect.signature(evaluation.evaluate_synset)

    def spy(*args, **kwargs):
        seen.append(signature.bind(*args, **kwargs).arguments)
        return 1.0, 0.5

    monkeypatch.setattr(evaluation, "evaluate_synset", spy)
    return seen


def real_subset(data, ipc, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([idx[torch.randperm(len(idx), generator=generator)[:ipc]]
                      for idx in images_per_class(data.labels_train, 10)])


def write_run(folder, images, labels, tag="best", syn_lr=None, transform=None, meta=None):
    """A run folder as distill.py writes it; with no meta, the original's bare pair of files."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(images, folder / f"images_{tag}.pt")
    torch.save(labels, folder / f"labels_{tag}.pt")
    if syn_lr is not None:
        torch.save(torch.tensor(syn_lr), folder / f"syn_lr_{tag}.pt")
    if transform is not None:
        torch.save(transform.state_dict(), folder / "zca.pt")
    if meta is not None:
        run = {"dataset": "FashionMNIST-mini", "subset": "imagenette", "res": 32, "model": "ConvNet", "ipc": 1,
               "zca": False, "texture": False, "canvas_size": 2, "canvas_samples": 1, "channel": 1,
               "im_size": [28, 28], "num_classes": 10, "mean": [0.2861], "std": [0.353],
               "dsa_strategy": DSA_STRATEGY, "args": {}}
        (folder / "run.json").write_text(json.dumps({**run, **meta}))
    return folder


def one_per_class(side=28, channels=1):
    return torch.randn(10, channels, side, side), torch.arange(10)


def test_random_baseline_is_well_above_chance_and_the_originals_pair_loads(tmp_path, mini):
    """10 real images per class train a width-8 ConvNet for 100 epochs to 66-74% test accuracy
    (seeds 0-3 measured; seed 0 gives 70.4%). Chance is 10%: asserting > 50% leaves 16 points
    under the worst seed. The same images saved as the original's images_best.pt/labels_best.pt
    (a leaf that required grad, no run.json, no syn_lr) must give the identical row: loading
    passes them unchanged, the lr falls back to --lr and each row is seeded by (seed, run) alone."""
    chosen = real_subset(mini, 10)
    original = write_run(tmp_path / "original", mini.images_train[chosen].clone().requires_grad_(),
                         mini.labels_train[chosen])
    rows = eval_script.main(FAST + ["--syn_path", str(original), "--baseline", "random", "--ipc", "10",
                                    "--num_eval", "1", "--epoch_eval_train", "100"])
    distilled, random = rows
    assert (distilled["set"], random["set"]) == ("original/images_best.pt", "random")
    assert distilled["ipc"] == random["ipc"] == 10 and distilled["lr"] == 0.01
    assert random["test_acc_mean"] > 0.5
    assert distilled["test_accs"] == random["test_accs"]


def test_table_json_and_same_seed_repeats(tmp_path, capsys, mini):
    """--seed seeds each network (a fixed set's numbers change with it), and the same seed repeats them."""
    chosen = real_subset(mini, 2, seed=5)
    fixed = write_run(tmp_path / "fixed", mini.images_train[chosen], mini.labels_train[chosen])
    args = FAST + ["--syn_path", str(fixed), "--baseline", "random", "--ipc", "2", "--num_eval", "2",
                   "--epoch_eval_train", "5"]
    first = eval_script.main(args + ["--out", str(tmp_path / "results.json")])
    table = capsys.readouterr().out.splitlines()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == first and saved["dataset"] == "FashionMNIST-mini"
    assert [row["set"] for row in first] == ["fixed/images_best.pt", "random"]
    for row in first:
        assert row["n"] == len(row["test_accs"]) == 2
        assert row["test_acc_mean"] == pytest.approx(np.mean(row["test_accs"]))
        assert row["test_acc_std"] == pytest.approx(np.std(row["test_accs"]))
    header = table.index("set                   model      ipc  lr           test acc %     n")
    assert table[header + 3:] == [f"rows written to {tmp_path / 'results.json'}"]
    for line, row in zip(table[header + 1:header + 3], first, strict=True):
        assert line.split() == [row["set"], "ConvNetW8", "2", "0.01", "(--lr)", f"{100 * row['test_acc_mean']:.2f}",
                                "+-", f"{100 * row['test_acc_std']:.2f}", "2"]
    again = eval_script.main(args)
    assert [row["test_accs"] for row in again] == [row["test_accs"] for row in first]
    other_seed = eval_script.main(args + ["--seed", "1"])
    assert other_seed[0]["test_accs"] != first[0]["test_accs"]


def permutation_zca(seed=0):
    """A 'whitening' that permutes the 784 pixels: its effect on the test images is plain to see."""
    perm = torch.randperm(784, generator=torch.Generator().manual_seed(seed))
    eye = torch.eye(784)
    return ZCA(torch.zeros(784), eye[:, perm], eye[perm, :], 0.1), perm


def raw_test_pixels():
    with np.load(MINI_PATH) as f:
        return torch.as_tensor(f["x_test"]).float().div(255).reshape(-1, 784)


@pytest.mark.parametrize("flags", [[], ["--zca"]], ids=["saved", "saved-beats-refit"])
def test_a_zca_set_is_evaluated_on_test_images_under_its_saved_transform(tmp_path, calls, flags):
    zca, perm = permutation_zca()
    images, labels = one_per_class()
    run = write_run(tmp_path / "run", images, labels, syn_lr=0.02, transform=zca, meta={"zca": True})
    eval_script.main(FAST + ["--syn_path", str(run), "--num_eval", "1"] + flags)
    (call,) = calls
    assert torch.equal(call["images"], images) and torch.equal(call["labels"], labels)
    assert torch.allclose(call["test_images"].reshape(-1, 784), raw_test_pixels()[:, perm], atol=1e-6)
    assert call["lr"] == pytest.approx(0.02)


@pytest.mark.parametrize("meta", [{"zca": True}, None], ids=["run.json-without-zca.pt", "original-files"])
def test_zca_flag_refits_the_whitening_on_the_training_set(tmp_path, calls, meta):
    """The original's ZCA outputs come without the transform: --zca refits it, as get_dataset does."""
    images, labels = one_per_class()
    run = write_run(tmp_path / "run", images, labels, meta=meta)
    eval_script.main(FAST + ["--syn_path", str(run), "--num_eval", "1", "--zca", "--baseline", "random", "--ipc", "1",
                             "--data_path", str(tmp_path)])
    whitened = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    distilled, random = calls
    assert torch.allclose(distilled["test_images"], whitened.images_test, atol=1e-4)
    assert torch.equal(distilled["images"], images)
    # the baseline follows --zca too: real images and test images both whitened
    chosen = real_subset(whitened, 1)
    assert torch.allclose(random["images"], whitened.images_train[chosen], atol=1e-4)
    assert torch.allclose(random["test_images"], whitened.images_test, atol=1e-4)


def test_plain_sets_and_baselines_use_normalised_test_images(tmp_path, calls, mini):
    images, labels = one_per_class()
    run = write_run(tmp_path / "run", images, labels, meta={})
    eval_script.main(FAST + ["--syn_path", str(run), "--num_eval", "1", "--baseline", "random", "--ipc", "1"])
    for call in calls:
        assert torch.equal(call["test_images"], mini.images_test)


@pytest.mark.parametrize("meta, flags, message", [
    ({"zca": True}, ["--zca", "False"], "--zca False contradicts the set's run.json, which says zca True"),
    ({"zca": False}, ["--zca"], "--zca True contradicts the set's run.json, which says zca False"),
    ({"dataset": "CIFAR10"}, ["--dataset", "FashionMNIST-mini"],
     "--dataset FashionMNIST-mini contradicts the set's run.json, which says dataset CIFAR10"),
], ids=["zca-set-plain-test", "plain-set-zca-test", "other-dataset"])
def test_a_flag_that_contradicts_run_json_is_refused(tmp_path, calls, meta, flags, message):
    """A ZCA set trained against plain test images (or a plain one against whitened ones) would score
    chance with no other sign."""
    run = write_run(tmp_path / "run", *one_per_class(), meta=meta)
    with pytest.raises(SystemExit) as exit:
        eval_script.main(["--model", "ConvNetW8", "--syn_path", str(run)] + flags)
    assert str(exit.value.code).startswith("error: ") and message in str(exit.value.code)
    assert calls == []


def test_a_run_folder_evaluates_without_any_flag_of_its_run(buffers, tmp_path, calls):
    """distill.py's run on FashionMNIST-mini (ConvNetW16, ZCA): eval.py --syn_path RUN alone takes the
    dataset, model and whitening from run.json (without them it looked for CIFAR10)."""
    zca_buffers = tmp_path / "zca_buffers"
    source = buffer_dir(str(buffers), "FashionMNIST-mini", "ConvNetW16", zca=False)
    shutil.copytree(source, buffer_dir(str(zca_buffers), "FashionMNIST-mini", "ConvNetW16", zca=True))
    sidecar = Path(buffer_dir(str(zca_buffers), "FashionMNIST-mini", "ConvNetW16", zca=True)) / "buffer.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "zca": True}))
    run_distill(zca_buffers, tmp_path / "run", "--Iteration", "1", "--zca", "--data_path", str(tmp_path / "data"))
    calls.clear()  # the run's own evaluations
    (row,) = eval_script.main(["--syn_path", str(tmp_path / "run"), "--num_eval", "1", "--data_path",
                               str(tmp_path / "data"), "--device", "cpu"])
    (call,) = calls
    assert (row["model"], call["epochs"], type(call["net"]).__name__) == ("ConvNetW16", 1000, "ConvNet")
    whitened = get_dataset("FashionMNIST-mini", str(tmp_path / "data"), zca=True)
    assert torch.allclose(call["test_images"], whitened.images_test, atol=1e-4)


def test_texture_set_trains_on_crops_with_its_learned_lr_and_model(tmp_path, calls, capsys):
    canvases, labels = one_per_class(side=56)
    run = write_run(tmp_path / "run", canvases, labels, syn_lr=0.03,
                    meta={"texture": True, "canvas_size": 2, "canvas_samples": 3, "model": "ConvNetD1"})
    (row,) = eval_script.main(["--dataset", "FashionMNIST-mini", "--syn_path", str(run), "--num_eval", "2",
                               "--epoch_eval_train", "7", "--dsa", "False"])
    assert len(calls) == 2
    for call in calls:
        assert call["texture"] == ((28, 28), 3) and call["lr"] == pytest.approx(0.03) and call["epochs"] == 7
        assert call["dsa_strategy"] is None and isinstance(call["net"], ConvNet) and len(call["net"].paddings) == 1
    assert (row["model"], row["ipc"], row["lr_from"]) == ("ConvNetD1", 1, "syn_lr_best.pt")
    assert "run/images_best.pt  ConvNetD1  1    0.03 (syn_lr_best.pt)" in capsys.readouterr().out


def test_full_baseline_trains_on_the_whole_training_set_for_epochs_full(calls, mini, capsys):
    (row,) = eval_script.main(FAST + ["--baseline", "full", "--epochs_full", "3", "--num_eval", "1", "--lr", "0.05"])
    (call,) = calls
    assert torch.equal(call["images"], mini.images_train) and torch.equal(call["labels"], mini.labels_train)
    assert (call["epochs"], call["lr"], call["dsa_strategy"]) == (3, 0.05, DSA_STRATEGY)
    assert row["ipc"] is None and row["images"] == 5000 and row["lr_from"] == "--lr"
    assert "full  ConvNetW8  all  0.05 (--lr)" in capsys.readouterr().out


def test_eval_mode_pools_and_iteration_pick_the_rows(tmp_path, calls):
    images, labels = one_per_class()
    write_run(tmp_path / "run", images, labels, meta={})
    write_run(tmp_path / "run", images + 1, labels, tag="200", syn_lr=0.07, meta={})
    rows = eval_script.main(["--dataset", "FashionMNIST-mini", "--syn_path", str(tmp_path / "run"), "--iteration",
                             "200", "--eval_mode", "D", "--num_eval", "1"])
    assert [row["model"] for row in rows] == ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"]
    assert all(row["set"] == "run/images_200.pt" and row["lr"] == pytest.approx(0.07) for row in rows)
    assert torch.equal(calls[0]["images"], images + 1)


def test_a_file_path_and_labels_path(tmp_path, calls):
    images, labels = one_per_class()
    torch.save(images, tmp_path / "cifar_ipc1_images.pt")
    torch.save(labels.flip(0), tmp_path / "my_labels.pt")
    torch.save(labels, tmp_path / "cifar_ipc1_labels.pt")
    eval_script.main(FAST + ["--syn_path", str(tmp_path / "cifar_ipc1_images.pt"), "--num_eval", "1"])
    eval_script.main(FAST + ["--syn_path", str(tmp_path / "cifar_ipc1_images.pt"), "--num_eval", "1",
                             "--labels_path", str(tmp_path / "my_labels.pt")])
    assert torch.equal(calls[0]["labels"], labels) and torch.equal(calls[1]["labels"], labels.flip(0))


def bad_set(tmp_path, images=None, labels=None, meta=None, name="images_best.pt"):
    default_images, default_labels = one_per_class()
    images = default_images if images is None else images
    labels = default_labels if labels is None else labels
    write_run(tmp_path / "run", images, labels, meta=meta)
    if name != "images_best.pt":
        (tmp_path / "run" / "images_best.pt").rename(tmp_path / "run" / name)
    return ["--syn_path", str(tmp_path / "run" / name)]


def corrupt(flags, name, content):
    """Write `content` as `name` beside the set that flags point to."""
    (Path(flags[1]).parent / name).write_bytes(content)
    return flags


def saved(path, tensor):
    torch.save(tensor, path)
    return path


BAD_INPUTS = {
    "missing path": (lambda tmp: ["--syn_path", str(tmp / "nowhere")], "does not exist"),
    "no images in folder": (lambda tmp: ["--syn_path", str(tmp)], "no images_best.pt in"),
    "missing labels": (lambda tmp: bad_set(tmp, name="images_7.pt"), "labels file"),
    "not a tensor": (lambda tmp: bad_set(tmp, images={"x": 1}), "holds a dict, not a tensor"),
    "channels": (lambda tmp: bad_set(tmp, images=torch.randn(10, 3, 28, 28)),
                 "images of shape (3, 28, 28) do not fit FashionMNIST-mini, whose images are (1, 28, 28)"),
    "size": (lambda tmp: bad_set(tmp, images=torch.randn(10, 1, 32, 32)), "images of shape (1, 32, 32) do not fit"),
    "texture canvas size": (lambda tmp: bad_set(tmp, meta={"texture": True, "canvas_size": 2}),
                            "whose canvases are (1, 56, 56)"),
    "label range": (lambda tmp: bad_set(tmp, labels=torch.arange(1, 11)),
                    "labels run from 1 to 10, outside the 10 classes of FashionMNIST-mini (0 to 9)"),
    "negative label": (lambda tmp: bad_set(tmp, labels=torch.arange(10) - 1), "labels run from -1 to 8"),
    "label count": (lambda tmp: bad_set(tmp, labels=torch.arange(9)), "9 labels for 10 images"),
    "soft labels of the wrong width": (lambda tmp: bad_set(tmp, labels=torch.eye(10)[:, :5]),
                                       "expected labels as class ids (N) or label logits (N x 10)"),
    "non-finite logits": (lambda tmp: bad_set(tmp, labels=torch.full((10, 10), float("nan"))),
                          "/run/labels_best.pt holds non-finite values"),
    "non-finite images": (lambda tmp: bad_set(tmp, images=torch.full((10, 1, 28, 28), float("inf"))),
                          "/run/images_best.pt holds non-finite values"),
    "non-finite learned lr": (lambda tmp: corrupt(bad_set(tmp), "syn_lr_best.pt", torch_bytes(torch.tensor(math.inf))),
                              "/run/syn_lr_best.pt holds non-finite values"),
    "corrupt run.json": (lambda tmp: corrupt(bad_set(tmp), "run.json", b"{"), "as a distill.py run.json"),
    "run.json not a dict": (lambda tmp: corrupt(bad_set(tmp), "run.json", b"[]"), "is not a distill.py run.json"),
    "corrupt zca.pt": (lambda tmp: corrupt(bad_set(tmp), "zca.pt", b"garbage"), "as a ZCA transform"),
    "zca.pt a plain tensor": (lambda tmp: corrupt(bad_set(tmp), "zca.pt", torch_bytes(torch.eye(784))),
                              "/run/zca.pt is not a ZCA transform of its pixels; delete it and pass --zca"),
    "missing lr_path": (lambda tmp: bad_set(tmp) + ["--lr_path", str(tmp / "nope.pt")], "--lr_path"),
    "lr_path not an lr": (lambda tmp: bad_set(tmp) + ["--lr_path", str(saved(tmp / "lr.pt", torch.ones(3)))],
                          "should hold one positive learning rate"),
    "out folder a file": (lambda tmp: bad_set(tmp) + ["--out", str(tmp / "run" / "images_best.pt" / "x.json")],
                          "images_best.pt/x.json: its folder "),
    "out is a folder": (lambda tmp: bad_set(tmp) + ["--out", str(tmp)], "is a folder"),
    "negative epochs": (lambda tmp: bad_set(tmp) + ["--epoch_eval_train", "-1"],
                        "argument --epoch_eval_train: must be an integer from 1 to 2^31-1, not -1"),
    "zero networks": (lambda tmp: bad_set(tmp) + ["--num_eval", "0"],
                      "argument --num_eval: must be an integer from 1 to 2^31-1"),
    "batch": (lambda tmp: bad_set(tmp) + ["--batch_train", "0"],
              "argument --batch_train: must be an integer from 1 to 2^31-1"),
    "dsa strategy": (lambda tmp: bad_set(tmp) + ["--dsa_strategy", "color_blur"],
                     "argument --dsa_strategy: unknown DSA op(s) blur"),
    "gpu": (lambda tmp: bad_set(tmp) + ["--device", "gpu"], "unknown --device 'gpu'"),
    "viewing copy": (lambda tmp: bad_set(tmp, name="images_zca_best.pt"), "the de-whitened copy saved for viewing"),
    "own file without labels": (lambda tmp: bad_set(tmp, name="my_set.pt"),
                                "cannot tell which labels go with my_set.pt: pass --labels_path"),
    "random without ipc": (lambda tmp: ["--baseline", "random"], "--baseline random needs --ipc"),
    "ipc too large": (lambda tmp: ["--baseline", "random", "--ipc", "501"],
                      "--ipc 501: the random baseline needs 1 to 500 images per class"),
    "nothing to do": (lambda tmp: [], "nothing to evaluate"),
    "iteration of a file": (lambda tmp: bad_set(tmp) + ["--iteration", "5"], "--iteration picks a file"),
    **{f"iteration {text}": (lambda tmp, text=text: bad_set(tmp) + ["--iteration", text],
                             "argument --iteration: " + said + " an integer from 0 to 2^31-1, not " + shown)
       for text, said, shown in (("-1", "must be", "-1"), ("abc", "expected", "'abc'"),
                                 ("99999999999999999999", "must be", "99999999999999999999"))},
    "eval mode": (lambda tmp: ["--baseline", "full", "--eval_mode", "Q"], "argument --eval_mode: invalid choice: 'Q'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_with_one_clear_line(tmp_path, calls, case):
    flags, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit:
        eval_script.main(FAST + flags(tmp_path))
    assert str(exit.value.code).startswith("error: ") and message in str(exit.value.code)
    assert "\n" not in str(exit.value.code) and calls == []


# A run folder's files that are not a set's images: (file, what the line calls it, the --syn_path forms it
# gives, each with the set it evaluates)
RUN_FILES = [
    ("labels_200.pt", "is the labels of a set, not its images", [["RUN/images_200.pt"], ["RUN", "--iteration", "200"]],
     "images_200.pt"),
    ("synthetic_200.png", "is the image grid drawn for viewing, not the set",
     [["RUN/images_200.pt"], ["RUN", "--iteration", "200"]], "images_200.pt"),
    ("syn_lr_200.pt", "is the learned lr of a set, not its images",
     [["RUN/images_200.pt"], ["RUN", "--iteration", "200"]], "images_200.pt"),
    ("lr_best.pt", "is the learned lr of a set, not its images", [["RUN/images_best.pt"], ["RUN"]], "images_best.pt"),
    ("ema_labels_best.pt", "is the labels of a set, not its images", [["RUN/ema_images_best.pt"], ["RUN", "--ema"]],
     "ema_images_best.pt"),
    ("checkpoint.pt", "is distill.py's checkpoint (for --resume), not a set", [["RUN"]], "images_best.pt"),
    ("run.json", "is a file of a run folder, not a set", [["RUN"]], "images_best.pt"),
]


@pytest.mark.parametrize("name, what, forms, evaluated", RUN_FILES, ids=[case[0] for case in RUN_FILES])
def test_a_run_folder_s_other_file_is_one_line_that_gives_the_command_that_works(tmp_path, calls, name, what, forms,
                                                                                 evaluated):
    """Following the old line (pass --labels_path) ended in "cannot read ... as a torch file": the
    line names the images file of the same tag and the folder form, and both evaluate that set."""
    run = write_run(tmp_path / "RUN", *one_per_class(), syn_lr=0.02, meta={})
    write_run(run, *one_per_class(), tag="200", syn_lr=0.03)
    run_folder.commit(run, run_folder.set_files("ema_", ["best"], *one_per_class(), torch.tensor(0.04)), 0)
    (run / "synthetic_200.png").write_bytes(b"\x89PNG")
    (run / "checkpoint.pt").write_bytes(b"not read")
    torch.save(torch.tensor(0.02), run / "lr_best.pt")
    shown = lambda form: " ".join(["--syn_path", str(tmp_path / form[0]), *form[1:]])
    assert one_line_error(eval_script.main, FAST + ["--syn_path", run / name]) == (
        f"error: {run / name} {what}: give {shown(forms[0])}"
        + (f", or {shown(forms[1])}" if len(forms) > 1 else " (its images_best.pt; --iteration N for images_N.pt)"))
    for form in forms:
        (row,) = eval_script.main(FAST + ["--syn_path", str(tmp_path / form[0]), *form[1:], "--num_eval", "1"])
        assert row["set"] == f"RUN/{evaluated}"


def test_a_folder_of_run_folders_names_them(tmp_path, calls):
    """distill.py's default --save_path is logged_files/DATASET/RUN: --syn_path logged_files/DATASET
    names the runs in it (sorted, a few, how many), not just "no images_best.pt"."""
    parent = tmp_path / "CIFAR10"
    for run in ("run_d", "run_b", "run_a"):
        write_run(parent / run, *one_per_class())
    (parent / "run_c").mkdir()  # a run that has not saved a set yet
    (parent / "run_c" / "run.json").write_text("{}")
    (parent / "notes").mkdir()  # no run
    assert one_line_error(eval_script.main, FAST + ["--syn_path", parent]) == (
        f"error: no images_best.pt in {parent}, a folder of 4 run folders (run_a, run_b, run_c and 1 more): give one "
        f"as --syn_path, e.g. --syn_path {parent / 'run_a'}")
    assert one_line_error(eval_script.main, FAST + ["--syn_path", parent / "notes"]) == (
        f"error: no images_best.pt in {parent / 'notes'} (found: no images_*.pt)")
    assert calls == []


def test_datm_sets_train_on_their_label_logits_and_lr_and_lr_path_wins(tmp_path, calls, capsys):
    """DATM saves images_best.pt, labels_best.pt (N x C logits) and lr_best.pt: the networks train on
    the logits (soft cross-entropy) at that lr; --lr_path overrides it; each row says which lr it used."""
    images, logits = torch.randn(10, 1, 28, 28), torch.randn(10, 10)
    folder = write_run(tmp_path / "datm", images, logits)
    torch.save(torch.tensor(0.02), folder / "lr_best.pt")
    torch.save(torch.tensor(0.005), tmp_path / "other_lr.pt")
    (row,) = eval_script.main(FAST + ["--syn_path", str(folder), "--num_eval", "1"])
    (row_override,) = eval_script.main(FAST + ["--syn_path", str(folder), "--num_eval", "1",
                                               "--lr_path", str(tmp_path / "other_lr.pt")])
    first, second = calls
    assert torch.equal(first["labels"], logits) and first["labels"].dtype == torch.float32
    assert first["lr"] == pytest.approx(0.02) and second["lr"] == pytest.approx(0.005)
    assert (row["lr_from"], row_override["lr_from"]) == ("lr_best.pt", "--lr_path")
    out = capsys.readouterr().out
    assert "datm/images_best.pt  ConvNetW8  1    0.02 (lr_best.pt)" in out
    assert "datm/images_best.pt  ConvNetW8  1    0.005 (--lr_path)" in out


def test_the_out_path_is_checked_before_any_training(tmp_path, calls, monkeypatch):
    """--out's folder is made, as distill.py makes --save_path; one that cannot be is one line before
    any network trains, and a command refused for another reason leaves no folder behind."""
    run = write_run(tmp_path / "run", *one_per_class())
    out = tmp_path / "results" / "new" / "x.json"
    assert one_line_error(eval_script.main, FAST + ["--syn_path", tmp_path / "nowhere", "--out", out]).endswith(
        "nowhere does not exist")
    assert not (tmp_path / "results").exists()
    (row,) = eval_script.main(FAST + ["--syn_path", str(run), "--num_eval", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == [row]
    calls.clear()
    in_the_way = run / "images_best.pt" / "x.json"
    assert one_line_error(eval_script.main, FAST + ["--syn_path", run, "--out", in_the_way]) == (
        f"error: --out {in_the_way}: its folder {in_the_way.parent}: a file is in the way (not a folder)")
    monkeypatch.setattr(os, "access", lambda *args: False)  # a read-only folder (root may write to any)
    assert one_line_error(eval_script.main, FAST + ["--syn_path", run, "--out", out]) == (
        f"error: --out {out}: its folder {out.parent}: not writable")
    assert one_line_error(eval_script.main, FAST + ["--syn_path", run, "--out", out.parent]) == (
        f"error: --out {out.parent} is a folder; give a file name")
    assert calls == []


def test_baseline_random_takes_its_ipc_from_the_set_s_run_json(tmp_path, calls):
    """--baseline random without --ipc beside a run folder: the ipc its run.json records (so the random
    row matches the set); a set without a run.json still needs --ipc."""
    run = write_run(tmp_path / "run", *one_per_class(), meta={"ipc": 2})
    distilled, random = eval_script.main(FAST + ["--syn_path", str(run), "--baseline", "random", "--num_eval", "1"])
    assert (random["set"], random["ipc"], len(calls[1]["images"])) == ("random", 2, 20)
    original = write_run(tmp_path / "original", *one_per_class())
    assert one_line_error(eval_script.main, FAST + ["--syn_path", original, "--baseline", "random"]) == (
        "error: --baseline random needs --ipc (real images per class): original/images_best.pt has no run.json "
        "that records its ipc")


def test_a_device_that_is_not_there_is_one_line(tmp_path, calls):
    run = write_run(tmp_path / "run", *one_per_class())
    if torch.cuda.is_available():
        flags, message = ["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s) here"
    else:
        flags, message = ["--device", "cuda"], "this machine has no CUDA GPU"
    with pytest.raises(SystemExit, match=message) as exit:
        eval_script.main(FAST + ["--syn_path", str(run)] + flags)
    assert "\n" not in str(exit.value.code) and calls == []


def test_saved_sets_are_contiguous_so_a_user_can_flatten_them(tmp_path):
    """3-channel images keep the channels-last strides of the data they came from; a saved file must not."""
    images = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    run_folder.commit(tmp_path, run_folder.set_files("", ["best"], images, torch.arange(4), torch.tensor(0.01)), 0)
    loaded = torch.load(tmp_path / "images_best.pt", weights_only=True)
    assert loaded.is_contiguous() and torch.equal(loaded.view(4, -1), images.reshape(4, -1))


def test_ftd_s_ema_folder_is_evaluated_by_itself_and_ema_picks_the_ema_set(tmp_path, calls):
    images, labels = one_per_class()
    ftd = tmp_path / "ema"  # FTD's ema/ folder: ema_images_best.pt, ema_labels_best.pt, ema_lr_best.pt only
    ftd.mkdir()
    torch.save(images, ftd / "ema_images_best.pt")
    torch.save(labels, ftd / "ema_labels_best.pt")
    torch.save(torch.tensor(0.03), ftd / "ema_lr_best.pt")
    (row,) = eval_script.main(FAST + ["--syn_path", str(ftd), "--num_eval", "1"])
    assert (row["set"], row["lr_from"]) == ("ema/ema_images_best.pt", "ema_lr_best.pt")
    assert torch.equal(calls[0]["images"], images) and calls[0]["lr"] == pytest.approx(0.03)
    run = write_run(tmp_path / "run", images, labels, syn_lr=0.02, meta={})  # ours: the set and its EMA
    run_folder.commit(run, run_folder.set_files("ema_", ["best"], images + 1, labels, torch.tensor(0.04)), 0)
    (plain,) = eval_script.main(FAST + ["--syn_path", str(run), "--num_eval", "1"])
    (ema,) = eval_script.main(FAST + ["--syn_path", str(run), "--num_eval", "1", "--ema"])
    assert (plain["set"], ema["set"]) == ("run/images_best.pt", "run/ema_images_best.pt")
    assert torch.equal(calls[2]["images"], images + 1) and ema["lr"] == pytest.approx(0.04)
    assert one_line_error(eval_script.main, FAST + ["--syn_path", run / "images_best.pt", "--ema"]) == \
        "error: --ema picks a file in a run folder, but --syn_path is a file"


@pytest.mark.parametrize("verbose", [False, True])
def test_per_epoch_lines_come_with_verbose_only(capsys, verbose):
    eval_script.main(FAST + ["--baseline", "random", "--ipc", "1", "--num_eval", "1", "--epoch_eval_train", "9",
                             "--device", "cpu"] + ["--verbose"] * verbose)
    out = capsys.readouterr().out
    assert ("[random ConvNetW8 run 1/1]  epoch 10/10 train acc" in out) == verbose
    assert re.search(r"^\[random ConvNetW8 run 1/1\] 10 images, 9 epochs \(10 passes: the original trains one more\), "
                     r"lr 0\.01: test acc", out, re.M)


# ---------------------------------------------------------------------------------------------
# DD-Ranking's scores (--scores)


def score_rows(accuracies):
    """eval.py's rows of one model, from {term: per-network accuracies}, named by term."""
    return [{"set": term, "model": "ConvNet", "test_accs": accs} for term, accs in accuracies.items()]


def test_the_four_scores_are_dd_rankings_formulas_on_fractions():
    """By hand, network 1: HLR = 0.80 - 0.50 = 0.30; IOR = 0.60 - 0.40 = 0.20; alpha = 0.5 * 0.20 - 0.5 *
    0.30 = -0.05, LRS = (e^-0.05 - e^-1) / (e - e^-1) = 0.58335 / 2.35040 = 0.24819; beta = 0.5 * 0.20
    + 0.5 * (0.55 - 0.45) = 0.15, ARS = (e^0.15 - e^-1) / (e - e^-1) = 0.33780. Network 2: HLR 0.28,
    IOR 0.24, alpha -0.02, LRS 0.26052; beta 0.17, ARS 0.34778."""
    accuracies = {"syn": [0.60, 0.64], "syn_hard": [0.50, 0.52], "syn_no_aug": [0.55, 0.58], "random": [0.40, 0.40],
                  "random_no_aug": [0.45, 0.48], "full": [0.80, 0.80]}
    terms = {term: types.SimpleNamespace(name=term) for term in accuracies}
    found = eval_script.scores(score_rows(accuracies), terms, "ConvNet", 0.5, 0.5)
    assert found["hlr"]["values"] == pytest.approx([0.30, 0.28])
    assert found["ior"]["values"] == pytest.approx([0.20, 0.24])
    assert found["lrs"]["values"] == pytest.approx([0.24819, 0.26052], abs=1e-5)
    assert found["ars"]["values"] == pytest.approx([0.33780, 0.34778], abs=1e-5)
    assert found["lrs"]["mean"] == pytest.approx(np.mean([0.24819, 0.26052]), abs=1e-5)
    assert found["accuracies"]["random_no_aug"] == {"set": "random_no_aug", "test_accs": [0.45, 0.48]}
    weighted = eval_script.scores(score_rows(accuracies), terms, "ConvNet", 1.0, 0.0)
    assert weighted["lrs"]["values"][0] == pytest.approx(eval_script.normalised(0.20))  # w = 1: IOR alone
    assert weighted["ars"]["values"][0] == pytest.approx(eval_script.normalised(0.10))  # g = 0: without DSA alone


# Each row's networks as a stand-in trains them: row -> the accuracy of network 0, and network r adds
# r times the row's step, so that a score taken from any other row, or network, comes out another number.
ROW_ACCURACIES = {"syn": (0.60, 0.04), "syn_hard": (0.50, 0.03), "syn_no_aug": (0.55, 0.02), "random": (0.40, 0.01),
                  "random_no_aug": (0.45, 0.05), "full": (0.80, 0.06)}


def row_of(call, set_images, dsa):
    """The score term a stand-in training call trains, from what it was given (dsa: whether the command has DSA)."""
    if len(call["images"]) == 5000:
        return "full"
    term = "syn" if torch.equal(call["images"], set_images) else "random"
    term += "_hard" if term == "syn" and not call["labels"].is_floating_point() else ""
    return term + "_no_aug" * (dsa and call["dsa_strategy"] is None)


@pytest.mark.parametrize("dsa", [True, False])
def test_each_score_takes_its_terms_from_the_right_rows(buffers, tmp_path, monkeypatch, dsa):
    """A soft-label set (so that every term is its own row), 2 networks a row, trained by a stand-in
    whose accuracy names the row and the network: HLR, IOR, LRS and ARS equal DD-Ranking's formulas
    on exactly those rows, network by network, and each row of --out says whether it had DSA.
    Without DSA (--dsa False) the rows without it are not trained and ARS is n/a, not norm(IOR)."""
    images, logits = torch.randn(10, 1, 28, 28), torch.randn(10, 10)
    run_args = {"buffer_path": str(buffers), "dataset": "FashionMNIST-mini", "model": "ConvNetW16", "zca": False,
                "subset": "imagenette", "res": 128, "Label_Model_Timestamp": -1}
    run = write_run(tmp_path / "run", images, logits, syn_lr=0.02, meta={"model": "ConvNetW16", "args": run_args})
    trained, counts = [], {}

    def stand_in(net, images_, labels, test_images, test_labels, lr, epochs, batch_train, dsa_strategy, *rest, **kw):
        term = row_of({"images": images_, "labels": labels, "dsa_strategy": dsa_strategy}, images, dsa)
        network, counts[term] = counts.get(term, 0), counts.get(term, 0) + 1
        trained.append(term)
        base, step = ROW_ACCURACIES[term]
        return 1.0, base + step * network

    monkeypatch.setattr(evaluation, "evaluate_synset", stand_in)
    eval_script.main(["--syn_path", str(run), "--scores", "--num_eval", "2", "--dsa", str(dsa), "--device", "cpu",
                      "--out", str(tmp_path / "out.json")])
    expected_rows = set(ROW_ACCURACIES) - ({"syn_no_aug", "random_no_aug"} if not dsa else set())
    assert sorted(trained) == sorted(2 * list(expected_rows))
    acc = {term: np.array([base, base + step]) for term, (base, step) in ROW_ACCURACIES.items()}
    saved = json.loads((tmp_path / "out.json").read_text())
    found = saved["scores"]["ConvNetW16"]
    ior, hlr = acc["syn"] - acc["random"], acc["full"] - acc["syn_hard"]
    assert found["hlr"]["values"] == pytest.approx(hlr) and found["ior"]["values"] == pytest.approx(ior)
    assert found["lrs"]["values"] == pytest.approx(eval_script.normalised(0.5 * ior - 0.5 * hlr))
    if dsa:
        ars = eval_script.normalised(0.5 * ior + 0.5 * (acc["syn_no_aug"] - acc["random_no_aug"]))
        assert found["ars"]["values"] == pytest.approx(ars)
    else:
        assert "ars" not in found
    assert [row["dsa"] for row in saved["rows"]] == [dsa and "(no DSA)" not in row["set"] for row in saved["rows"]]


def test_a_hard_label_set_is_its_own_hard_label_row_and_the_json_holds_every_score(tmp_path, calls):
    """Five rows of one network each: the set with and without DSA, the random subset (the one
    --baseline random draws) with and without, the full data; the scores and their accuracies in --out."""
    run = write_run(tmp_path / "run", *one_per_class(), syn_lr=0.02, meta={})
    rows = eval_script.main(FAST + ["--syn_path", str(run), "--scores", "--num_eval", "1", "--baseline", "random",
                                    "--ipc", "1", "--out", str(tmp_path / "out.json")])
    assert [row["set"] for row in rows] == ["run/images_best.pt", "random", "run/images_best.pt (no DSA)",
                                            "random (no DSA)", "full"]
    assert [row["dsa"] for row in rows] == [True, True, False, False, True]
    assert [call["dsa_strategy"] for call in calls] == [DSA_STRATEGY, DSA_STRATEGY, None, None, DSA_STRATEGY]
    assert len(calls[4]["images"]) == 5000 and calls[4]["epochs"] == 50  # the full data, --epochs_full
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["syn_set"] == "run/images_best.pt"  # which rows are the set's own, for tools/published.py
    scores = saved["scores"]["ConvNetW8"]
    assert {"hlr", "ior", "lrs", "ars"} <= set(scores)
    assert scores["accuracies"]["syn_hard"]["set"] == "run/images_best.pt"  # the hard-label row, trained once
    assert scores["hlr"]["values"] == [0.0]  # every spy network scores 50%
    assert scores["lrs"]["mean"] == pytest.approx(eval_script.normalised(0.0))


def test_a_random_baseline_of_another_ipc_keeps_its_row_beside_the_scores_own(tmp_path, calls):
    run = write_run(tmp_path / "run", *one_per_class(), syn_lr=0.02, meta={})
    rows = eval_script.main(FAST + ["--syn_path", str(run), "--scores", "--num_eval", "1", "--baseline", "random",
                                    "--ipc", "2"])
    assert [(row["set"], row["ipc"]) for row in rows if row["set"].startswith("random")] == \
        [("random", 2), ("random (ipc 1)", 1), ("random (ipc 1) (no DSA)", 1)]


def test_a_soft_label_sets_hard_row_trains_on_the_argmax_and_its_random_subset_on_expert_logits(buffers, tmp_path,
                                                                                                   calls):
    run_distill(buffers, tmp_path / "run", "--Iteration", "1", "--soft_label")
    calls.clear()  # the run's own evaluations
    eval_script.main(["--syn_path", str(tmp_path / "run"), "--scores", "--num_eval", "1", "--device", "cpu"])
    logits = torch.load(tmp_path / "run" / "labels_best.pt")
    hard = [call for call in calls if not call["labels"].is_floating_point() and len(call["labels"]) == 10]
    assert len(hard) == 1 and torch.equal(hard[0]["labels"], logits.argmax(1))
    random = [call for call in calls if call["labels"].is_floating_point() and call["lr"] == 0.01]
    assert len(random) == 2 and random[0]["labels"].shape == (10, 10)  # with and without DSA
    assert not torch.equal(random[0]["images"], calls[0]["images"])  # real images, not the set's


def test_the_bar_says_how_many_networks_in_words(calls, capsys):
    eval_script.main(FAST + ["--baseline", "random", "--ipc", "1", "--num_eval", "1", "--epoch_eval_train", "1"])
    assert re.search(r"^evaluating 1 network: ", capsys.readouterr().err, re.M)  # not "1 networks"
