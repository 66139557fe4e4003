"""Training and testing a network on a set of images, one epoch at a time: the experts' epochs
(buffer.py) and the evaluation networks' (mtt/evaluation.py)."""
import torch
import torch.nn.functional as F

from mtt.augment import apply_augmentation, draw_augmentation, draw_texture_crops, texture_crops
from networks import forward_flat

INFERENCE_BATCH = 500  # images per forward pass when only predicting
def decay_epoch(epochs):
    """The epoch after which the original divides the lr by ten, for experts and evaluations alike."""
    return epochs // 2 + 1


def cross_entropy(logits, targets):
    """Class ids: the usual cross-entropy. N x C label logits (DATM's soft labels): the cross-entropy against
    softmax(targets) at temperature 1, summed over classes, averaged over the batch, as DATM trains its networks."""
    if targets.is_floating_point():
        return -(F.log_softmax(logits, 1) * F.softmax(targets, 1)).sum() / len(logits)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def accuracy(net, images, labels):
    """The fraction of the images the network classifies as labelled, read from the device once."""
    net.eval()
    batches = zip(images.split(INFERENCE_BATCH), labels.split(INFERENCE_BATCH))
    return sum((net(x).argmax(1) == y).sum() for x, y in batches).item() / len(labels)


@torch.no_grad()
def predict(net, theta, images):
    """The logits of the network at the flat parameters theta for the images, in batches."""
    return torch.cat([forward_flat(net, theta, x) for x in images.split(INFERENCE_BATCH)])


def sgd_step(net, x, y, optimizer):
    """train_epoch's update: one gradient step of `optimizer` on the batch; returns the outputs."""
    out = net(x)
    optimizer.zero_grad(set_to_none=True)
    cross_entropy(out, y).backward()
    optimizer.step()
    return out


def train_epoch(net, images, labels, optimizer, batch_size, dsa_strategy=None, texture=None, step=sgd_step):
    """One shuffled pass over (images, labels: class ids or label logits), DSA on every batch (one draw per image),
    `step` on each (buffer.py's GSAM takes sgd_step's place); texture = (res, samples) trains on random crops of
    canvases. Returns the training accuracy as a 0-dim tensor: reading it (a wait for the GPU) every epoch is slow."""
    net.train()
    correct, seen = torch.zeros((), device=images.device), 0
    for idx in torch.randperm(len(images), device=images.device).split(batch_size):
        x, y = images[idx], labels[idx]
        if texture is not None:
            res, samples = texture
            x = texture_crops(x, draw_texture_crops(x, samples), res)
            y = y.repeat(samples, *[1] * (y.ndim - 1))
        if dsa_strategy:
            x = apply_augmentation(x, draw_augmentation(x, dsa_strategy))
        out = step(net, x, y, optimizer)
        correct += (out.argmax(1) == (y.argmax(1) if y.is_floating_point() else y)).sum()  # logits: their class
        seen += len(y)
    return correct / seen
