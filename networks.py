"""The architectures of the DC/DSA/MTT benchmarks, and a forward pass on a flat parameter vector.

Distillation unrolls a student as one flat vector theta (`net.parameters()` concatenated, the layout of the
original's trajectory buffers), so every update theta - lr * grad stays one differentiable tensor op."""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = {  # (channels, feature map shape) -> layer; instance norm is one group per channel
    "instancenorm": lambda c, hw: nn.GroupNorm(c, c, affine=True),
    "groupnorm": lambda c, hw: nn.GroupNorm(4, c, affine=True),
    "layernorm": lambda c, hw: nn.LayerNorm([c, *hw], elementwise_affine=True),
    "batchnorm": lambda c, hw: nn.BatchNorm2d(c),
}
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leakyrelu": partial(nn.LeakyReLU, 0.01)}
POOLS = {"avgpooling": nn.AvgPool2d, "maxpooling": nn.MaxPool2d}

# The same layers as functions of (x, iterator over parameter views), for forward_flat.
FLAT_NORMS = {
    "none": lambda x, p: x,
    "instancenorm": lambda x, p: F.group_norm(x, x.shape[1], next(p), next(p)),
    "groupnorm": lambda x, p: F.group_norm(x, 4, next(p), next(p)),
    "layernorm": lambda x, p: F.layer_norm(x, x.shape[1:], next(p), next(p)),
    "batchnorm": lambda x, p: F.batch_norm(x, None, None, next(p), next(p), training=True),
}
FLAT_ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "leakyrelu": partial(F.leaky_relu, negative_slope=0.01)}
FLAT_POOLS = {"none": lambda x: x, "avgpooling": partial(F.avg_pool2d, kernel_size=2, stride=2),
              "maxpooling": partial(F.max_pool2d, kernel_size=2, stride=2)}


class ConvNet(nn.Module):
    """depth x [conv3x3 -> norm -> act -> pool], then one linear layer; one-channel inputs get padding 3
    on the first conv, so 28x28 digits become 32x32 maps. forward_flat is written in torch.nn.functional."""

    def __init__(self, channel, num_classes, im_size, width=128, depth=3, act="relu",
                 norm="instancenorm", pool="avgpooling"):
        super().__init__()
        self.act, self.norm, self.pool = act, norm, pool
        self.paddings = [3 if channel == 1 and d == 0 else 1 for d in range(depth)]
        layers, c, (h, w) = [], channel, im_size
        for pad in self.paddings:
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            layers.append(nn.Conv2d(c, width, kernel_size=3, padding=pad))
            if norm != "none":
                layers.append(NORMS[norm](width, (h, w)))
            layers.append(ACTIVATIONS[act]())
            if pool != "none":
                if min(h, w) < 2:
                    raise ValueError(f"ConvNet of depth {depth} pools {depth} times: "
                                     f"a {im_size[0]}x{im_size[1]} input has no pixels left")
                layers.append(POOLS[pool](kernel_size=2, stride=2))
                h, w = h // 2, w // 2
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)
        self.shapes = param_shapes(self)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

    def forward_flat(self, flat, x):
        params = iter(unflatten(flat, self.shapes))
        for pad in self.paddings:
            x = F.conv2d(x, next(params), next(params), padding=pad)
            x = FLAT_POOLS[self.pool](FLAT_ACTIVATIONS[self.act](FLAT_NORMS[self.norm](x, params)))
        return F.linear(x.flatten(1), next(params), next(params))


def _flat_size(features, channel, im_size):
    """Features per image, from a dummy image (in eval mode: batch norm's running statistics stay as built)."""
    with torch.no_grad():
        n = features.eval()(torch.zeros(1, channel, *im_size)).numel()
    features.train()
    return n


def mlp(channel, num_classes, im_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(channel * im_size[0] * im_size[1], 128), nn.ReLU(),
                         nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, num_classes))


