"""One process or many: every script's main() (run_script), and torchrun: a process per device, on one machine or many.

Under `torchrun` (WORLD_SIZE > 1 in the environment) `setup` joins the process group: NCCL on cuda:LOCAL_RANK, or Gloo
on the CPU. Under plain `python` no group is created and every function here acts as for a single process, so the
scripts have one code path.
"""
import ctypes
import os
import signal
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

import mtt
from utils import UsageError, is_main, rank, say

# How long a rank may wait in a collective: evaluations spread unevenly over the ranks, so some wait while others
# train a network for a thousand epochs; NCCL's default of 10 minutes is too short.
TIMEOUT = timedelta(hours=2)
STEP_TIMEOUT = timedelta(minutes=5)  # the step's collectives come every few seconds: a rank this silent has stopped
_groups = {}  # "step": the step's collectives, with STEP_TIMEOUT; "monitor": Gloo, to name a rank that stopped


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (a cluster's pre-emption), with the one line that says what was kept."""


class RankZeroStopped(UsageError):
    """Rank 0 stopped answering: rank 1 says so, since rank 0 cannot."""


def launched():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(picked, step_timeout=STEP_TIMEOUT):
    """The device to work on: `picked` (pick_device's), under torchrun on cuda:LOCAL_RANK, with the group joined."""
    if not launched():
        return picked
    if picked.type == "cuda":
        picked = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(picked)
    if not dist.is_initialized():
        if picked.type == "cuda":  # NCCL raises a timed-out collective in Python only when it waits for it
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        dist.init_process_group("nccl" if picked.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=picked if picked.type == "cuda" else None)
        _groups.update(step=dist.new_group(timeout=step_timeout), monitor=dist.new_group(backend="gloo"))
    return picked


def stopped_ranks(seconds=5):
    """{rank: why} of the ranks that stopped, asked after a failed collective: "closed" (the process ended) or "silent"
    (it hangs or was stopped). Every rank sends rank 0 a token and waits for its answer, so rank 0 learns about them
    all, the others about rank 0. Gloo's monitored barrier would not do: its message names no rank once a connection
    closed, and on the other ranks it waits for rank 0 for the group's whole timeout."""
    # torchrun's agent SIGTERMs the others once a rank ended: that must not cut this answer short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    token = torch.zeros(1)

    def fails(op, peer, wait):
        try:
            op(token, peer, group=_groups["monitor"]).wait(timedelta(seconds=wait))
        except RuntimeError as err:
            return "silent" if "timed out" in str(err).lower() else "closed"
        return None

    if rank() != 0:  # rank 0 asks the ranks in turn, `seconds` each at most
        why = fails(dist.isend, 0, seconds * world()) or fails(dist.irecv, 0, seconds * world())
        return {0: why} if why else {}
    stopped = {}
    for peer in range(1, world()):
        stopped[peer] = fails(dist.irecv, peer, seconds)
        if not stopped[peer]:
            fails(dist.isend, peer, seconds)
    return {peer: why for peer, why in stopped.items() if why}


def named(ranks):
    """"rank 1", "ranks 1, 2", or "another rank" when none is known."""
    return f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, sorted(ranks)))}" if ranks else "another rank"


