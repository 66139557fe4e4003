"""Start-up on a folder dataset: the first start (decoding every JPEG, fitting the ZCA, whitening
the images) against the second (reading all three from {data_path}/cache), printed as Markdown tables.

    python tools/bench_data.py                        # Tiny ImageNet's shape: 200 classes x 100 JPEGs of 64 px
    python tools/bench_data.py --device cuda          # the ZCA fitted and applied on the GPU
    python tools/bench_data.py --dataset ImageNet --res 32 --per_class 500 --side 160   # a 3x32x32 ZCA

It builds the folder in a temporary directory (random smooth pictures, --side px JPEGs; Tiny's
layout with val/val_annotations.txt, or ImageNet's 1000 class folders of which the imagenette ten
hold pictures) and times, each in a fresh process:

- loading: get_dataset without ZCA, first with an empty cache (decoding), then again;
- ZCA: get_dataset --zca with the images cached, first fitting the ZCA and whitening the images,
  then reading both back;
- the fit itself on the training set, on the CPU: ZCA.fit as it was before the cache (float
  images, torch's default threads, on the CPU whatever --device) and as it is now;
- distill.py from its start to its first iteration (--zca, ipc 1, 2 student steps, the evaluation
  at iteration 0 at its smallest: 1 network, 1 epoch), first with an empty cache, then again; its
  experts are one random trajectory of the right size. The second start must neither refit the
  ZCA nor whiten the images again.

Run with --zca False to leave out every ZCA figure (a 3x64x64 fit takes tens of minutes on a small
CPU, and seconds on a GPU).
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: python tools/bench_data.py
import buffer  # noqa: E402
from mtt.data import DATASETS, IMAGENET_SUBSETS, get_dataset  # noqa: E402
from mtt.zca import ZCA  # noqa: E402
from mtt.flags import boolean  # noqa: E402
from mtt.trajectories import SIDECAR, buffer_dir  # noqa: E402
from networks import flatten_params, get_network  # noqa: E402
from utils import REPO, cpu_threads, save_json  # noqa: E402

MODEL_FOR_SIDE = {32: "ConvNet", 64: "ConvNetD4", 128: "ConvNetD5"}  # depth grows with the side, as in DATM
DISTILL_FLAGS = ["--ipc", "1", "--syn_steps", "2", "--expert_epochs", "1", "--max_start_epoch", "1",
                 "--Iteration", "1", "--num_eval", "1", "--epoch_eval_train", "1"]


# ---------------------------------------------------------------------------------------------
# The folder, the experts


def smooth_picture(rng, side):
    """Random colour blobs: noise at an eighth of the side, enlarged, so JPEG sizes are realistic."""
    small = rng.integers(0, 256, (max(2, side // 8), max(2, side // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.BILINEAR)


def build_folder(root, args):
    """Tiny ImageNet's or ImageNet's layout under root, with --per_class training and
    --test_per_class test pictures per class."""
    rng = np.random.default_rng(0)
    save = lambda path: (path.parent.mkdir(parents=True, exist_ok=True),
                         smooth_picture(rng, args.side).save(path, quality=90))
    if args.dataset == "Tiny":
        wnids = [f"n{i:08d}" for i in range(args.classes)]
        for wnid in wnids:
            for i in range(args.per_class):
                save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        rows = []
        for i in range(args.classes * args.test_per_class):
            save(root / "val" / "images" / f"val_{i}.JPEG")
            rows.append(f"val_{i}.JPEG\t{wnids[i % args.classes]}\t0\t0\t{args.side}\t{args.side}\n")
        (root / "val" / "val_annotations.txt").write_text("".join(rows))
        return args.classes * args.per_class
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        (root / "train" / wnid).mkdir(parents=True)
    for index in IMAGENET_SUBSETS["imagenette"]:
        for i in range(args.per_class):
            save(root / "train" / wnids[index] / f"{i}.JPEG")
        for i in range(args.test_per_class):
            save(root / "val" / wnids[index] / f"{i}.JPEG")
    return 10 * args.per_class


def build_experts(buffer_path, args):
    """One expert of 1 epoch: the network's initialisation and a small random step from it, with
    the sidecar buffer.py would write for these flags."""
    flags = buffer.parse_args(["--dataset", args.dataset, "--model", args.model, "--zca", str(args.zca),
                               "--res", str(args.res), "--train_epochs", "1", "--buffer_path", str(buffer_path)])
    meta = buffer.describe(flags, seed=0)
    channel, im_size, num_classes = DATASETS[args.dataset].shape(args.res)
    torch.manual_seed(0)
    theta = flatten_params(get_network(args.model, channel, num_classes, im_size))
    trajectory = torch.stack([theta, theta + 1e-3 * torch.randn_like(theta)]).numpy()
    directory = Path(buffer_dir(str(buffer_path), args.dataset, args.model, args.zca, "imagenette", args.res))
    directory.mkdir(parents=True)
    np.save(directory / "replay_buffer_0.npy", trajectory[None])
    meta["experts"] = [{"file": "replay_buffer_0.npy", "row": 0, "index": 0, "seed": 0, "train_acc": [0.0],
                        "test_acc": [0.0]}]
    meta["next_index"] = 1
    save_json(meta, Path(directory) / SIDECAR)


# ---------------------------------------------------------------------------------------------
# One measurement, in its own process


def old_fit(images, eps=0.1, chunk=4096):
    """ZCA.fit before the cache: float images, the covariance summed chunk by chunk on the CPU."""
    x = images.flatten(1)
    mean = sum(rows.double().sum(0) for rows in torch.split(x, chunk)) / len(x)
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for rows in torch.split(x, chunk):
        centred = rows.double() - mean
        cov += centred.T @ centred
    cov /= len(x) - 1
    s, u = torch.linalg.eigh(cov)
    s = s.clamp_min(0)
    transform = (u * (s + eps).rsqrt()) @ u.T
    inverse = (u * (s + eps).sqrt()) @ u.T
    return ZCA(mean.float(), transform.float(), inverse.float(), eps)


def one(args):
    """The hidden --one side: time one step and print {"seconds": ...} as the last line."""
    start = time.perf_counter()
    if args.one in ("load", "load_zca"):
        get_dataset(args.dataset, args.data_path, args.one == "load_zca", "imagenette", args.res, args.device)
    else:
        x_train = DATASETS[args.dataset].load(args.data_path, "imagenette", args.res)[0]
        start = time.perf_counter()
        if args.one == "fit_old":
            old_fit(x_train.float().div_(255))
        else:
            ZCA.fit(x_train, device="cpu")
    print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}))


def child(args, what):
    command = [sys.executable, __file__, "--one", what, "--dataset", args.dataset, "--res", str(args.res),
               "--data_path", str(args.data_path), "--device", args.device]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{result.stderr[-3000:]}\nerror: {' '.join(command)} failed")
    return json.loads(result.stdout.splitlines()[-1]), result.stdout


def distill_start(args, buffer_path, save_path):
    """Seconds from distill.py's start to the end of its set-up (run.json written: the data loaded
    and whitened, the experts opened, the set initialised) and to the start of its first iteration
    (its log line appears when the iteration ends: its own seconds are taken off), and its output."""
    command = [sys.executable, str(REPO / "distill.py"), "--dataset", args.dataset, "--model", args.model,
               "--res", str(args.res), "--zca", str(args.zca), "--data_path", str(args.data_path),
               "--buffer_path", str(buffer_path), "--save_path", str(save_path), "--device", args.device,
               *DISTILL_FLAGS]
    log, described = Path(save_path) / "log.jsonl", Path(save_path) / "run.json"
    setup = first = None
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True)
        while first is None and process.poll() is None:
            seconds = time.perf_counter() - start
            setup = setup or (described.exists() and seconds)
            complete = log.read_text().split("\n")[:-1] if log.exists() else []  # a line being written waits
            first = next((row for row in map(json.loads, complete) if row["type"] == "iteration"), None)
            time.sleep(0.05)
        process.wait()
        output.seek(0)
        text = output.read()
    if process.returncode or first is None:
        sys.exit(f"{text[-3000:]}\nerror: {' '.join(command)} failed")
    shutil.rmtree(save_path)
    return setup, seconds - first["seconds"], text


# ---------------------------------------------------------------------------------------------
# The parent


def row(name, first, second):
    return f"| {name} | {first:.2f} | {second:.2f} | {first / second:.1f}x |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="Tiny", choices=["Tiny", "ImageNet"])
    parser.add_argument("--res", type=int, default=64, help="image side (ImageNet; Tiny is always 64)")
    parser.add_argument("--classes", type=int, default=200, help="classes (Tiny; ImageNet subsets have 10)")
    parser.add_argument("--per_class", type=int, default=100, help="training pictures per class")
    parser.add_argument("--test_per_class", type=int, default=5,
                        help="test pictures per class (few: distill.py's evaluation at iteration 0 tests on them)")
    parser.add_argument("--side", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--zca", type=boolean, default=True, help="measure the ZCA rows, and distill with --zca")
    parser.add_argument("--model", default=None, help="distill.py's model (default: by the image side)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data_path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.res = 64 if args.dataset == "Tiny" else args.res
    if args.one:
        return one(args)
    args.model = args.model or MODEL_FOR_SIDE.get(args.res, "ConvNet")

    with tempfile.TemporaryDirectory() as folder:
        args.data_path, buffer_path, save_path = (Path(folder) / name for name in ("data", "buffers", "run"))
        start = time.perf_counter()
        images = build_folder(args.data_path, args)
        print(f"built {images} training JPEGs of {args.side} px in {time.perf_counter() - start:.0f} s; "
              f"{cpu_threads()} CPU threads, device {args.device}", flush=True)
        build_experts(buffer_path, args)
        times = {}
        for what in ["load"] + ["load_zca"] * args.zca:
            times[what] = [child(args, what)[0]["seconds"] for _ in range(2)]
        if args.zca:
            times["fit"] = [child(args, what)[0] for what in ("fit_old", "fit_new")]
        shutil.rmtree(args.data_path / "cache")
        runs = [distill_start(args, buffer_path, save_path) for _ in range(2)]
        times["setup"], times["distill"] = ([run[i] for run in runs] for i in range(2))
        again = {what: what in runs[1][2] for what in ("fitting ZCA", "whitening")}

    shape = f"{images} x 3x{args.res}x{args.res}"
    lines = [f"{args.dataset}-shaped folder: {images} training JPEGs of {args.side} px ({shape}), device "
             f"{args.device}", "", "| step | first start (s) | second start (s) | first / second |",
             "|---|---|---|---|", row("loading (get_dataset; decoding, then the cache)", *times["load"])]
    if args.zca:
        lines.append(row("get_dataset --zca, images cached (fitting and whitening, then the cache)",
                         *times["load_zca"]))
    zca = " --zca" * args.zca
    lines += [row(f"distill.py{zca} to the end of its set-up (run.json written)", *times["setup"]),
              row(f"distill.py{zca} to its first iteration (after the evaluation at 0)", *times["distill"])]
    if args.zca:
        (old, new) = times["fit"]
        yes = lambda what: "yes" if again[what] else "no"
        lines += ["", f"At the second start of distill.py, the ZCA refitted: {yes('fitting ZCA')}; the images "
                  f"whitened again: {yes('whitening')}", "",
                  f"| ZCA fit of {shape} on the CPU | seconds | threads |", "|---|---|---|",
                  f"| before the cache (ZCA.fit as it was) | {old['seconds']:.1f} | {old['threads']} |",
                  f"| now (ZCA.fit, all threads) | {new['seconds']:.1f} | {cpu_threads()} |"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
