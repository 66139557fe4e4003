"""DATM's soft labels, image choice, loss gate and difficulty window; FTD's image EMA; the
validation-picked "best"."""
import json
import re

import numpy as np
import pytest
import torch
from helpers import TINY, crash_at, load, run_distill

import distill
from distill import (
    choose_real,
    draw_segment,
    init_label_logits,
    parse_args,
    start_epoch_window,
    validation_split,
)
from mtt import matching
from mtt.training import predict
from mtt.trajectories import Experts
from networks import ConvNet, flatten_params
from utils import UsageError


def test_no_datm_flag_is_mtt_and_any_datm_flag_brings_datm_defaults():
    mtt = parse_args(TINY)
    assert (mtt.datm, mtt.threshold, mtt.Sequential_Generation, mtt.min_start_epoch) == (False, None, False, 0)
    for flags in (["--soft_label"], ["--pix_init", "samples_predicted_correctly"], ["--threshold", "1.2"],
                  ["--current_max_start_epoch", "5"]):
        datm = parse_args(TINY + flags)
        assert datm.datm and datm.Sequential_Generation is True and datm.expansion_end_epoch == 3000
        assert (datm.lr_y, datm.Momentum_y, datm.Label_Model_Timestamp) == (2.0, 0.9, -1)
        assert datm.threshold == (1.2 if "--threshold" in flags else 1.0)
    assert parse_args(TINY + ["--soft_label", "--Sequential_Generation", "False"]).Sequential_Generation is False


@pytest.mark.parametrize("it,expected", [(0, (2, 10)), (500, (2, 12)), (999, (2, 14)), (1000, (2, 15)),
                                         (5000, (2, 15))])
def test_the_difficulty_window_grows_by_the_formula(it, expected):
    """upper = min(max, current_max + int((max - current_max) * it / expansion_end)), lower = min_start_epoch."""
    args = parse_args(TINY + ["--min_start_epoch", "2", "--current_max_start_epoch", "10", "--max_start_epoch", "15",
                              "--expansion_end_epoch", "1000"])
    assert start_epoch_window(args, it) == expected
    assert start_epoch_window(parse_args(TINY + ["--max_start_epoch", "15"]), it) == (0, 15)


class Trajectories:
    """Experts whose snapshot e of expert k is the vector (k, e): start and target are telling."""

    def __init__(self, experts, snapshots):
        self.arrays = [np.array([[k, e] for e in range(snapshots)], dtype=np.float32) for k in range(experts)]

    def __len__(self):
        return len(self.arrays)

    def trajectory(self, k):
        return self.arrays[k]

    snapshot = Experts.snapshot  # the real reading of one snapshot from a trajectory


def test_drawn_start_epochs_stay_inside_the_window_and_fill_it():
    experts, window = Trajectories(3, 30), (4, 9)
    torch.manual_seed(0)
    draws = [draw_segment(experts, window, 2, "cpu") for _ in range(300)]
    starts = {start for _, _, _, start in draws}
    assert starts == set(range(4, 9))
    for theta0, target, expert, start in draws:
        assert theta0.tolist() == [expert, start] and target.tolist() == [expert, start + 2]


def expert_thetas(mini, count=2, steps=40):
    """Parameters of small ConvNets trained briefly on the embedded data: experts that classify
    some images of each class correctly and some not."""
    thetas, net = [], None
    for seed in range(count):
        torch.manual_seed(seed)
        net = ConvNet(1, 10, (28, 28), width=8, depth=2)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        for idx in torch.randperm(len(mini.labels_train))[:steps * 32].split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(mini.images_train[idx]), mini.labels_train[idx]).backward()
            optimizer.step()
        thetas.append(flatten_params(net))
    return net, thetas


@pytest.fixture(scope="module")
def two_experts(mini):
    return expert_thetas(mini)


def test_samples_predicted_correctly_keeps_only_images_an_expert_classifies_correctly(mini, two_experts):
    net, thetas = two_experts
    pool = torch.ones(len(mini.labels_train), dtype=torch.bool)
    torch.manual_seed(0)
    chosen = choose_real(mini, pool, 20, "samples_predicted_correctly", thetas, net)
    labels = mini.labels_train[chosen]
    assert labels.tolist() == [c for c in range(10) for _ in range(20)] and len(set(chosen.tolist())) == 200
    first = predict(net, thetas[0], mini.images_train[chosen]).argmax(1) == labels
    second = predict(net, thetas[1], mini.images_train[chosen]).argmax(1) == labels
    assert (first | second).all()  # each chosen image is classified correctly by the expert that chose it
    everything = predict(net, thetas[0], mini.images_train).argmax(1) == mini.labels_train
    assert 0.2 < everything.float().mean() < 0.95  # the choice is not trivial: the expert is often wrong
    torch.manual_seed(0)
    plain = choose_real(mini, pool, 20, "real", thetas, net)
    assert not (predict(net, thetas[0], mini.images_train[plain]).argmax(1) == mini.labels_train[plain]).all()


