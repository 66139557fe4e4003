"""One command that checks a GPU run of this project and prints what it found as Markdown tables.

    python tools/gpu_check.py                 # on a machine with a CUDA GPU (estimated 2 to 4 minutes on one H100)
    python tools/gpu_check.py --device cpu    # the same checks at CPU sizes (under a minute on 2 cores)

1. The step (matching.BACKWARD: the unroll and the replay; DSA on and off; hard labels and soft
   ones) on the device in float32, TF32 off, against the same step in float64 on the CPU, on
   identical minibatches and DSA draws: the relative error ||a - b|| / ||b|| of the loss and of
   each learnable tensor's gradient. With --device cpu: float32 against float64, both on the CPU.
   The ConvNet has sigmoids for ReLUs here: see step_net for why.
2. The replay against the unroll on the device, from the same runs as section 1.
3. memory.forecast (by which distill.py picks the backward) against the measured peak of one
   iteration: the growth of max_memory_allocated over the set-up (CUDA, in this process) or of the
   peak resident set of a fresh process (CPU, tools/bench.py's measurement).
4. Seconds per iteration of the unroll and the replay (tools/bench.py's measure), TF32 on and off.
5. Images per second of an expert's epoch and of an evaluation network's (training.train_epoch).
6. End to end: buffer.py, distill.py and eval.py on the embedded FashionMNIST-mini in a temporary
   folder; the distilled set's test accuracy must beat chance by MARGIN points. The random-subset
   baseline of the same size is reported beside it.

Sections 4 and 5 are measurements, the others checks, each with its tolerance in its heading. The
command exits 0 when every check passes; otherwise its last line names those that failed.
"""
import argparse
import copy
import dataclasses
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: python tools/gpu_check.py
from mtt.augment import DSA_STRATEGY  # noqa: E402
from mtt.matching import BACKWARD, SyntheticSet, draw_schedule  # noqa: E402
from mtt.training import train_epoch  # noqa: E402
from networks import CONVNET_VARIANTS, ConvNet, flatten_params, get_network  # noqa: E402
from tools import bench  # noqa: E402
from utils import REPO  # noqa: E402

# float32 against float64 through syn_steps unrolled updates and a second-order gradient: float32's
# rounding (6e-8) grows by orders of magnitude, but an error of 1e-3 is a wrong kernel, not rounding.
STEP_TOLERANCE = 1e-3
REPLAY_TOLERANCE = 1e-4  # the replay rebuilds the unroll's forward bit for bit; only its sums' order differs
FORECAST_TOLERANCE = 0.25  # |forecast / measured - 1|
CHANCE, MARGIN = 10.0, 20.0  # per cent: FashionMNIST's 10 classes; what the distilled set must add to chance
BACKWARDS = {False: "unroll", True: "replay"}  # matching.BACKWARD's keys: low_memory
COMPARED = ("loss", "images", "syn_lr", "label_logits")  # the loss, then each learnable tensor's gradient
COLUMNS = ["loss", *(f"grad {name}" for name in COMPARED[1:])]
EPOCH_BATCH = 256  # buffer.py's and evaluate_synset's --batch_train
EVAL_IMAGES = 100  # a distilled set of ipc 10 on 10 classes
SGD = {  # section 5: each epoch's optimiser, as buffer.py (--mom 0 --l2 0) and evaluate_synset build it
    "expert (buffer.py)": {"momentum": 0, "weight_decay": 0},
    "evaluation (evaluate_synset)": {"momentum": 0.9, "weight_decay": 5e-4},
}
DATA = ["--dataset", "FashionMNIST-mini"]
DISTILL = "--ipc 1 --lr_img 100 --lr_lr 1e-5 --lr_teacher 0.01 --skip_first_eva True".split()  # + the sizes below
BASELINE = "--baseline random --ipc 1".split()  # eval.py: one random real image per class, as distilled


@dataclass(frozen=True)
class Sizes:
    """What each section runs on one kind of device."""
    step_model: str  # sections 1 and 2: 3x32x32 images, 10 classes; a ConvNet variant, with sigmoids
    step_ipc: int
    step_syn_steps: int
    step_batch: int  # batch_syn: below the set's size, so that the minibatches differ
    forecast_model: str  # section 3: 1x28x28 and 3x32x32 images
    forecast_ipcs: tuple
    forecast_syn_steps: int
    speed_model: str  # section 4: 3x32x32
    speed_ipcs: tuple
    speed_syn_steps: int
    speed_timed: int  # timed iterations after the warm-up
    epoch_model: str  # section 5: 3x32x32
    expert_images: int
    expert_timed: int  # timed epochs after the warm-up
    eval_timed: int
    scripts: dict  # section 6: each script's sizing flags


