import itertools

import numpy as np
import pytest
import torch
from torch import nn

import networks
from networks import CONVNET_VARIANTS, MODELS, ConvNet, flatten_params, forward_flat, get_network

INPUTS = [(1, 28), (3, 32), (3, 64)]  # (channels, side): digits, CIFAR, Tiny (ImageNet subsets: below)


def fits(depth, channel, side):
    """ConvNet pools once per block; the first conv of a one-channel input grows it by 4 pixels."""
    return 2 ** depth <= side + (4 if channel == 1 else 0)


def small(kwargs):
    """A named variant shrunk to width <= 16 so the suite stays fast (the width variants differ only there)."""
    return {**kwargs, "width": min(kwargs.get("width", 128), 16)}


# The named variants, shrunk, each distinct configuration once (W32..W1024 all shrink to W16's)
SMALL_VARIANTS = {}
for variant, settings in CONVNET_VARIANTS.items():
    SMALL_VARIANTS.setdefault(tuple(sorted(small(settings).items())), variant)


@pytest.mark.parametrize("name,channel,side", [(name, channel, side) for name in SMALL_VARIANTS.values()
                                                for channel, side in INPUTS] + [("ConvNetD5", 3, 128)])
def test_functional_forward_equals_module_for_every_convnet_variant(name, channel, side):
    kwargs = small(CONVNET_VARIANTS[name])
    if not fits(kwargs.get("depth", 3), channel, side):
        with pytest.raises(ValueError, match="no pixels left"):
            ConvNet(channel, 10, (side, side), **kwargs)
        return
    torch.manual_seed(0)
    net = ConvNet(channel, 10, (side, side), **kwargs)
    x = torch.randn(4, channel, side, side)
    expected = net(x)  # train mode: batch norm uses batch statistics, as forward_flat does
    got = forward_flat(net, flatten_params(net), x)
    assert got.shape == (4, 10)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("width,depth,act,norm,pool", [
    (w, d, a, n, p) for w, d, a, n, p in itertools.product(
        [8], [1, 3], ["relu", "sigmoid", "leakyrelu"], list(networks.FLAT_NORMS), list(networks.FLAT_POOLS))])
def test_functional_forward_every_layer_combination(width, depth, act, norm, pool):
    torch.manual_seed(1)
    net = ConvNet(3, 7, (16, 16), width=width, depth=depth, act=act, norm=norm, pool=pool)
    x = torch.randn(2, 3, 16, 16)
    assert (forward_flat(net, flatten_params(net), x) - net(x)).abs().max().item() <= 1e-5


def test_functional_forward_differs_when_parameters_differ():
    """Guards the equality tests: forward_flat really reads the flat vector, not the module."""
    torch.manual_seed(0)
    net = ConvNet(3, 10, (32, 32), width=8)
    x = torch.randn(2, 3, 32, 32)
    other = flatten_params(net) + 0.1 * torch.randn(sum(p.numel() for p in net.parameters()))
    assert (forward_flat(net, other, x) - net(x)).abs().max().item() > 1e-3


LAYOUT_MODELS = ["ConvNet", "ConvNetBN", "ResNet18BN_AP", "VGG11", "LeNet", "MLP"]


@pytest.mark.parametrize("name", LAYOUT_MODELS)
def test_flat_vector_is_the_named_parameters_in_order_row_major(name):
    """Buffers map onto networks only through this layout: parameter k of named_parameters() fills
    the slice after parameters 0..k-1, element (i, j, ...) at its row-major offset in that slice."""
    torch.manual_seed(0)
    net = get_network(name, 3, 10, (32, 32))
    named = list(net.named_parameters())
    views = networks.unflatten(flatten_params(net), networks.param_shapes(net))
    assert len(views) == len(named)
    for view, (_, p) in zip(views, named):
        assert torch.equal(view, p)
    starts = np.cumsum([0] + [p.numel() for _, p in named])
    for k in sorted({0, len(named) // 2, len(named) - 1}):  # first, a middle and the last parameter
        p = named[k][1]
        element = tuple(side - 1 - side // 3 for side in p.shape)
        before = flatten_params(net)
        with torch.no_grad():
            p[element] += 1
        changed = (flatten_params(net) != before).nonzero().flatten().tolist()
        assert changed == [starts[k] + np.ravel_multi_index(element, tuple(p.shape))], named[k][0]


def test_convnet_parameter_names_are_the_originals():
    """The original ConvNet's parameters, in order: a buffer row is these tensors concatenated."""
    names = [name for name, _ in get_network("ConvNet", 3, 10).named_parameters()]
    blocks = [f"features.{4 * d + i}.{kind}" for d in range(3) for i in (0, 1) for kind in ("weight", "bias")]
    assert names == blocks + ["classifier.weight", "classifier.bias"]


def test_convnet_matches_the_original_parameter_count():
    """320,010 parameters is the original ConvNet on CIFAR-10; buffers map 1:1 only if this holds."""
    assert flatten_params(get_network("ConvNet", 3, 10, (32, 32))).numel() == 320010
    assert [tuple(s) for s in networks.param_shapes(get_network("ConvNet", 3, 10))] == [
        (128, 3, 3, 3), (128,), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128,),
        (128, 128, 3, 3), (128,), (128,), (128,), (10, 2048), (10,)]


@pytest.mark.parametrize("name", [name for name in MODELS if name not in CONVNET_VARIANTS])
@pytest.mark.parametrize("channel,side", [(1, 28), (3, 32)])
def test_every_other_architecture_runs_at_a_flat_vector_as_the_module_does(name, channel, side):
    """MLP, LeNet, AlexNet, VGG11 and the ResNets go through torch.func (batch norm in train mode)."""
    torch.manual_seed(0)
    net = get_network(name, channel, 10, (side, side))
    x = torch.randn(2, channel, side, side)
    expected = net(x)
    got = forward_flat(net, flatten_params(net), x)
    assert got.shape == (2, 10) and (got - expected).abs().max().item() <= 1e-5
    assert (forward_flat(net, flatten_params(net) * 0.5, x) - expected).abs().max().item() > 1e-3


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'ConvNett'"):
        get_network("ConvNett", 3, 10)


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "layernorm", "groupnorm"])
def test_functional_forward_gradcheck_and_gradgradcheck(norm):
    """Distillation differentiates the unroll twice: check both orders against finite differences
    in float64, in the parameters and in the images."""
    torch.manual_seed(0)
    net = ConvNet(3, 3, (4, 4), width=4, depth=2, norm=norm, act="sigmoid").double()
    flat = flatten_params(net).requires_grad_()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    f = lambda theta, images: forward_flat(net, theta, images)
    # fast mode: the Jacobians compared along random directions, not column by column (4x sooner)
    assert torch.autograd.gradcheck(f, (flat, x), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (flat, x), fast_mode=True)


def test_generic_functional_path_gradgradcheck():
    """Any module (here a small one: gradgradcheck's Jacobian is params x params) runs at a flat vector."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    flat = flatten_params(net).requires_grad_()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    f = lambda theta, images: forward_flat(net, theta, images)
    assert torch.autograd.gradcheck(f, (flat, x))
    assert torch.autograd.gradgradcheck(f, (flat, x))
