import pytest
import torch

import utils
from networks import ConvNet, flatten_params
from utils import evaluate_synset, get_dataset, images_per_class, set_seed


@pytest.fixture(scope="module")
def mini():
    return get_dataset("FashionMNIST-mini")


def random_subset(data, per_class):
    return torch.cat([idx[torch.randperm(len(idx))[:per_class]] for idx in images_per_class(data.labels_train, 10)])


def test_ten_real_images_per_class_train_a_convnet_well_above_chance(mini):
    """100 real Fashion-MNIST images give a small ConvNet about 70% test accuracy (DC's random
    baseline at ipc 10 is 73.8% with the full-width net). Chance is 10%: asserting > 50% leaves
    a 20-point margin for seed-to-seed spread (a few points) and the short schedule."""
    set_seed(0)
    idx = random_subset(mini, 10)
    net = ConvNet(1, 10, (28, 28), width=16)
    train_acc, test_acc = evaluate_synset(net, mini.images_train[idx], mini.labels_train[idx],
                                          mini.images_test, mini.labels_test, lr=0.01, epochs=150)
    assert train_acc > 0.7
    assert test_acc > 0.5


def test_an_untrained_network_is_at_chance(mini):
    """The other side of the margin above: with lr 0 nothing is learned."""
    set_seed(0)
    idx = random_subset(mini, 10)
    net = ConvNet(1, 10, (28, 28), width=16)
    _, test_acc = evaluate_synset(net, mini.images_train[idx], mini.labels_train[idx],
                                  mini.images_test, mini.labels_test, lr=0.0, epochs=2)
    assert test_acc < 0.3


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


def test_lr_decays_once_after_half_the_epochs(monkeypatch):
    made = []
    real_sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda params, lr, **kw: made.append(lr) or real_sgd(params, lr, **kw))
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    evaluate_synset(ConvNet(1, 4, (8, 8), width=4, depth=1), x, y, x, y, lr=0.5, epochs=6, dsa_strategy=None)
    assert made == [0.5, pytest.approx(0.05)]


def test_texture_training_uses_crops_of_the_canvases():
    shapes = []
    net = ConvNet(1, 2, (8, 8), width=4, depth=1)
    net.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
    canvases, labels = torch.randn(2, 1, 16, 16), torch.tensor([0, 1])
    opt = torch.optim.SGD(net.parameters(), 0.1)
    utils.train_epoch(net, canvases, labels, opt, batch_size=256, dsa_strategy=None, texture=((8, 8), 3))
    assert shapes == [(6, 1, 8, 8)]


def test_eval_pools_follow_the_original():
    assert utils.eval_pool("S", "ConvNetBN") == ["ConvNet"]
    assert utils.eval_pool("S", "ConvNetD4") == ["ConvNetD4"]
    assert utils.eval_pool("C", "ConvNetD4") == ["ConvNetD4", "ConvNet"]
    assert utils.eval_pool("M", "ConvNet") == ["ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18"]
    with pytest.raises(utils.UsageError, match="--eval_mode"):
        utils.eval_pool("Q", "ConvNet")


def test_pick_device_defaults_to_what_is_present():
    assert utils.pick_device("cpu").type == "cpu"
    assert utils.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