SIZES = {
    "cuda": Sizes(step_model="ConvNetW32", step_ipc=2, step_syn_steps=10, step_batch=10,
                  forecast_model="ConvNetW32", forecast_ipcs=(1, 10, 50), forecast_syn_steps=20,
                  speed_model="ConvNet", speed_ipcs=(1, 10, 50), speed_syn_steps=20, speed_timed=3,
                  epoch_model="ConvNet", expert_images=10_000, expert_timed=2, eval_timed=20,
                  scripts={"buffer": "--model ConvNetW16 --num_experts 2 --train_epochs 5".split(),
                           "distill": ("--model ConvNetW16 --syn_steps 10 --expert_epochs 2 --max_start_epoch 3 "
                                       "--Iteration 50 --eval_it 50 --num_eval 2 --epoch_eval_train 100").split(),
                           "eval": "--num_eval 2 --epoch_eval_train 100".split()}),
    # Under a minute on 2 cores. Section 3 keeps the GPU's model, whose peaks the forecast was fitted to,
    # at ipc 1 only: each figure is a fresh process of about 3 s, most of it starting torch.
    "cpu": Sizes(step_model="ConvNetW16", step_ipc=2, step_syn_steps=5, step_batch=10,
                 forecast_model="ConvNetW32", forecast_ipcs=(1,), forecast_syn_steps=20,
                 speed_model="ConvNetW16", speed_ipcs=(1, 2, 5), speed_syn_steps=5, speed_timed=2,
                 epoch_model="ConvNetW16", expert_images=1_000, expert_timed=2, eval_timed=5,
                 scripts={"buffer": "--model ConvNetW16 --num_experts 1 --train_epochs 1".split(),
                          "distill": ("--model ConvNetW16 --syn_steps 10 --expert_epochs 1 --max_start_epoch 1 "
                                      "--Iteration 20 --eval_it 20 --num_eval 1 --epoch_eval_train 20").split(),
                          "eval": "--num_eval 2 --epoch_eval_train 50".split()}),
}
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Helpers


def verdict(passed):
    return "pass" if passed else "FAIL"


def tf32_said(device, enabled):
    """What a heading says of TF32: only CUDA has it."""
    return f"TF32 {'on' if enabled else 'off'}; " if device.type == "cuda" else ""


def section(heading, header, rows, seconds=None, after=""):
    """Print one section: its heading line (and the seconds it took), its table, then `after`."""
    took = "" if seconds is None else f" [{seconds:.0f} s]"
    print(f"**{heading}**{took}\n\n{bench.markdown(header, rows)}\n{after}", flush=True)


def timed(compute, *args):
    """(compute(*args), the seconds it took)."""
    start = time.perf_counter()
    return compute(*args), time.perf_counter() - start


@contextmanager
def tf32(enabled):
    """TF32 in CUDA matmuls and convolutions, both set as distill.py's --tf32 sets them; restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def release(device):
    """Free what the last measurement left in torch's CUDA cache, so that the next starts alike."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Sections 1 and 2: the step against float64, the replay against the unroll


def step_net(model):
    """The ConvNet variant with sigmoids for its ReLUs. A ReLU's derivative jumps at 0: float32's
    rounding puts some units on the other side of it than float64 does, and each such unit moves the
    gradients by a step, not by a rounding error (measured on the CPU alone, ConvNetW16, DSA on: 4 of
    8 draws over 1e-3, up to 2e-2; with sigmoids all below 2e-6). Smooth, the step's float32 error
    measures the kernels' arithmetic: convolutions, norms and DSA, differentiated twice."""
    return ConvNet(3, 10, (32, 32), **{**CONVNET_VARIANTS[model], "act": "sigmoid"})


def step_problem(sizes, soft):
    """The step's inputs on the CPU in float32, seeded: a ConvNet (theta0 its parameters), a target
    near theta0, the images, their class ids and, with soft labels, random label logits."""
    torch.manual_seed(0)
    net = step_net(sizes.step_model)
    theta0 = flatten_params(net)
    count = 10 * sizes.step_ipc
    return {"net": net, "theta0": theta0, "target": theta0 + 0.01 * torch.randn_like(theta0),
            "images": torch.randn(count, 3, 32, 32), "labels": torch.arange(10).repeat_interleave(sizes.step_ipc),
            "label_logits": torch.randn(count, 10) if soft else None}


