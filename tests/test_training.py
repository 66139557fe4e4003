import re

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import utils
from mtt import parallel, training
from mtt.data import images_per_class
from mtt.evaluation import eval_pool, evaluate_synset
from networks import ConvNet, flatten_params
from utils import set_seed


def random_subset(data, per_class):
    return torch.cat([idx[torch.randperm(len(idx))[:per_class]] for idx in images_per_class(data.labels_train, 10)])


def test_accuracy_is_against_the_test_labels(mini):
    """The other side of test_eval's margin (10 real images per class train a network to well above
    chance): taught that each class is the next one, a network scores below chance on the true test
    labels and well above it on the shifted ones. Measured
    at 50 epochs over seeds 0-4: 1.2-2.2% true, 65.6-72.7% shifted (chance 10%)."""
    set_seed(0)
    idx = random_subset(mini, 10)
    shift = lambda labels: (labels + 1) % 10
    net = ConvNet(1, 10, (28, 28), width=16)
    _, test_acc = evaluate_synset(net, mini.images_train[idx], shift(mini.labels_train[idx]),
                                  mini.images_test, mini.labels_test, lr=0.01, epochs=50)
    assert test_acc < 0.05
    assert training.accuracy(net, mini.images_test, shift(mini.labels_test)) > 0.5


def test_same_seed_repeats_an_evaluation_exactly(mini):
    results = []
    for _ in range(2):
        set_seed(7)
        idx = random_subset(mini, 2)
        net = ConvNet(1, 10, (28, 28), width=8)
        acc = evaluate_synset(net, mini.images_train[idx], mini.labels_train[idx], mini.images_test[:200],
                              mini.labels_test[:200], lr=0.01, epochs=4)
        results.append((idx, acc, flatten_params(net)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize("epochs", [6, 7])
def test_lr_decays_tenfold_after_pass_half_the_epochs_plus_one(epochs):
    """As the original: epochs + 1 passes, the lr x0.1 from the pass after pass epochs//2 + 1
    (0-based), with a fresh optimiser (momentum restarted). 4 images in batches of 2: two steps a pass."""
    steps = []
    record = lambda optimizer, args, kwargs: steps.append((optimizer, optimizer.param_groups[0]["lr"]))
    hook = register_optimizer_step_pre_hook(record)
    try:
        x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
        evaluate_synset(ConvNet(1, 4, (8, 8), width=4, depth=1), x, y, x, y, lr=0.5, epochs=epochs, batch_train=2,
                        dsa_strategy=None)
    finally:
        hook.remove()
    before = 2 * (epochs // 2 + 2)  # the steps of passes 0 .. epochs//2 + 1
    assert [lr for _, lr in steps] == pytest.approx([0.5] * before + [0.05] * (2 * (epochs + 1) - before))
    optimizers = [optimizer for optimizer, _ in steps]
    assert optimizers == [optimizers[0]] * before + [optimizers[-1]] * (len(steps) - before)
    assert optimizers[0] is not optimizers[-1]


def test_texture_training_uses_crops_of_the_canvases():
    shapes = []
    net = ConvNet(1, 2, (8, 8), width=4, depth=1)
    net.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
    canvases, labels = torch.randn(2, 1, 16, 16), torch.tensor([0, 1])
    opt = torch.optim.SGD(net.parameters(), 0.1)
    training.train_epoch(net, canvases, labels, opt, batch_size=256, dsa_strategy=None, texture=((8, 8), 3))
    assert shapes == [(6, 1, 8, 8)]


def test_eval_pools_follow_the_original():
    assert eval_pool("S", "ConvNetBN") == ["ConvNet"]
    assert eval_pool("S", "ResNet18BN_AP") == ["ResNet18"]  # the original's split("BN")[0]
    assert eval_pool("S", "ConvNetD4") == ["ConvNetD4"]
    assert eval_pool("C", "ConvNetD4") == ["ConvNetD4", "ConvNet"]
    assert eval_pool("C", "ConvNet") == ["ConvNet"]
    assert eval_pool("M", "ConvNet") == ["ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18"]


def picked(device):
    """pick_device's answer as text: the device, or its error message."""
    try:
        return str(parallel.pick_device(device))
    except utils.UsageError as err:
        return str(err)


def test_pick_device_takes_cpu_and_cuda_only_where_torch_sees_a_gpu():
    """On this CPU machine --device cuda is a one-line error; on a GPU machine it is the GPU."""
    cuda = torch.cuda.is_available()
    assert picked("cpu") == "cpu" and picked(None) == ("cuda" if cuda else "cpu")
    for name in ("cuda", "cuda:0"):
        assert re.fullmatch(re.escape(name) if cuda else rf"--device {name}: .*no CUDA GPU.*", picked(name))
    assert re.fullmatch(r"unknown --device 'gpu'.*", picked("gpu"))
    assert re.fullmatch(r"--device mps: only cuda and cpu are supported", picked("mps"))


GPU_MACHINES = {  # GPUs torch sees -> {--device: what pick_device gives (a regex of one line)}
    0: {None: "cpu", "cuda:1": r"--device cuda:1: .*no CUDA GPU.*"},
    2: {None: "cuda", "cuda:1": "cuda:1", "cuda:2": r"--device cuda:2: only 2 CUDA device\(s\) here"},
}


@pytest.mark.parametrize("gpus", GPU_MACHINES)
def test_pick_device_follows_the_gpus_torch_sees(monkeypatch, gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for device, expected in GPU_MACHINES[gpus].items():
        assert re.fullmatch(expected, picked(device)), device
