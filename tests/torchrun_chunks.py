"""Run under torchrun by tests/test_chunks_torchrun.py: one distillation iteration's gradients with every
minibatch split among the processes and each process's share computed in chunks. Rank 0 saves them to the file
named by argv[1].

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_chunks.py OUT.pt
"""
import sys

import torch
from torchrun_gradients import problem

from mtt import parallel
from mtt.augment import DSA_STRATEGY
from mtt.matching import BACKWARD, draw_schedule
from utils import is_main

# 7 canvases in batches of 3, 2 crops each: minibatches of 2, 6, 6 and 2 crops, which two processes split 1+1,
# 3+3, 3+3 and 1+1; in chunks of 2 a share of 3 is 2 + 1.
CHUNK_SYN = 2


def gradients(low_memory, chunk_syn, syn_steps=4, batch_syn=3):
    """The loss and every learnable tensor's gradient, with DSA, texture crops and soft labels."""
    net, theta0, target, synset = problem(texture=True, soft=True)
    torch.manual_seed(1)
    schedule = draw_schedule(synset.images, syn_steps, batch_syn, DSA_STRATEGY, ((8, 8), 2))
    loss = BACKWARD[low_memory](net, synset, theta0, target, schedule, chunk_syn)
    return loss, {name: tensor.grad for name, tensor in synset.tensors.items()}


if __name__ == "__main__":
    parallel.setup(torch.device("cpu"))
    results = {low_memory: gradients(low_memory, CHUNK_SYN) for low_memory in (False, True)}
    if is_main():
        torch.save({"world": parallel.world(), "results": results}, sys.argv[1])
    parallel.teardown()
