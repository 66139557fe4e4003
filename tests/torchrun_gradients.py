"""Run under torchrun by tests/test_torchrun.py: one distillation iteration's gradients with every
minibatch split among the processes. Rank 0 saves them to the file named by argv[1].

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_gradients.py OUT.pt
"""
import sys

import torch

from mtt import parallel
from mtt.augment import DSA_STRATEGY
from mtt.matching import BACKWARD, SyntheticSet, draw_schedule
from networks import ConvNet, flatten_params
from utils import is_main

# (low_memory, texture, soft labels): 7 images in batches of 3 -> minibatches of 3, 3 and 1 image,
# which two processes split 2+1, 2+1 and 1+0 (the second gets nothing from the last).
CASES = [(low_memory, texture, soft) for low_memory in (False, True) for texture, soft in
         ((False, False), (False, True), (True, False))]


def problem(texture, soft, side=8):
    torch.manual_seed(0)
    net = ConvNet(1, 4, (side, side), width=8, depth=2)
    theta0 = flatten_params(net)
    target = theta0 + 0.05 * torch.randn_like(theta0)
    canvas = 2 * side if texture else side
    synset = SyntheticSet(torch.randn(7, 1, canvas, canvas), torch.tensor([0, 0, 1, 1, 2, 3, 3]),
                          torch.tensor(0.05), torch.randn(7, 4) if soft else None)
    return net, theta0, target, synset


def gradients(low_memory, texture, soft, syn_steps=4, batch_syn=3):
    """The loss and every learnable tensor's gradient, with DSA on and batch_syn < the set."""
    net, theta0, target, synset = problem(texture, soft)
    torch.manual_seed(1)
    schedule = draw_schedule(synset.images, syn_steps, batch_syn, DSA_STRATEGY, ((8, 8), 2) if texture else None)
    loss = BACKWARD[low_memory](net, synset, theta0, target, schedule)
    return loss, {name: tensor.grad for name, tensor in synset.tensors.items()}


if __name__ == "__main__":
    parallel.setup(torch.device("cpu"))
    results = {case: gradients(*case) for case in CASES}
    if is_main():
        torch.save({"world": parallel.world(), "results": results}, sys.argv[1])
    parallel.teardown()
