"""Memory: what a device can still give, the one size check, and the forecast of an iteration's
peak by which distill.py picks the full unroll or the low-memory replay before any work."""
import os
import shutil
from pathlib import Path

import torch

from mtt import parallel
from mtt.matching import chunk_update, draw_schedule
from utils import UsageError, say

# Of the free memory, the part no forecast may take: cuDNN's workspaces, the allocator's rounding and
# the forecast's own error (its constants were fitted on CPU peaks).
MARGIN = 0.1
# Fitted to the measured peaks of ConvNetW32 at 20 steps (tools/bench.py --forecast, BENCHMARKS.md
# section 10): a backward through one chunk's double graph holds about BACKWARD_WORK times the
# graph's saved tensors at its peak (its gradients, the grad-of-grad's temporaries); the unroll keeps
# per step its saved tensors and about a quarter more (the buffers of the gradient's own graph); and
# an iteration's first allocations add about ITERATION_BASE whatever its size.
BACKWARD_WORK = 4.5
UNROLL_KEPT = 1.25
ITERATION_BASE = 40 * 2**20
CGROUP_FILES = {"v2": ("", "memory.max", "memory.current", "inactive_file"),
                "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def gigabytes(n):
    return f"{n / 2**30:.2f} GB"


def free_memory(device):
    """Bytes this process can still allocate on `device`. A GPU: its free memory plus what torch's caching allocator
    holds but has freed (free to torch, used to the driver). The CPU: MemAvailable, or what the process's cgroup still
    allows where that is less (a container, a Slurm job), shared by the torchrun processes of this machine."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    with open("/proc/meminfo") as meminfo:
        available = int(dict(line.split(":", 1) for line in meminfo)["MemAvailable"].split()[0]) * 1024
    room = cgroup_room()
    return min(available, available if room is None else room) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cgroup_room(root=Path("/sys/fs/cgroup"), membership=Path("/proc/self/cgroup")):
    """Bytes the process's memory cgroup (v2 or v1) still allows: limit - usage + droppable page cache (the kubelet's
    working set); None without a limit. Its folder: /proc/self/cgroup's, else the mount's root (a container's own)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for _, controllers, group in (line.split(":", 2) for line in lines):
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
        if version is None:
            continue
        mount, limit_file, usage_file, cache_key = CGROUP_FILES[version]
        for folder in (root / mount / group.lstrip("/"), root / mount):
            try:
                limit, usage = (folder / limit_file).read_text().strip(), int((folder / usage_file).read_text())
                stat = dict(row.split() for row in (folder / "memory.stat").read_text().splitlines())
            except (OSError, ValueError):
                continue
            if not limit.isdigit() or int(limit) >= 2**62:  # v2's "max", v1's 2^63 rounded to a page: no limit
                break
            return int(limit) - usage + int(stat.get(cache_key, 0))
    return None


def moving(tensors, device):
    """The bytes of the tensors not on `device` yet (those there already take nothing more)."""
    return sum(tensor.nbytes for tensor in tensors if tensor.device.type != device.type)


def check_room(needed, what, where):
    """Refuse in one line, before any work, `needed` bytes that `where` cannot give: a device's free memory, or a
    folder's disk. `what` says what needs them, with its verb ("the images need")."""
    if not needed:
        return
    if isinstance(where, torch.device):
        fix = "; free the GPU or use --device cpu" * (where.type == "cuda")
        have, place = free_memory(where), f"on {where}"
    else:
        existing = next(p for p in [Path(where).absolute(), *Path(where).absolute().parents] if p.exists())
        have, place, fix = shutil.disk_usage(existing).free, f"in {existing}", ""
    if needed > have:
        raise UsageError(f"{what} {gigabytes(needed)} {place}, more than its {gigabytes(have)} free{fix}")


def saved_bytes(net, theta, synset, step):
    """Bytes autograd keeps for one chunk_update of `step`: the unroll holds them per step, the replay per chunk."""
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        chunk_update(net, theta.detach().requires_grad_(), synset, step, len(step.rows))
    return sum(storages.values())


def forecast(net, theta0, synset, syn_steps, augmentation=None, texture=None):
    """peak(low_memory, batch_syn, chunk_syn): the bytes one iteration adds at its peak, with the unroll (low_memory
    False) or the replay, from the graph of one student step measured on one and two of the set's items and extended
    linearly to this process's share of a minibatch. It draws from a forked random stream: the run's is untouched."""
    with torch.random.fork_rng(devices=[theta0.device] if theta0.device.type == "cuda" else []):
        one, two = (draw_schedule(synset.images[:k], 1, k, augmentation, texture)[0] for k in (1, 2))
        first, second = (saved_bytes(net, theta0, synset, step) for step in (one, two))
    crops = len(one.rows)  # inputs per item: 1, or with texture its crops
    graph = lambda inputs: first + (second - first) / crops * (inputs - crops)

    def peak(low_memory, batch_syn, chunk_syn=None):
        share = -(-batch_syn * crops // parallel.world())
        work = BACKWARD_WORK * graph(min(chunk_syn or share, share)) + 2 * synset.images.nbytes  # + grad, momentum
        kept = (syn_steps + 1) * theta0.nbytes if low_memory else UNROLL_KEPT * syn_steps * graph(share)
        return ITERATION_BASE + work + kept
    return peak


def room(free):
    """What a forecast may take of `free` bytes, said: '16.92 GB (the 18.80 GB free less a 10% margin)'."""
    return f"{gigabytes(free * (1 - MARGIN))} (the {gigabytes(free)} free less a {MARGIN:.0%} margin)"


def choose_backward(args, peak, batch_syn, free):
    """Whether to run the low-memory replay: --low_memory's answer; not given, the unroll if its forecast peak fits in
    the free memory less MARGIN, else the replay (said in a line). A forecast over it: a line naming flags that fit."""
    chunk, usable = args.chunk_syn, free * (1 - MARGIN)
    low_memory = args.low_memory if args.low_memory is not None else peak(False, batch_syn, chunk) > usable
    if peak(low_memory, batch_syn, chunk) <= usable:
        if low_memory and args.low_memory is None:
            say(f"the full unroll would need about {gigabytes(peak(False, batch_syn, chunk))}, more than {room(free)}: "
                f"running the low-memory replay instead (the same gradient), about "
                f"{gigabytes(peak(True, batch_syn, chunk))}")
        return low_memory
    largest = lambda fits, n: max((k for k in range(1, n + 1) if fits(k)), default=None)
    chunk_fits = largest(lambda k: peak(True, batch_syn, k) <= usable, min(chunk or batch_syn, batch_syn))
    batch_fits = largest(lambda k: peak(low_memory, k, chunk) <= usable, batch_syn)
    replay_fits = not low_memory and peak(True, batch_syn, chunk) <= usable
    fits = (["--low_memory"] if replay_fits else [f"--low_memory --chunk_syn {chunk_fits}"] if chunk_fits else []) \
        + ([f"--batch_syn {batch_fits}"] if batch_fits else [])
    raise UsageError(f"one iteration with {'the low-memory replay' if low_memory else 'the full unroll'} needs about "
                     f"{gigabytes(peak(low_memory, batch_syn, chunk))}, more than {room(free)}; "
                     + (f"these would fit: {', or '.join(fits)}" if fits else
                        "nothing fits, not even --low_memory --chunk_syn 1: lower --syn_steps"))