def test_a_class_without_enough_correct_images_is_one_line_naming_it(mini):
    net, thetas = expert_thetas(mini, count=1, steps=2)
    pool = torch.ones(len(mini.labels_train), dtype=torch.bool)
    with pytest.raises(UsageError, match=r"classify only \d+ images of class \d \(.+\) correctly, fewer than --ipc"):
        choose_real(mini, pool, 400, "samples_predicted_correctly", thetas, net)


def test_initial_label_logits_average_the_experts_that_are_right(mini, two_experts):
    net, thetas = two_experts
    images, labels = mini.images_train[:64], mini.labels_train[:64]
    logits = [predict(net, theta, images) for theta in thetas]
    right = [(lg.argmax(1) == labels) for lg in logits]
    got = init_label_logits(net, images, labels, thetas, filtered=True)
    for i in range(64):
        voters = [lg[i] for lg, ok in zip(logits, right) if ok[i]]
        expected = torch.stack(voters).mean(0) if voters else torch.zeros(10)
        assert torch.allclose(got[i], expected, atol=1e-6)
    assert torch.equal(init_label_logits(net, images, labels, thetas, filtered=False), logits[0])
    assert any(r.sum() < 64 for r in right) and (right[0] != right[1]).any()  # the filter matters here


def test_a_soft_label_run_saves_datm_files_and_learns_its_logits(buffers, tmp_path):
    run_distill(buffers, tmp_path, "--Iteration", "3", "--eval_it", "3", "--soft_label", "--threshold", "10",
                "--lr_y", "5")
    logits0, logits3 = load(tmp_path / "labels_0.pt"), load(tmp_path / "labels_3.pt")
    assert logits3.dtype == torch.float32 and logits3.shape == (10, 10) and not torch.equal(logits0, logits3)
    assert (logits0.argmax(1) == torch.arange(10)).float().mean() >= 0.5  # an expert's logits, mostly right
    assert torch.equal(load(tmp_path / "lr_3.pt"), load(tmp_path / "syn_lr_3.pt"))
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["soft_label"] is True and meta["args"]["Sequential_Generation"] is True


def test_the_loss_gate_skips_the_update_of_an_iteration_over_threshold(buffers, tmp_path, monkeypatch):
    def loss_two(net, synset, *args):
        for tensor in synset.tensors.values():
            tensor.grad = torch.ones_like(tensor)
        return torch.tensor(2.0)

    monkeypatch.setitem(matching.BACKWARD, False, loss_two)
    run_distill(buffers, tmp_path / "gated", "--Iteration", "2", "--eval_it", "2", "--threshold", "1.5")
    run_distill(buffers, tmp_path / "open", "--Iteration", "2", "--eval_it", "2", "--threshold", "2.5")
    gated, open_ = (tmp_path / "gated", tmp_path / "open")
    assert torch.equal(load(gated / "images_2.pt"), load(gated / "images_0.pt"))
    assert not torch.equal(load(open_ / "images_2.pt"), load(open_ / "images_0.pt"))
    rows = [json.loads(line) for line in open(gated / "log.jsonl") if '"iteration"' in line]
    assert [row.get("skipped") for row in rows] == [True, True]


def test_the_image_ema_equals_its_closed_form(buffers, tmp_path, monkeypatch):
    """With a constant gradient g the images follow x_k = x_0 - lr * sum_{j<=k} (1 - m^j) / (1 - m) g
    (SGD, momentum m = 0.5), and the EMA after k updates is d^k x_0 + (1 - d) sum_j d^(k-j) x_j."""
    g = 0.01

    def constant(net, synset, *args):
        synset.images.grad = torch.full_like(synset.images, g)
        synset.syn_lr.grad = torch.zeros_like(synset.syn_lr)
        return torch.tensor(0.5)

    monkeypatch.setitem(matching.BACKWARD, False, constant)
    k, decay, lr = 4, 0.7, 10.0
    run_distill(buffers, tmp_path, "--Iteration", str(k), "--eval_it", str(k), "--ema_decay", str(decay))
    x0 = load(tmp_path / "images_0.pt").double()
    xs = [x0 - lr * g * sum((1 - 0.5 ** i) / 0.5 for i in range(1, j + 1)) for j in range(k + 1)]
    expected = decay ** k * x0 + (1 - decay) * sum(decay ** (k - j) * xs[j] for j in range(1, k + 1))
    assert torch.allclose(load(tmp_path / f"images_{k}.pt").double(), xs[k], atol=1e-5)
    assert torch.allclose(load(tmp_path / f"ema_images_{k}.pt").double(), expected, atol=1e-5)
    assert not torch.allclose(expected, xs[k], atol=1e-3)  # the EMA lags the images
    for name in ("ema_images_best.pt", "ema_labels_best.pt", "ema_syn_lr_best.pt", "ema_synthetic_0.png"):
        assert (tmp_path / name).exists(), name
    evaluated = {json.loads(line)["set"] for line in open(tmp_path / "log.jsonl") if '"evaluation"' in line}
    assert evaluated == {"images", "ema_images"}