def teardown():
    """Leave the process group together: a rank that destroys it while another still uses it can abort at exit
    ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _groups.clear()


def pick_device(device=None):
    """torch.device for --device: cuda when present unless given; a device that is absent or unknown is a UsageError,
    not a traceback from the first tensor moved to it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"unknown --device {device!r}; use cuda, cuda:N or cpu") from err
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA GPU (torch sees none); use --device cpu")
    if picked.type == "cuda" and (picked.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if picked.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: only cuda and cpu are supported")
    return picked


def keep_freed_memory():
    """Make glibc's malloc keep the memory torch frees for its next tensors. By default it maps every block over 32 MB
    afresh and unmaps it when freed, so a CPU step whose activations are that large faults them in again, 4 KB at a
    time, at every step (BENCHMARKS.md section 8). Cost: freed blocks that no later request fits stay resident."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:  # parameters from malloc.h
        mallopt(-4, 0)  # M_MMAP_MAX: every block from the heap, which is reused
        mallopt(-1, -1)  # M_TRIM_THRESHOLD: and never shrunk, so what the next step needs is mapped already


def setup_device(args):
    """The device this process works on: --device (cuda:LOCAL_RANK under torchrun, which also joins the process
    group), with --tf32's and --deterministic's settings; on the CPU, freed memory is kept for reuse."""
    step_timeout = timedelta(seconds=getattr(args, "step_timeout", STEP_TIMEOUT.total_seconds()))
    device = setup(pick_device(args.device), step_timeout)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if device.type == "cuda":
        say(f"{torch.cuda.get_device_name(device)}: TF32 {'on' if args.tf32 else 'off'} in convolutions and matmuls "
            f"(--tf32 {not args.tf32} for {'full float32' if args.tf32 else 'TF32, as the original'})")
    else:
        keep_freed_memory()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return device


def run_script(parse_args, run, argv=None, interrupted=lambda args: "nothing was written"):
    """The three scripts' main(): parse and check the flags, set up the device, run. Bad input (a UsageError) ends it
    with one line, `error: ...`, printed by rank 0, naming the rank it happened on when another (or by rank 1 when
    rank 0 stopped answering). Ctrl-C and SIGTERM become Interrupted with interrupted(args): what is kept."""
    args = None
    try:
        args = parse_args(argv)
        with ended_ranks_are_one_line():
            result = run(args, setup_device(args))
            teardown()
    except UsageError as err:
        # every rank reaches a verdict alike (the same flags and files, the replicated set), or one that only some
        # reach is carried to all (one_verdict, main_decides)
        if rank() != (1 if isinstance(err, RankZeroStopped) else 0):
            sys.exit(1)
        sys.exit(f"error{f' (rank {err.rank})' if err.rank else ''}: {err}")
    except KeyboardInterrupt as stop:
        if isinstance(stop, Interrupted):  # the run said what is kept, knowing more than interrupted(args)
            raise
        said = interrupted(args) if args else "nothing was written"
        raise Interrupted(f"{str(stop) or 'stopped by Ctrl-C'}: {said}") from None
    return result


@contextmanager
def ended_ranks_are_one_line():
    """A rank whose process ended (killed, out of memory) closes its connections: the others' collectives fail ("by
    peer") or, when torchrun's agent saw it first, they get its SIGTERM; either way rank 0 names it in one line."""
    try:
        yield
    except (RuntimeError, KeyboardInterrupt) as err:
        if not _groups or isinstance(err, RuntimeError) and "by peer" not in str(err):
            raise
        ended = [peer for peer, why in stopped_ranks().items() if why == "closed"]
        if isinstance(err, KeyboardInterrupt) and not ended:
            raise  # Ctrl-C or SIGTERM to the job, not one of its ranks ending
        raise UsageError(f"{named(ended)} stopped (its connection closed): the job stops here") from None


def exit_status(main):
    """main()'s exit status: Ctrl-C and SIGTERM end with Interrupted's one line (on rank 0 only) and 130, not a
    traceback; sys.exit's status is kept, and its message printed with 1."""
    signal.signal(signal.SIGTERM, mtt.terminate)
    try:
        main()
    except KeyboardInterrupt as stop:
        if is_main():
            print(str(stop) or "stopped by Ctrl-C", file=sys.stderr)
        return 130
    except SystemExit as leaving:
        if leaving.code is None or isinstance(leaving.code, int):
            return leaving.code or 0
        print(leaving.code, file=sys.stderr)  # as Python does for sys.exit("error: ...")
        return 1
    return 0


def run_and_exit(main):
    """`if __name__ == "__main__": run_and_exit(main)`. It exits without the interpreter's teardown, which spends
    seconds freeing the modules torch loads: every file is closed, and the process group left, when main() returns."""
    status = exit_status(main)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextmanager
def stalls_are_one_line():
    """A training-step collective that timed out (a rank stopped or hangs) becomes one line naming the silent rank
    instead of a wait of hours."""
    try:
        yield
    except RuntimeError as err:
        if world() == 1 or "timed out" not in str(err).lower():
            raise
        stopped = stopped_ranks()
        # a rank 0 whose connection closed has ended: it said why, or torchrun's report names it
        failure = RankZeroStopped if stopped.get(0) == "silent" else UsageError
        raise failure(f"{named(stopped)} stopped answering: a training step's collective waited for it past its "
                      f"timeout (--step_timeout); the job stops here") from None


def main_decides(work):
    """work() on rank 0 alone, its result on every rank, and a UsageError it raises on every rank too (said by rank 0):
    the others never wait in a collective for a rank that stopped."""
    box = [None]
    if is_main():
        try:
            box = [(work(), None)]
        except UsageError as err:
            box = [(None, str(err))]
    if world() > 1:
        dist.broadcast_object_list(box, 0)
    result, failure = box[0]
    if failure is not None:
        raise UsageError(failure, rank=0)
    return result


@contextmanager
def one_verdict():
    """Run the block on every rank; a UsageError on any of them fails it on all alike (rank 0 saying why, naming the
    rank), so that no rank waits in a collective for one that stopped: a torchrun job with bad input ends with one
    line. The block must hold no collective: a rank that failed would skip it and wait in the verdict's."""
    failure = None
    try:
        yield
    except UsageError as err:
        failure = (rank() if err.rank is None else err.rank, str(err))
    if failures := [found for found in gather_objects(failure) if found]:
        raise UsageError(failures[0][1], rank=failures[0][0])


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def share(n):
    """This rank's contiguous part of n items: sizes differ by at most one, the first ranks larger."""
    r, (size, extra) = rank(), divmod(n, world())
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
    """Rank 0's values of the tensors, on every rank (in place, outside autograd: no gradient flows through them)."""
    if world() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world() == 1:
        return [obj]
    found = [None] * world()
    dist.all_gather_object(found, obj)
    return found


def _summed(x):
    total = x.clone()
    dist.all_reduce(total, group=_groups["step"])
    return total


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, summed_forward):
        ctx.summed_forward = summed_forward
        return _summed(x) if summed_forward else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad if ctx.summed_forward else _summed(grad), None


def sum_over_ranks(x):
    """A rank's share's contribution, summed over the ranks; identity backward, as all after it is replicated. With
    copy_to_ranks, Megatron's "g" and "f" pair: they carry the step's split among ranks through the unrolled graph."""
    return x if world() == 1 else _AllReduce.apply(x, True)


def copy_to_ranks(x):
    """x (replicated) as an input to this rank's share: identity forward, gradients summed over the ranks backward."""
    return x if world() == 1 else _AllReduce.apply(x, False)