def lenet(channel, num_classes, im_size):
    features = nn.Sequential(
        nn.Conv2d(channel, 6, kernel_size=5, padding=2 if channel == 1 else 0), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, 2))
    return nn.Sequential(features, nn.Flatten(), nn.Linear(_flat_size(features, channel, im_size), 120), nn.ReLU(),
                         nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


def alexnet(channel, num_classes, im_size):
    features = nn.Sequential(
        nn.Conv2d(channel, 128, kernel_size=5, padding=4 if channel == 1 else 2), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(128, 192, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(192, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 192, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(192, 192, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
    return nn.Sequential(features, nn.Flatten(), nn.Linear(_flat_size(features, channel, im_size), num_classes))


def vgg11(channel, num_classes, im_size, norm="instancenorm"):
    layers, c = [], channel
    for i, v in enumerate([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=3 if channel == 1 and i == 0 else 1),
                       NORMS[norm](v, None), nn.ReLU()]
            c = v
    features = nn.Sequential(*layers)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(_flat_size(features, channel, im_size), num_classes))


class BasicBlock(nn.Module):
    """ResNet basic block; with avgpool a stride-2 conv becomes a stride-1 conv and a 2x2 average pool."""

    def __init__(self, in_planes, planes, stride, norm, avgpool):
        super().__init__()
        conv_stride = 1 if avgpool else stride
        pool = (lambda: nn.AvgPool2d(2, 2)) if avgpool and stride != 1 else nn.Identity
        self.downsample = pool()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = NORMS[norm](planes, None)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = NORMS[norm](planes, None)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=conv_stride, bias=False),
                                          pool(), NORMS[norm](planes, None))

    def forward(self, x):
        out = self.downsample(F.relu(self.bn1(self.conv1(x))))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, channel, num_classes, im_size, norm="instancenorm", avgpool=False):
        super().__init__()
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
            layers.append(BasicBlock(in_planes, planes, stride, norm, avgpool))
            in_planes = planes
        # The plain ResNet ends with a 4x4 average pool; the _AP variant flattens the whole map.
        self.features = nn.Sequential(nn.Conv2d(channel, 64, kernel_size=3, stride=1, padding=1, bias=False),
                                      NORMS[norm](64, None), nn.ReLU(), *layers,
                                      nn.Identity() if avgpool else nn.AvgPool2d(4), nn.Flatten())
        self.classifier = nn.Linear(_flat_size(self.features, channel, im_size), num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


CONVNET_VARIANTS = {
    "ConvNet": {},
    **{f"ConvNetD{d}": {"depth": d} for d in range(1, 9)},
    **{f"ConvNetW{w}": {"width": w} for w in (8, 16, 32, 64, 128, 256, 512, 1024)},  # W8, W16: quick CPU runs
    "ConvNetAS": {"act": "sigmoid"}, "ConvNetAR": {"act": "relu"}, "ConvNetAL": {"act": "leakyrelu"},
    "ConvNetNN": {"norm": "none"}, "ConvNetBN": {"norm": "batchnorm"}, "ConvNetLN": {"norm": "layernorm"},
    "ConvNetIN": {"norm": "instancenorm"}, "ConvNetGN": {"norm": "groupnorm"},
    "ConvNetNP": {"pool": "none"}, "ConvNetMP": {"pool": "maxpooling"}, "ConvNetAP": {"pool": "avgpooling"},
    "ConvNetKIP": {"width": 1024, "norm": "none"},
}
MODELS = {
    **{name: partial(ConvNet, **kwargs) for name, kwargs in CONVNET_VARIANTS.items()},
    "MLP": mlp, "LeNet": lenet, "AlexNet": alexnet, "VGG11": vgg11, "VGG11BN": partial(vgg11, norm="batchnorm"),
    "ResNet18": ResNet18, "ResNet18BN": partial(ResNet18, norm="batchnorm"),
    "ResNet18_AP": partial(ResNet18, avgpool=True), "ResNet18BN_AP": partial(ResNet18, norm="batchnorm", avgpool=True),
}


def get_network(model, channel, num_classes, im_size=(32, 32)):
    """A freshly initialised `model` from torch's global RNG: seed it to repeat an initialisation."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    return MODELS[model](channel, num_classes, tuple(im_size))


def param_shapes(net):
    return [p.shape for p in net.parameters()]


def unflatten(flat, shapes):
    """Views of `flat` shaped like the parameters (differentiable; no copy)."""
    return [chunk.view(shape) for chunk, shape in zip(torch.split(flat, [math.prod(s) for s in shapes]), shapes)]


def flatten_params(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def forward_flat(net, flat, x):
    """`net` evaluated at the flat parameters `flat`; differentiable twice in both arguments."""
    if isinstance(net, ConvNet):
        return net.forward_flat(flat, x)
    names = [name for name, _ in net.named_parameters()]
    return torch.func.functional_call(net, dict(zip(names, unflatten(flat, param_shapes(net)))), (x,))
