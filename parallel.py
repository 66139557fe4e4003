"""More than one process: torchrun, one process per device, the same code on one machine or many.

Under `torchrun` (WORLD_SIZE > 1 in the environment) `setup` joins the process group: NCCL on
cuda:LOCAL_RANK, or Gloo on the CPU. Under plain `python` no group is created and every function
here acts as for a single process, so the scripts have one code path.

The distillation step splits each student minibatch among the ranks. Two autograd functions carry
that split through the unrolled graph (Megatron's "f" and "g" pair): a replicated tensor enters a
rank's share through `copy_to_ranks` (identity forward, gradients summed over ranks backward), and
a share's contribution leaves through `sum_over_ranks` (summed forward, identity backward, since
everything after it is replicated).
"""
import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank may wait in a collective: evaluations spread unevenly over the ranks, so some
# wait while others train a network for a thousand epochs; NCCL's default of 10 minutes is too short.
TIMEOUT = timedelta(hours=2)
# The training step's collectives come every few seconds: a rank silent for this long has stopped.
STEP_TIMEOUT = timedelta(minutes=5)
_groups = {}  # "step": the step's collectives, with STEP_TIMEOUT; "monitor": Gloo, to name a silent rank


def launched():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(picked, step_timeout=STEP_TIMEOUT):
    """The device this process works on (`picked`: utils.pick_device's choice, whose CUDA index
    torchrun's LOCAL_RANK replaces); joins the process group when started by torchrun."""
    if not launched():
        return picked
    if picked.type == "cuda":
        picked = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(picked)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if picked.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=picked if picked.type == "cuda" else None)
        _groups.update(step=dist.new_group(timeout=step_timeout), monitor=dist.new_group(backend="gloo"))
    return picked


def silent_ranks(seconds=5):
    """The ranks that do not reach a barrier within `seconds` (Gloo's monitored barrier, asked by
    rank 0; on the other ranks it only waits), or [] when all do."""
    try:
        dist.monitored_barrier(_groups["monitor"], timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as err:
        found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(err))
        return [int(r) for r in re.findall(r"\d+", found[1])] if found else [-1]
    return []


def teardown():
    """Leave the process group together: a rank that destroys it while another still uses it can
    abort at exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _groups.clear()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def share(n, of_rank=None, of_world=None):
    """This rank's contiguous part of n items: sizes differ by at most one, the first ranks larger."""
    r, w = rank() if of_rank is None else of_rank, world() if of_world is None else of_world
    size, extra = divmod(n, w)
    start = r * size + min(r, extra)
    return slice(start, start + size + (r < extra))


def sum_(tensors):
    """Sum each tensor over the ranks, in place, with one collective for all of them."""
    tensors = list(tensors)
    if world() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=_groups["step"])
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))


@torch.no_grad()
def broadcast_(tensors):
    """Rank 0's values of the tensors, on every rank (in place, outside autograd: no gradient flows
    through a copy of rank 0's values)."""
    if world() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def broadcast_object(obj):
    """Rank 0's obj (any picklable value) on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world() == 1:
        return [obj]
    found = [None] * world()
    dist.all_gather_object(found, obj)
    return found


def barrier():
    if world() > 1:
        dist.barrier()


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        total = x.clone()
        dist.all_reduce(total, group=_groups["step"])
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, group=_groups["step"])
        return total


def sum_over_ranks(x):
    """The sum of every rank's x; differentiable, for a result every rank then uses alike."""
    return x if world() == 1 else _SumOverRanks.apply(x)


def copy_to_ranks(x):
    """x (the same on every rank) as an input to this rank's share: gradients sum over the ranks."""
    return x if world() == 1 else _CopyToRanks.apply(x)
