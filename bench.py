"""Seconds per distillation iteration and peak memory: full unroll vs --low_memory replay.

    python bench.py                                   # CPU: ipc 1 and 10 at syn_steps 10, 20, 40
    python bench.py --device cuda --ipc 1 10 50 --syn_steps 10 30 50

Each configuration runs in a fresh process, so peak memory is its own: on CPU the growth of
the process's peak resident set over the set-up, on CUDA torch.cuda.max_memory_allocated over
the set-up. One warm-up iteration, then the median of --repeats timed ones.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from matching import BACKWARD, draw_schedule
from networks import flatten_params, get_network
from utils import DSA_STRATEGY, pick_device


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure(model, ipc, syn_steps, low_memory, device, repeats):
    """One configuration, in this process: (median seconds per iteration, peak MB above set-up)."""
    torch.manual_seed(0)
    net = get_network(model, 3, 10, (32, 32)).to(device)
    theta0 = flatten_params(net)
    target = theta0 + 0.01 * torch.randn_like(theta0)
    images = torch.randn(10 * ipc, 3, 32, 32, device=device).requires_grad_()
    labels = torch.arange(10, device=device).repeat_interleave(ipc)
    syn_lr = torch.tensor(0.01, device=device).requires_grad_()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_mb(device)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        schedule = draw_schedule(images, labels, syn_steps, len(labels), DSA_STRATEGY)
        BACKWARD[low_memory](net, images, syn_lr, theta0, target, schedule)
        images.grad = syn_lr.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), peak_mb(device) - base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ConvNet")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--syn_steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--one", nargs=2, type=int, metavar=("IPC", "SYN_STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--low_memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = pick_device(args.device)
    if args.one:
        print(json.dumps(measure(args.model, *args.one, args.low_memory, device, args.repeats)))
        return

    def run(ipc, steps, low_memory):
        command = [sys.executable, __file__, "--one", str(ipc), str(steps), "--model", args.model,
                   "--device", str(device), "--repeats", str(args.repeats)] + ["--low_memory"] * low_memory
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, 3x32x32, 10 classes, batch_syn = all, DSA on; {name}; torch {torch.__version__}\n")
    print("| ipc | syn_steps | unroll s/it | low-memory s/it | time ratio | unroll peak MB | low-memory peak MB |")
    print("|---|---|---|---|---|---|---|")
    growth = []
    for ipc in args.ipc:
        peaks = {}
        for steps in args.syn_steps:
            (t_unroll, m_unroll), (t_low, m_low) = run(ipc, steps, False), run(ipc, steps, True)
            peaks[steps] = (m_unroll, m_low)
            print(f"| {ipc} | {steps} | {t_unroll:.3f} | {t_low:.3f} | {t_low / t_unroll:.2f} | {m_unroll:.0f} "
                  f"| {m_low:.0f} |", flush=True)
        first, last = min(peaks), max(peaks)
        unroll, low = (100 * (peaks[last][k] / peaks[first][k] - 1) for k in (0, 1))
        growth.append(f"ipc {ipc}, syn_steps {first} -> {last}: "
                      f"unroll peak {unroll:+.0f}%, low-memory peak {low:+.0f}%")
    print("\n" + "\n".join(growth))


if __name__ == "__main__":
    main()