def test_resume_is_bit_identical_with_soft_labels_and_ema(buffers, tmp_path, monkeypatch):
    flags = ["--Iteration", "4", "--eval_it", "2", "--soft_label", "--threshold", "10", "--ema_decay", "0.9"]
    run_distill(buffers, tmp_path / "straight", *flags)
    real_backward = crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_distill(buffers, tmp_path / "resumed", *flags)
    monkeypatch.setitem(matching.BACKWARD, False, real_backward)
    run_distill(buffers, tmp_path / "resumed", *flags, "--resume")
    for name in ("images_4.pt", "labels_4.pt", "syn_lr_4.pt", "ema_images_4.pt"):
        assert torch.equal(load(tmp_path / "straight" / name), load(tmp_path / "resumed" / name)), name


def test_the_validation_split_is_seeded_disjoint_and_kept_out_of_the_initial_images(mini):
    held, keep = validation_split(mini, 7, seed=3)
    again, _ = validation_split(mini, 7, seed=3)
    other, _ = validation_split(mini, 7, seed=4)
    assert torch.equal(held, again) and not torch.equal(held, other)
    assert torch.bincount(mini.labels_train[held], minlength=10).tolist() == [7] * 10
    assert not keep[held].any() and keep.sum() == len(keep) - 70
    torch.manual_seed(0)
    chosen = choose_real(mini, keep, 495, "real", [], None)
    assert not set(chosen.tolist()) & set(held.tolist())
    with pytest.raises(UsageError, match="smallest class has 493 \\(after --val_per_class\\)"):
        distill.init_images(mini, 494, pool=keep)


def test_best_is_picked_on_validation_and_reported_with_its_test_accuracy(buffers, tmp_path, capsys):
    run_distill(buffers, tmp_path, "--Iteration", "2", "--eval_it", "1", "--val_per_class", "20")
    closing = capsys.readouterr().out.splitlines()[-1]
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"evaluation"' in line]
    assert [row["best_picked_on"] for row in rows] == ["validation"] * 3
    # one network on the 20 x 10 held-out images (not the test set): accuracies in steps of 1/200
    assert all(abs(200 * row["val_acc_mean"] - round(200 * row["val_acc_mean"])) < 1e-9 for row in rows)
    assert any(row["val_acc_mean"] != row["test_acc_mean"] for row in rows)
    best = max(rows, key=lambda row: (row["val_acc_mean"], -row["it"]))
    assert (rows[-1]["best_it"], rows[-1]["best_test_acc_mean"]) == (best["it"], best["test_acc_mean"])
    assert closing == (f"best ConvNetW16 (picked on validation): {100 * best['test_acc_mean']:.2f} +- "
                       f"{100 * best['test_acc_std']:.2f} at iteration {best['it']}")


def test_skip_first_eva_evaluates_from_eval_it_and_a_run_killed_before_it_starts_again(buffers, tmp_path,
                                                                                         monkeypatch):
    """DATM's flag: no evaluation, hence no checkpoint, at iteration 0; a run killed before its first
    evaluation has nothing to resume from, and --resume starts it again from 0, to the same images."""
    flags = ["--Iteration", "2", "--eval_it", "1", "--skip_first_eva", "--seed", "5"]
    run_distill(buffers, tmp_path / "straight", *flags)
    evaluated = [json.loads(line)["it"] for line in open(tmp_path / "straight" / "log.jsonl") if '"evaluation"' in line]
    assert evaluated == [1, 2] and not (tmp_path / "straight" / "images_0.pt").exists()
    real_backward = crash_at(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        run_distill(buffers, tmp_path / "resumed", *flags)
    monkeypatch.setitem(matching.BACKWARD, False, real_backward)
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    run_distill(buffers, tmp_path / "resumed", *flags, "--resume")
    assert torch.equal(load(tmp_path / "straight" / "images_2.pt"), load(tmp_path / "resumed" / "images_2.pt"))


def test_the_datm_defaults_a_run_takes_are_kept_in_run_json(buffers, tmp_path):
    run_distill(buffers, tmp_path, "--Iteration", "0", "--threshold", "5")
    args = json.loads((tmp_path / "run.json").read_text())["args"]
    assert args["method_defaults"] == {"soft_label": True, "pix_init": "samples_predicted_correctly",
                                       "Label_Model_Timestamp": -1, "lr_y": 2.0, "Momentum_y": 0.9,
                                       "min_start_epoch": 0, "current_max_start_epoch": 20,
                                       "expansion_end_epoch": 3000, "Sequential_Generation": True}
    assert load(tmp_path / "labels_0.pt").shape == (10, 10)  # the soft labels were on


def test_skipped_updates_are_counted_on_the_bar_and_in_the_printed_lines(buffers, tmp_path, capsys):
    run_distill(buffers, tmp_path, "--Iteration", "2", "--threshold", "1e-6")
    captured = capsys.readouterr()
    assert "it 00000/2 loss " in captured.out and " skipped 1 (loss over --threshold 1e-06)" in captured.out
    assert re.search(r"^distill: 100% 4/4 \[.* skipped 2 \(loss over --threshold 1e-06\)\]$", captured.err, re.M)