def moved(schedule, device, dtype):
    """The schedule's minibatches and DSA draws on `device`, the floating parameters in `dtype`: the
    same draws, so that both sides of a comparison train on the same inputs."""
    cast = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)
    return [dataclasses.replace(step, rows=step.rows.to(device), augmentation=[(op, cast(p)) for op, p in
                                                                               step.augmentation],
                                crops=None if step.crops is None else step.crops.to(device)) for step in schedule]


def run_step(problem, schedule, replay, device, dtype):
    """One backward on `device` in `dtype`: {"loss", then each learnable tensor's name: its gradient},
    in float64 on the CPU for comparing."""
    copied = lambda t: None if t is None else t.to(device, dtype, copy=True)  # SyntheticSet makes its own leaves
    synset = SyntheticSet(copied(problem["images"]), problem["labels"].to(device),
                          torch.tensor(0.01, device=device, dtype=dtype), copied(problem["label_logits"]))
    net = copy.deepcopy(problem["net"]).to(device, dtype)
    loss = BACKWARD[replay](net, synset, copied(problem["theta0"]), copied(problem["target"]),
                            moved(schedule, device, dtype))
    return {"loss": loss.double().cpu(), **{name: t.grad.double().cpu() for name, t in synset.tensors.items()}}


def step_runs(sizes, device):
    """{(replay, dsa, soft): {"device": float32 on the device, "float64": on the CPU}}: every case,
    both backwards on the same schedule, drawn once on the CPU. TF32 off: full float32."""
    runs = {}
    for dsa in (True, False):
        for soft in (False, True):
            problem = step_problem(sizes, soft)
            schedule = draw_schedule(problem["images"], sizes.step_syn_steps, sizes.step_batch,
                                     DSA_STRATEGY if dsa else None)
            for replay in BACKWARDS:
                with tf32(False):
                    runs[replay, dsa, soft] = {"device": run_step(problem, schedule, replay, device, torch.float32),
                                               "float64": run_step(problem, schedule, replay, CPU, torch.float64)}
    return runs


def errors(found, reference):
    """The relative error ||a - b|| / ||b|| of each compared tensor (a zero reference: inf or nan, a failure)."""
    return {name: ((found[name] - reference[name]).norm() / reference[name].norm()).item() for name in reference}


def error_cells(found, tolerance):
    """The table's cells for COMPARED ('-' where a tensor is not learned) and whether all are below tolerance."""
    return [f"{found[name]:.1e}" if name in found else "-" for name in COMPARED], all(
        error < tolerance for error in found.values())  # nan fails too


def case_name(dsa, soft):
    return f"DSA {'on' if dsa else 'off'}, {'soft' if soft else 'hard'} labels"


def step_section(runs, seconds, device, sizes):
    """Section 1: {check name: passed}."""
    checks, rows = {}, []
    for (replay, dsa, soft), run in runs.items():
        cells, passed = error_cells(errors(run["device"], run["float64"]), STEP_TOLERANCE)
        checks[f"1. {BACKWARDS[replay]}, {case_name(dsa, soft)}"] = passed
        rows.append([BACKWARDS[replay], "on" if dsa else "off", "soft" if soft else "hard", *cells, verdict(passed)])
    where = "CUDA" if device.type == "cuda" else "the CPU"
    section(f"1. The step in float32 on {where} against float64 on the CPU: relative error, pass below "
            f"{STEP_TOLERANCE:g} ({tf32_said(device, False)}{sizes.step_model} with sigmoids for ReLUs, 3x32x32, "
            f"ipc {sizes.step_ipc}, syn_steps {sizes.step_syn_steps}, batch_syn {sizes.step_batch}; identical "
            f"minibatches and DSA draws)",
            ["backward", "DSA", "labels", *COLUMNS, "check"], rows, seconds)
    return checks


def replay_section(runs, device):
    """Section 2: {check name: passed}."""
    checks, rows = {}, []
    for (replay, dsa, soft), run in runs.items():
        if replay:
            cells, passed = error_cells(errors(run["device"], runs[False, dsa, soft]["device"]), REPLAY_TOLERANCE)
            checks[f"2. replay against unroll, {case_name(dsa, soft)}"] = passed
            rows.append(["on" if dsa else "off", "soft" if soft else "hard", *cells, verdict(passed)])
    section(f"2. The replay against the unroll, both float32 on {device.type.upper()}: relative error, pass below "
            f"{REPLAY_TOLERANCE:g} ({tf32_said(device, False)}the runs of section 1)",
            ["DSA", "labels", *COLUMNS, "check"], rows)
    return checks


