"""Seconds per distillation iteration and peak memory, in three modes, printed as Markdown tables.

    python tools/bench.py                                    # CPU, mode 1: ipc 1 and 10 at syn_steps 10 and 20
    python tools/bench.py --processes 1 2                    # CPU, mode 2: 1 and 2 processes, 1 process of 2 threads
    python tools/bench.py --chunks all 250 100 50            # CPU, mode 3: --chunk_syn sizes, 1 and 2 threads
    python tools/bench.py --device cuda --ipc 1 10 50 --syn_steps 10 30 50
    python tools/bench.py --device cuda --processes 1 2      # on a machine with 2 GPUs (no 2-thread row on CUDA)

Mode 1 (the default): the full unroll vs --low_memory's replay, ConvNet (width 128) on 3x32x32
images of 10 classes, batch_syn = all, DSA on. Mode 2 (--processes): the same iteration under
torchrun, each minibatch split over the processes (1 thread each on CPU, and 1 process of as many
threads beside them), ConvNetW32 at ipc 10 and 50, syn_steps 20; then buffer.py's images/s on
FashionMNIST-mini, start-up included. Mode 3 (--chunks): the same problem in one process, each
minibatch computed in chunks of --chunk_syn images, with 1 and 2 threads (CPU), against the code
before: one chunk with glibc's malloc as it comes (without parallel.keep_freed_memory).

Every figure comes from a fresh process (a torchrun job in mode 2) that on the CPU keeps freed
memory as the scripts do (parallel.keep_freed_memory) unless its row says 'glibc default': one
warm-up iteration, then --iterations timed ones (their median); peak memory is the peak resident
set (CPU) or max_memory_allocated (CUDA) of the iterations less what the set-up holds, per rank. The
configurations alternate, each once per round for --repeats rounds, so a drift of the machine
hits them all alike; tables give the median [min-max] over the rounds, and ratios the median
[min-max] of per-round ratios.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: python tools/bench.py
from mtt import parallel  # noqa: E402
from mtt.augment import DSA_STRATEGY  # noqa: E402
from mtt.flags import positive_int  # noqa: E402
from mtt.matching import BACKWARD, SyntheticSet, draw_schedule  # noqa: E402
from mtt.memory import forecast  # noqa: E402
from networks import flatten_params, get_network  # noqa: E402
from mtt.parallel import keep_freed_memory, pick_device  # noqa: E402
from utils import REPO, is_main  # noqa: E402

DEFAULTS = {  # each mode's grid, where --model, --ipc or --syn_steps is not given
    "backward": {"model": "ConvNet", "ipc": [1, 10], "syn_steps": [10, 20]},
    "processes": {"model": "ConvNetW32", "ipc": [10, 50], "syn_steps": [20]},
    "chunks": {"model": "ConvNetW32", "ipc": [10, 50], "syn_steps": [20]},
}
BACKWARD_NAMES = {False: "unroll", True: "low-memory"}
SIDES = {3: 32, 1: 28}  # image side by channels: CIFAR's, Fashion-MNIST's
MINI_TRAIN_IMAGES = 5000  # FashionMNIST-mini: 500 training images per class
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


# ---------------------------------------------------------------------------------------------
# One measurement, in its own process (every rank of a torchrun job runs this)


def peak_mb(device):
    """The peak since reset_peak: CUDA's max_memory_allocated, or on the CPU the resident set's high-water
    mark (VmHWM; not getrusage's ru_maxrss, which an exec'd process inherits from its parent's size)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024


def reset_peak(device):
    """Start the peak over from what is held now (on the CPU, Linux's clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, ipc, syn_steps, low_memory, chunk_syn, iterations, device, channels=3):
    """(median seconds of the timed iterations, peak MB above the set-up, distill.py's forecast of it
    in MB) of this process; under torchrun every rank builds the same problem and draws the same
    minibatches (one seed), and matching.BACKWARD computes this rank's share of each. Images are
    3x32x32 (CIFAR's), or with one channel 1x28x28 (Fashion-MNIST's)."""
    torch.manual_seed(0)
    side = SIDES[channels]
    net = get_network(model, channels, 10, (side, side)).to(device)
    theta0 = flatten_params(net)
    target = theta0 + 0.01 * torch.randn_like(theta0)
    synset = SyntheticSet(torch.randn(10 * ipc, channels, side, side, device=device),
                          torch.arange(10, device=device).repeat_interleave(ipc), torch.tensor(0.01, device=device))
    forecast_mb = forecast(net, theta0, synset, syn_steps, DSA_STRATEGY)(low_memory, 10 * ipc, chunk_syn) / 2**20
    reset_peak(device)
    base = peak_mb(device)
    seconds = []
    for _ in range(1 + iterations):  # the first is the warm-up
        if dist.is_initialized():
            dist.barrier()  # the ranks start together, so that no rank's clock counts waiting for another
        synchronize(device)
        start = time.perf_counter()
        schedule = draw_schedule(synset.images, syn_steps, len(synset.labels), DSA_STRATEGY)
        BACKWARD[low_memory](net, synset, theta0, target, schedule, chunk_syn)
        for tensor in synset.tensors.values():
            tensor.grad = None
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:]), peak_mb(device) - base, forecast_mb


def chunk_size(text):
    return None if text == "all" else positive_int(text)


def worker(args):
    """The hidden --one side: measure, and print one JSON line (rank 0) with every rank's figures."""
    device = parallel.setup(pick_device(args.device))
    if device.type == "cpu" and not args.glibc_default:
        keep_freed_memory()  # as distill.py does
    found = measure(args.model, *args.one, args.low_memory, args.chunk_syn, args.iterations, device, args.channels)
    ranks = parallel.gather_objects(found)
    if is_main():
        print(json.dumps({"threads": torch.get_num_threads(), "seconds": [s for s, _, _ in ranks],
                          "peak_mb": [m for _, m, _ in ranks], "forecast_mb": [f for _, _, f in ranks]}))
    parallel.teardown()


# ---------------------------------------------------------------------------------------------
# The parent: fresh processes, alternated rounds, tables


def run(command, threads=None):
    """The command's stdout; its stderr's tail and a one-line error if it fails. `threads`:
    OMP_NUM_THREADS for it (torch's thread count in each of its processes)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{result.stderr[-3000:]}\nerror: exit status {result.returncode} from {shlex.join(command)}")
    return result.stdout


def launcher(processes):
    """Plain python for one process (distill.py's usual run, no process group), torchrun for more."""
    return [sys.executable] if processes == 1 else TORCHRUN + [str(processes)]


@dataclass(frozen=True)
class Setting:
    """How a measurement runs: processes (torchrun for more than 1), OMP_NUM_THREADS of each (None:
    torch's default), --chunk_syn (None: all), and glibc's malloc as it comes (the code before)."""
    processes: int = 1
    threads: int = None
    chunk_syn: int = None
    glibc_default: bool = False
    channels: int = 3


def iteration(args, ipc, syn_steps, low_memory, setting=Setting()):
    """One fresh measurement: {"seconds": of the slowest rank, whose pace the job keeps,
    "peak_mb": [per rank]}."""
    command = launcher(setting.processes) + [__file__, "--one", str(ipc), str(syn_steps), "--model", args.model,
                                             "--device", args.device, "--iterations", str(args.iterations)]
    command += ["--low_memory"] * low_memory + ["--glibc_default"] * setting.glibc_default
    command += ["--chunk_syn", str(setting.chunk_syn)] if setting.chunk_syn else []
    command += ["--channels", str(setting.channels)]
    threads = setting.threads
    found = json.loads(run(command, threads).splitlines()[-1])
    if threads and found["threads"] != threads:
        sys.exit(f"error: {shlex.join(command)} ran {found['threads']} threads, not {threads}")
    return {"seconds": max(found["seconds"]), "peak_mb": found["peak_mb"], "forecast_mb": found["forecast_mb"]}


def buffer_run(args, processes):
    """Images per second of one buffer.py command into a fresh folder, start-up and data loading included."""
    with tempfile.TemporaryDirectory() as folder:
        command = launcher(processes) + [
            str(REPO / "buffer.py"), "--dataset", "FashionMNIST-mini", "--model", args.buffer_model,
            "--num_experts", str(args.buffer_experts), "--train_epochs", str(args.buffer_epochs),
            "--save_interval", "1", "--dsa", "True", "--device", args.device, "--buffer_path", folder]
        start = time.perf_counter()
        run(command, threads=1)
        seconds = time.perf_counter() - start
        # the throughput counts each expert once: a job whose ranks each trained them all is no speed-up
        listed = len(json.loads(next(Path(folder).rglob("buffer.json")).read_text())["experts"])
        if listed != args.buffer_experts:
            sys.exit(f"error: {shlex.join(command)} listed {listed} experts, not {args.buffer_experts}")
    return args.buffer_experts * args.buffer_epochs * MINI_TRAIN_IMAGES / seconds


def alternate(configs, measure_one, repeats):
    """Every configuration once per round, in the given order, for `repeats` rounds, so that a
    slow drift of the machine hits them all alike: {config: [its result in each round]}."""
    results = {config: [] for config in configs}
    for round_ in range(repeats):
        for config in configs:
            results[config].append(measure_one(config))
            print(f"round {round_ + 1}/{repeats} {config}: {results[config][-1]}", file=sys.stderr, flush=True)
    return results


def spread(values, digits):
    """'median [min-max]' of the values."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def ratios(numerators, denominators):
    """The per-round ratios of two configurations measured in the same rounds."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def markdown(header, rows):
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def seconds_of(results):
    return [result["seconds"] for result in results]


def peak_per_rank(results):
    """Each rank's median peak MB over the rounds, 'rank 0 / rank 1 / ...'."""
    ranks = zip(*(result["peak_mb"] for result in results))
    return " / ".join(f"{statistics.median(rank):.0f}" for rank in ranks)


def backward_table(results, ipcs, syn_steps):
    """Mode 1's table from {(ipc, syn_steps, low_memory): [per-round results]}."""
    rows = []
    for ipc in ipcs:
        for steps in syn_steps:
            unroll, low = results[ipc, steps, False], results[ipc, steps, True]
            rows.append([ipc, steps, spread(seconds_of(unroll), 3), spread(seconds_of(low), 3),
                         spread(ratios(seconds_of(low), seconds_of(unroll)), 2),
                         spread([r["peak_mb"][0] for r in unroll], 0), spread([r["peak_mb"][0] for r in low], 0)])
    return markdown(["ipc", "syn_steps", "unroll s/it", "low-memory s/it", "low-memory / unroll", "unroll peak MB",
                     "low-memory peak MB"], rows)


def settings(processes, device):
    """Mode 2's {name: Setting}: 1 thread each, and on CPU, 1 process of as many threads as each
    multi-process setting has processes."""
    found = {f"{p} proc{'s' * (p > 1)} x 1 thread": Setting(p, 1) for p in processes}
    if device.type == "cpu":
        found.update({f"1 proc x {p} threads": Setting(1, p) for p in processes if p > 1})
    return found


def chunk_settings(chunks, device):
    """Mode 3's {name: Setting}: for 1 and 2 threads (CPU), the code before (one chunk, glibc's
    malloc as it comes), then each chunk size."""
    found = {}
    for threads in (1, 2) if device.type == "cpu" else (None,):
        prefix = f"{threads} thread{'s' * (threads > 1)}, " if threads else ""
        found[f"{prefix}before: all, glibc default"] = Setting(threads=threads, glibc_default=True)
        found.update({f"{prefix}chunk_syn {chunk or 'all'}": Setting(threads=threads, chunk_syn=chunk)
                      for chunk in chunks})
    return found


def before_of(named):
    """Mode 3's baselines: {setting name: the name of the code before at its number of threads}."""
    name_of = {setting: name for name, setting in named.items()}
    return {name: name_of[Setting(threads=setting.threads, glibc_default=True)] for name, setting in named.items()}


def settings_table(results, ipcs, syn_steps, named, baselines, versus):
    """Modes 2 and 3's table from {(ipc, syn_steps, low_memory, setting name): [per-round results]};
    baselines: {setting name: the setting its speed-up is over}, all called `versus` in the header."""
    rows = []
    for ipc in ipcs:
        for steps in syn_steps:
            for low_memory, backward in BACKWARD_NAMES.items():
                for name in named:
                    found = results[ipc, steps, low_memory, name]
                    base = results[ipc, steps, low_memory, baselines[name]]
                    rows.append([ipc, steps, backward, name, spread(seconds_of(found), 3),
                                 spread(ratios(seconds_of(base), seconds_of(found)), 2), peak_per_rank(found)])
    return markdown(["ipc", "syn_steps", "backward", "setting", "s/it", f"speed-up over {versus}", "peak MB per rank"],
                    rows)


def buffer_table(throughput):
    """buffer.py's table from {processes: [per-round images/s]}; 1 process is the baseline."""
    rows = [[p, spread(found, 0), spread(ratios(found, throughput[1]), 2)] for p, found in throughput.items()]
    return markdown(["processes (1 thread each)", "images/s", "speed-up over 1"], rows)


def describe(args, device):
    """The line before a table: the problem and the protocol."""
    params = sum(p.numel() for p in get_network(args.model, 3, 10, (32, 32)).parameters())
    memory = "max_memory_allocated" if device.type == "cuda" else "peak resident set"
    kept = "" if device.type == "cuda" else ", freed memory kept (parallel.keep_freed_memory) unless 'glibc default'"
    return (f"{args.model} ({params:,} parameters), 3x32x32, 10 classes, batch_syn = all, DSA on{kept}; each figure "
            f"a fresh process: 1 warm-up + {args.iterations} timed iteration(s); median [min-max] over {args.repeats} "
            f"alternated rounds; peak MB = the iterations' {memory} less what the set-up holds.")


def forecast_mode(args):
    """Mode 4: for 1 and 3 channels, each --ipc and both backwards, the forecast (memory.forecast,
    what distill.py compares with the free memory) against the measured peak, one fresh process each."""
    device = pick_device(args.device)
    model, steps = args.model or "ConvNetW32", (args.syn_steps or [20])[0]
    rows = []
    for channels in (1, 3):
        for ipc in args.ipc or [1, 10, 50]:
            for low_memory, backward in BACKWARD_NAMES.items():
                found = iteration(argparse.Namespace(**{**vars(args), "model": model, "device": device.type}), ipc,
                                  steps, low_memory, Setting(channels=channels))
                measured, forecast_mb = found["peak_mb"][0], found["forecast_mb"][0]
                print(f"{channels} {ipc} {backward}: {found}", file=sys.stderr, flush=True)
                rows.append([f"{channels}x{SIDES[channels]}x{SIDES[channels]}", ipc, backward, f"{measured:.0f}",
                             f"{forecast_mb:.0f}", f"{forecast_mb / measured:.2f}"])
    print(f"{model}, syn_steps {steps}, batch_syn = all, DSA on; peak MB = the iterations' "
          f"{'max_memory_allocated' if device.type == 'cuda' else 'peak resident set'} less what the set-up holds, "
          f"one fresh process each, freed memory kept as distill.py keeps it\n")
    print(markdown(["images", "ipc", "backward", "measured peak MB", "forecast MB", "forecast / measured"], rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="ConvNet in mode 1, ConvNetW32 in mode 2")
    parser.add_argument("--ipc", type=int, nargs="+", help="1 10 in mode 1, 10 50 in mode 2")
    parser.add_argument("--syn_steps", type=int, nargs="+", help="10 20 in mode 1, 20 in mode 2")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (at least 3)")
    parser.add_argument("--iterations", type=int, default=1, help="timed iterations per process (their median)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--processes", type=int, nargs="+", help="mode 2: these process counts (and 1) under torchrun")
    parser.add_argument("--chunks", type=chunk_size, nargs="+", help="mode 3: these --chunk_syn sizes ('all': one)")
    parser.add_argument("--buffer_model", default="ConvNetW32", help="mode 2: buffer.py's --model")
    parser.add_argument("--buffer_experts", type=int, default=2, help="mode 2: buffer.py's --num_experts")
    parser.add_argument("--buffer_epochs", type=int, default=1, help="mode 2: buffer.py's --train_epochs")
    parser.add_argument("--one", nargs=2, type=int, metavar=("IPC", "SYN_STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--low_memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk_syn", type=positive_int, help=argparse.SUPPRESS)
    parser.add_argument("--glibc_default", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=3, choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--forecast", action="store_true",
                        help="mode 4: distill.py's forecast of an iteration's peak memory against the measured peak")
    args = parser.parse_args()
    if args.one:
        return worker(args)
    if args.forecast:
        return forecast_mode(args)
    if args.repeats < 3 or args.iterations < 1:
        sys.exit("error: --repeats must be at least 3 (a median and a spread) and --iterations at least 1")
    if args.processes and args.chunks:
        sys.exit("error: --processes and --chunks are two modes; give one")
    mode = "processes" if args.processes else "chunks" if args.chunks else "backward"
    for flag, default in DEFAULTS[mode].items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    device = pick_device(args.device)
    args.device = device.type  # the workers: cuda:LOCAL_RANK under torchrun, else the default GPU
    processes = sorted({1, *(args.processes or [])})
    if device.type == "cuda" and torch.cuda.device_count() < processes[-1]:
        sys.exit(f"error: --processes {processes[-1]} needs {processes[-1]} GPUs; this machine has "
                 f"{torch.cuda.device_count()}")
    name = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}" if device.type == "cuda"
            else f"CPU, {os.cpu_count()} cores ({torch.get_num_threads()} threads unless a row says otherwise)")
    print(f"{name}; torch {torch.__version__}; `{shlex.join(['python', *sys.argv])}`\n", flush=True)
    run_mode(args, mode, device, processes)


def run_mode(args, mode, device, processes):
    """Modes 1 to 3: the alternated rounds of every configuration, then their tables."""
    if mode == "backward":
        configs = [(ipc, steps, low) for ipc in args.ipc for steps in args.syn_steps for low in BACKWARD_NAMES]
        results = alternate(configs, lambda config: iteration(args, *config), args.repeats)
        print(describe(args, device) + "\n\n" + backward_table(results, args.ipc, args.syn_steps))
        return

    if mode == "processes":
        named, versus = settings(processes, device), "1x1"
        baselines = dict.fromkeys(named, next(iter(named)))
    else:
        named, versus = chunk_settings(args.chunks, device), "before"
        baselines = before_of(named)
    configs = [(ipc, steps, low, name) for ipc in args.ipc for steps in args.syn_steps for low in BACKWARD_NAMES
               for name in named]
    results = alternate(configs, lambda config: iteration(args, *config[:3], named[config[3]]), args.repeats)
    table = settings_table(results, args.ipc, args.syn_steps, named, baselines, versus)
    print(f"{describe(args, device)}\n\n{table}\n", flush=True)
    if mode == "chunks":
        return
    throughput = alternate(processes, lambda p: buffer_run(args, p), args.repeats)
    print(f"buffer.py --dataset FashionMNIST-mini --model {args.buffer_model} --num_experts {args.buffer_experts} "
          f"--train_epochs {args.buffer_epochs} --save_interval 1 --dsa True --device {args.device}; images/s = "
          f"experts x epochs x {MINI_TRAIN_IMAGES} / wall seconds of the command (start-up and data loading "
          f"included); median [min-max] over {args.repeats} alternated rounds\n\n{buffer_table(throughput)}")


if __name__ == "__main__":
    main()
