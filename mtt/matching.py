"""The trajectory-matching step of MTT: the learnable state, one student update
theta_{i+1} = theta_i - syn_lr * grad CE(forward(theta_i, x), y) (hard or soft targets), and the exact gradient of the
matching loss ||theta_N - theta*||^2 / ||theta_0 - theta*||^2 through the whole unroll (memory grows with syn_steps x
batch) or by replaying it in reverse (the memory of one chunk of a step plus theta_0..theta_N). Under torchrun each
process computes its share of every minibatch, in chunks; the results equal one process's to rounding."""
from dataclasses import dataclass, replace

import torch

from mtt import parallel
from mtt.augment import apply_augmentation, draw_augmentation, draw_texture_crops, texture_crops
from mtt.training import cross_entropy
from networks import forward_flat


class SyntheticSet:
    """The learnable `tensors` by name, which the optimisers, checkpoint, outputs and evaluation iterate over: images
    (N x C x H x W), syn_lr (a scalar), with DATM's soft labels label_logits (N x classes); `labels`: class ids."""

    def __init__(self, images, labels, syn_lr, label_logits=None):
        self.labels = labels
        self.tensors = {"images": images, "syn_lr": syn_lr}
        if label_logits is not None:
            self.tensors["label_logits"] = label_logits
        for tensor in self.tensors.values():
            tensor.requires_grad_()

    images = property(lambda self: self.tensors["images"])
    syn_lr = property(lambda self: self.tensors["syn_lr"])
    soft = property(lambda self: "label_logits" in self.tensors)

    def targets(self, rows):
        """The student's targets for these items: label logits (soft labels) or class ids."""
        return self.tensors["label_logits"][rows] if self.soft else self.labels[rows]

    def eval_labels(self):
        """What evaluation networks train on: the label logits, or the class ids."""
        return self.tensors["label_logits"].detach() if self.soft else self.labels

    def detached(self):
        """The same values outside autograd, for the replay's forward pass."""
        detached = SyntheticSet.__new__(SyntheticSet)
        detached.labels, detached.tensors = self.labels, {name: t.detach() for name, t in self.tensors.items()}
        return detached


@dataclass
class Step:
    """One student update's minibatch, an entry per image: its item (rows), texture crop and DSA draw, kept for the
    replay to rebuild the exact batch. `batch`: the whole minibatch's size, whose mean loss every share descends."""
    rows: torch.Tensor
    augmentation: list
    batch: int
    crops: torch.Tensor = None  # texture mode: toroidal offsets, one row per image
    crop_size: tuple = None

    def inputs(self, images):
        x = images[self.rows]
        if self.crops is not None:
            x = texture_crops(x, self.crops, self.crop_size)
        return apply_augmentation(x, self.augmentation)

    def part(self, where):
        """The images at `where` (a slice) with their crops and DSA draws; `batch` stays the whole's."""
        return replace(self, rows=self.rows[where], augmentation=[(op, p[where]) for op, p in self.augmentation],
                       crops=None if self.crops is None else self.crops[where])

    def share(self):
        """This process's contiguous part of the minibatch (all of it in a single process)."""
        return self.part(parallel.share(len(self.rows)))

    def chunks(self, size=None):
        """This process's share in consecutive pieces of at most `size` images (None: one; none if it is empty)."""
        share = self.share()
        size = size or len(share.rows) or 1
        return [share.part(slice(start, start + size)) for start in range(0, len(share.rows), size)]


@torch.no_grad()
def draw_schedule(images, syn_steps, batch_syn, dsa_strategy=None, texture=None):
    """syn_steps minibatches: a random permutation of the set (from the CPU generator) cut into chunks of batch_syn,
    taken from the last, redrawn when used up; then each step's crops and DSA draw, in the original's order.
    texture = (crop size, crops per canvas); dsa_strategy None: no DSA."""
    schedule, chunks = [], []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(len(images)).to(images.device, non_blocking=True).split(batch_syn))
        rows = chunks.pop()
        step = Step(rows, [], len(rows))
        shape = (len(rows), *images.shape[1:])
        if texture is not None:
            step.crop_size, samples = texture
            step.crops = draw_texture_crops(images[rows], samples)
            step.rows, step.batch = rows.repeat(samples), len(rows) * samples
            shape = (step.batch, images.shape[1], *step.crop_size)
        if dsa_strategy:
            step.augmentation = draw_augmentation(images.new_empty(shape), dsa_strategy)
        schedule.append(step)
    return schedule