# ---------------------------------------------------------------------------------------------
# Section 3: the forecast against the measured peak


def peak(sizes, ipc, replay, channels, device):
    """(measured MB, forecast MB) of one iteration: on CUDA in this process (bench.measure resets the
    allocator's peak after the set-up); on the CPU in a fresh process, whose heap holds nothing of
    the sections before."""
    if device.type == "cuda":
        release(device)
        _, measured, forecast_mb = bench.measure(sizes.forecast_model, ipc, sizes.forecast_syn_steps, replay, None, 1,
                                                 device, channels)
        return measured, forecast_mb
    args = argparse.Namespace(model=sizes.forecast_model, device="cpu", iterations=1)
    found = bench.iteration(args, ipc, sizes.forecast_syn_steps, replay, bench.Setting(channels=channels))
    return found["peak_mb"][0], found["forecast_mb"][0]


def forecast_peaks(sizes, device):
    """{(channels, ipc, replay): (measured MB, forecast MB)}."""
    if device.type == "cuda":  # CUDA's lazy first allocations (cuBLAS's workspace) must not count in the first peak
        bench.measure(sizes.forecast_model, 1, 2, False, None, 1, device)
    with tf32(True):  # distill.py's default
        return {(channels, ipc, replay): peak(sizes, ipc, replay, channels, device)
                for channels in (1, 3) for ipc in sizes.forecast_ipcs for replay in BACKWARDS}


def forecast_section(peaks, seconds, device, sizes):
    """Section 3: {check name: passed}."""
    checks, rows = {}, []
    for (channels, ipc, replay), (measured, forecast_mb) in peaks.items():
        shape = f"{channels}x{bench.SIDES[channels]}x{bench.SIDES[channels]}"
        ratio = forecast_mb / measured if measured > 0 else float("inf")
        passed = abs(ratio - 1) <= FORECAST_TOLERANCE
        checks[f"3. forecast {shape} ipc {ipc} {BACKWARDS[replay]}"] = passed
        rows.append([shape, ipc, BACKWARDS[replay], f"{measured:.0f}", f"{forecast_mb:.0f}", f"{ratio:.2f}",
                     verdict(passed)])
    measure = ("max_memory_allocated, in this process" if device.type == "cuda" else
               "peak resident set, a fresh process each (tools/bench.py)")
    skipped = "" if device.type == "cuda" else "; ipc 10 and 50 left out on the CPU, for time"
    section(f"3. The forecast against the measured peak: pass within {FORECAST_TOLERANCE:.0%} ({sizes.forecast_model}, "
            f"10 classes, syn_steps {sizes.forecast_syn_steps}, batch_syn = all, DSA on; {tf32_said(device, True)}"
            f"measured = the iteration's {measure} less what the set-up holds{skipped})",
            ["images", "ipc", "backward", "measured MB", "forecast MB", "forecast / measured", "check"], rows, seconds)
    return checks


# ---------------------------------------------------------------------------------------------
# Sections 4 and 5: speed


def speed_section(sizes, device):
    """Section 4: seconds per iteration; measurements, no checks."""
    start = time.perf_counter()
    settings = {True: "on", False: "off"} if device.type == "cuda" else {False: "n/a on CPU"}
    rows = []
    for ipc in sizes.speed_ipcs:
        for enabled, name in settings.items():
            seconds = {}
            for replay in BACKWARDS:
                release(device)
                with tf32(enabled):
                    seconds[replay] = bench.measure(sizes.speed_model, ipc, sizes.speed_syn_steps, replay, None,
                                                    sizes.speed_timed, device)[0]
            rows.append([ipc, name, f"{seconds[False]:.3f}", f"{seconds[True]:.3f}",
                         f"{seconds[True] / seconds[False]:.2f}"])
    section(f"4. Seconds per iteration ({sizes.speed_model}, 3x32x32, 10 classes, syn_steps {sizes.speed_syn_steps}, "
            f"batch_syn = all, DSA on; 1 warm-up, then the median of {sizes.speed_timed}; a measurement, not a check)",
            ["ipc", "TF32", "unroll s/it", "replay s/it", "replay / unroll"], rows, time.perf_counter() - start)
    return {}


def images_per_second(model, count, sgd, timed, device):
    """Images per second of train_epoch (batch 256, DSA on) over `count` random CIFAR-shaped images:
    one warm-up epoch, then `count` / the median seconds of `timed` epochs."""
    torch.manual_seed(0)
    net = get_network(model, 3, 10, (32, 32)).to(device)
    images, labels = torch.randn(count, 3, 32, 32, device=device), torch.randint(10, (count,), device=device)
    optimizer = torch.optim.SGD(net.parameters(), 0.01, **sgd)
    seconds = []
    for _ in range(1 + timed):
        bench.synchronize(device)
        start = time.perf_counter()
        train_epoch(net, images, labels, optimizer, EPOCH_BATCH, DSA_STRATEGY).item()  # .item() waits for the device
        seconds.append(time.perf_counter() - start)
    return count / statistics.median(seconds[1:])


def epochs_section(sizes, device):
    """Section 5: images per second; measurements, no checks."""
    start, rows = time.perf_counter(), []
    for (epoch, sgd), count, timed in zip(SGD.items(), (sizes.expert_images, EVAL_IMAGES),
                                          (sizes.expert_timed, sizes.eval_timed)):
        with tf32(True):  # the scripts' default
            found = images_per_second(sizes.epoch_model, count, sgd, timed, device)
        rows.append([epoch, count, timed, f"{found:,.0f}"])
    section(f"5. Images per second of one epoch of training.train_epoch ({sizes.epoch_model}, random 3x32x32 images, "
            f"batch {EPOCH_BATCH}, DSA on; {tf32_said(device, True)}1 warm-up epoch, then the median; a measurement, "
            f"not a check)",
            ["epoch", "images", "timed epochs", "images/s"], rows, time.perf_counter() - start)
    return {}


# ---------------------------------------------------------------------------------------------
# Section 6: the three scripts, end to end


def end_to_end(sizes, device):
    """Section 6: buffer.py, distill.py, eval.py as a user runs them; {check name: passed}. A script
    that fails ends this command with its stderr's tail and one line naming it (bench.run)."""
    scripts, start = sizes.scripts, time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        buffers, run, out = f"{folder}/buffers", f"{folder}/run", f"{folder}/rows.json"
        commands = [["buffer.py", *DATA, *scripts["buffer"], "--buffer_path", buffers],
                    ["distill.py", *DATA, *DISTILL, *scripts["distill"], "--buffer_path", buffers, "--save_path", run],
                    ["eval.py", "--syn_path", run, *BASELINE, *scripts["eval"], "--out", out]]
        for command in commands:
            command += ["--device", device.type]
            bench.run([sys.executable, str(REPO / command[0]), *command[1:]])
        rows = json.loads(Path(out).read_text())["rows"]
    shown = "\n".join(shlex.join(["python", *command]).replace(folder, "TMP") for command in commands)
    accuracy = lambda row: f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_std']:.2f}"
    distilled = next(row for row in rows if row["set"] != "random")
    random_row = next(row for row in rows if row["set"] == "random")
    passed = 100 * distilled["test_acc_mean"] > CHANCE + MARGIN
    table = [["distilled", accuracy(distilled), distilled["n"], f"{verdict(passed)} (above {CHANCE + MARGIN:g})"],
             ["random real subset", accuracy(random_row), random_row["n"], "reported"]]
    section(f"6. End to end on FashionMNIST-mini: the distilled set's test accuracy must beat chance ({CHANCE:g}%) by "
            f"{MARGIN:g} points (the commands below, in a temporary folder TMP)",
            ["set (ipc 1)", "test acc %", "networks", "check"], table, time.perf_counter() - start,
            f"\n```\n{shown}\n```\n")
    return {f"6. distilled accuracy above {CHANCE + MARGIN:g}%": passed}


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: the GPU's sizes; cpu: the same checks at sizes a CPU runs in a minute")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here (torch sees none); run it on a GPU machine, or with --device cpu for the "
                 "same checks at CPU sizes")
    device, sizes = torch.device(args.device), SIZES[args.device]
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}")
    print(f"{name}; torch {torch.__version__}; `{shlex.join(['python', *sys.argv])}`\n", flush=True)
    start = time.perf_counter()
    runs, step_seconds = timed(step_runs, sizes, device)
    peaks, peak_seconds = timed(forecast_peaks, sizes, device)
    checks = {**step_section(runs, step_seconds, device, sizes), **replay_section(runs, device),
              **forecast_section(peaks, peak_seconds, device, sizes)}
    for run_section in (speed_section, epochs_section, end_to_end):
        checks.update(run_section(sizes, device))
    failed = [name for name, passed in checks.items() if not passed]
    took = f"{time.perf_counter() - start:.0f} s"
    if failed:
        print(f"FAILED {len(failed)} of {len(checks)} checks ({took}): {'; '.join(failed)}", flush=True)
        sys.exit(1)
    print(f"all {len(checks)} checks pass ({took})")


if __name__ == "__main__":
    main()