def chunk_update(net, theta, synset, chunk, batch):
    """-syn_lr * the gradient of the student's loss on one chunk of a minibatch of `batch` images, weighted by the
    chunk's share so that the chunks' updates sum to the minibatch's; differentiable (the unroll and the VJP use it)."""
    logits = forward_flat(net, theta, chunk.inputs(synset.images))
    loss = cross_entropy(logits, synset.targets(chunk.rows)) * (len(chunk.rows) / batch)
    return -synset.syn_lr * torch.autograd.grad(loss, theta, create_graph=True)[0]


def student_update(net, theta, synset, step, chunk_syn=None):
    """This process's part of one student step: the updates of its share of the minibatch in chunks of chunk_syn
    images (None: one chunk), summed. theta_{i+1} = theta_i + the sum over processes."""
    updates = [chunk_update(net, theta, synset, chunk, step.batch) for chunk in step.chunks(chunk_syn)]
    # more processes than images: nothing to add, but theta * 0 stays in the graph
    return sum(updates[1:], updates[0]) if updates else theta * 0


def matching_loss(theta, theta0, target):
    return (theta - target).square().sum() / (theta0 - target).square().sum()


def accumulate(tensors, grads):
    """Add grads (this process's parts) to the tensors' .grad, summed over the processes."""
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
    parallel.sum_(grads)
    for tensor, grad in zip(tensors, grads):
        tensor.grad = grad if tensor.grad is None else tensor.grad + grad


def unroll_backward(net, synset, theta0, target, schedule, chunk_syn=None):
    """The matching loss, backpropagated through the whole unroll at once; fills every learnable tensor's .grad."""
    learnables = list(synset.tensors.values())
    theta = start = theta0.detach().requires_grad_()
    for step in schedule:
        update = student_update(net, parallel.copy_to_ranks(theta), synset, step, chunk_syn)
        theta = theta + parallel.sum_over_ranks(update)
    loss = matching_loss(theta, theta0, target)
    # theta_0 is an input too, so that every process runs every step's all-reduce in its backward:
    # autograd would skip it where a step's share holds no image and leads to no learnable tensor.
    _, *grads = torch.autograd.grad(loss, [start, *learnables], allow_unused=True)
    accumulate(learnables, grads)
    return loss.detach()


def replay_backward(net, synset, theta0, target, schedule, chunk_syn=None):
    """The same loss and gradient, computed in reverse one step at a time.

    The forward pass keeps only theta_0..theta_N. Then, with lam = dL/dtheta_{i+1}, step i is rebuilt from theta_i and
    the same minibatch, and one vector-Jacobian product of its update with lam gives lam's contribution through it to
    every learnable tensor and to theta_i: dL/dtheta_i = lam + (d update_i / d theta_i)^T lam. The update is a sum over
    chunks, and so is its VJP: both passes hold one chunk's graph at a time."""
    learnables, frozen = list(synset.tensors.values()), synset.detached()
    # theta_0..theta_N in one block allocated up front: one vector appended after each step's freed
    # activations pinned the heap, which grew by 0.4 MB a step (ConvNetW8, 100 images)
    thetas = theta0.new_empty(len(schedule) + 1, len(theta0))
    thetas[0] = theta0.detach()
    for i, step in enumerate(schedule):
        theta, update = thetas[i].detach().requires_grad_(), torch.zeros_like(theta0)
        for chunk in step.chunks(chunk_syn):
            # the unroll's update, graph and all: the same backward kernels, so theta_0..theta_N equal the unroll's bit
            # for bit (the plain backward's conv kernels on AVX-512 CPUs round differently, to 8e-5 in the golden case)
            update += chunk_update(net, theta, frozen, chunk, step.batch).detach()
        parallel.sum_([update])
        torch.add(thetas[i], update, out=thetas[i + 1])
    theta_n = thetas[-1].detach().requires_grad_()
    loss = matching_loss(theta_n, theta0, target)
    lam = torch.autograd.grad(loss, theta_n)[0]
    grads = [torch.zeros_like(t) for t in learnables]
    for theta, step in zip(reversed(thetas[:-1]), reversed(schedule)):
        theta, through_theta = theta.detach().requires_grad_(), torch.zeros_like(theta)
        for chunk in step.chunks(chunk_syn):
            update = chunk_update(net, theta, synset, chunk, step.batch)
            through_chunk, *parts = torch.autograd.grad(update, [theta, *learnables], lam, allow_unused=True)
            through_theta += through_chunk
            for grad, part in zip(grads, parts):
                if part is not None:
                    grad += part
        parallel.sum_([through_theta])
        lam += through_theta  # in place, as theta_0..theta_N: no vector left behind a step's freed activations
    accumulate(learnables, grads)
    return loss.detach()


BACKWARD = {False: unroll_backward, True: replay_backward}
