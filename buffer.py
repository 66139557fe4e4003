"""Train expert trajectories for trajectory matching and save them as memory-mappable numpy buffers.

    python buffer.py --dataset CIFAR10 --zca                  # 100 experts x 50 epochs, as published
    python buffer.py --dataset FashionMNIST-mini --num_experts 5 --train_epochs 10

Each expert is a network trained from random init with SGD on the full real training set (DSA on
every batch); its flat parameters (networks.flatten_params) are recorded at init and after every
epoch. Experts land in {buffer_path}/{dataset}[_NO_ZCA]/{model}/ (ImageNet adds {subset}/{res}):

    replay_buffer_{n}.npy  float32 (experts, train_epochs + 1, num_params), save_interval experts
                           per file; np.load(path, mmap_mode="r") reads only the snapshots used
    buffer.json            the settings, parameter shapes and, per expert, its file, row, seed
                           and per-epoch train and test accuracy

Files are written to a temporary name and renamed when complete, so an interrupted run never
leaves a partial buffer. A rerun into the same directory appends new files with new experts:
expert k of a directory (k counts every expert it already holds) starts from
set_seed(expert_seed(--seed, k)). A rerun with other settings (model, dataset, zca, epochs,
learning rate, ...) is refused rather than mixing trajectories.

The original's buffers (replay_buffer_{n}.pt: a list of experts, each a list of epochs, each
a list of per-parameter tensors) convert with one command; give the flags they were trained
with (the defaults are the original's) so that the sidecar describes them:

    python buffer.py --import_pt OLD_DIR --dataset CIFAR10 --model ConvNet --zca
"""
import argparse
import os
import pickle
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from experts import SIDECAR, expert_files, file_number, numbered_files, read_sidecar
from networks import flatten_params, get_network
from utils import (DATASETS, UsageError, accuracy, add_common_args, atomic_path, buffer_dir, eta, get_dataset,
                   pick_device, require_positive, save_json, set_seed, train_epoch)

# Settings every expert of a directory must share; the sidecar states them once for all.
SHARED = ("dataset", "model", "zca", "num_params", "train_epochs", "lr_teacher", "batch_train", "dsa",
          "dsa_strategy", "mom", "l2", "decay")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--num_experts", type=int, default=100, help="experts to train")
    parser.add_argument("--lr_teacher", type=float, default=0.01, help="the experts' SGD learning rate")
    parser.add_argument("--batch_real", type=int, default=256, help="unused here; kept so the original's commands run")
    parser.add_argument("--buffer_path", default="./buffers")
    parser.add_argument("--train_epochs", type=int, default=50, help="epochs per expert (snapshots: this + 1)")
    parser.add_argument("--decay", action="store_true", help="lr x0.1 after epoch train_epochs // 2 + 1")
    parser.add_argument("--mom", type=float, default=0, help="SGD momentum")
    parser.add_argument("--l2", type=float, default=0, help="SGD weight decay")
    parser.add_argument("--save_interval", type=int, default=10, help="experts per replay_buffer file")
    parser.add_argument("--import_pt", metavar="OLD_DIR",
                        help="convert the original's replay_buffer_{n}.pt files in OLD_DIR instead of training")
    return parser.parse_args(argv)


def check_args(args):
    require_positive(args, "num_experts", "train_epochs", "save_interval", "batch_train")
    if args.seed < 0:
        raise UsageError("--seed must be non-negative")


def expert_seed(seed, index):
    """The seed of expert `index` of a directory: a hash of both, so that no two experts of a
    directory share one, whatever --seed the runs that made them were given."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Writing the buffer directory


def describe(args, seed):
    """The sidecar of a new directory for experts trained (or imported) with these flags."""
    channel, im_size, num_classes = DATASETS[args.dataset].shape(args.res)
    im_size = list(im_size)
    shapes = [list(p.shape) for p in get_network(args.model, channel, num_classes, im_size).parameters()]
    return {"dataset": args.dataset, "subset": args.subset, "res": args.res, "model": args.model,
            "channel": channel, "im_size": im_size, "num_classes": num_classes, "zca": args.zca,
            "num_params": sum(int(np.prod(s)) for s in shapes), "param_shapes": shapes,
            "lr_teacher": args.lr_teacher, "train_epochs": args.train_epochs, "batch_train": args.batch_train,
            "batch_real": args.batch_real, "dsa": args.dsa, "dsa_strategy": args.dsa_strategy, "mom": args.mom,
            "l2": args.l2, "decay": args.decay, "seed": seed, "torch_version": torch.__version__, "experts": []}


def open_directory(directory, settings):
    """Create the directory, or check that the experts it holds were made like the new ones;
    return the sidecar the new experts are added to."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the buffer directory {directory}: {err.strerror}") from err
    if not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write to the buffer directory {directory}")
    if not (Path(directory) / SIDECAR).exists():
        if expert_files(directory):
            raise UsageError(f"{directory} holds replay_buffer files but no {SIDECAR}: move them away or "
                             f"choose another --buffer_path")
        return settings
    meta = read_sidecar(directory)
    differences = [f"{key} {meta.get(key)!r} (this run: {settings[key]!r})"
                   for key in SHARED if meta.get(key) != settings[key]]
    if differences:
        raise UsageError(f"{directory} holds experts with {', '.join(differences)}; choose another "
                         f"--buffer_path rather than mix trajectories")
    return meta


def next_file(directory, meta):
    """The name after every replay_buffer file on disk or in the sidecar, so none is ever reused."""
    names = [p.name for p in expert_files(directory)] + [expert["file"] for expert in meta["experts"]]
    return Path(directory) / f"replay_buffer_{max(map(file_number, names), default=-1) + 1}.npy"


@contextmanager
def new_buffer_file(path, shape):
    """A float32 array memory-mapped onto a temporary file, so that a big buffer never sits whole
    in RAM; it becomes `path` when the block completes and is deleted if the block raises."""
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        yield array
        array.flush()


# ---------------------------------------------------------------------------------------------
# Training


def train_expert(args, data, snapshots):
    """Train a fresh network from torch's RNG as the original does; write its flat parameters at
    init and after every epoch into snapshots; yield (train acc, test acc, images/s) per epoch."""
    net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(data.images_train.device)
    sgd = lambda lr: torch.optim.SGD(net.parameters(), lr, momentum=args.mom, weight_decay=args.l2)
    optimizer = sgd(args.lr_teacher)
    snapshots[0] = flatten_params(net).cpu().numpy()
    for epoch in range(args.train_epochs):
        start = time.time()
        train_acc = train_epoch(net, data.images_train, data.labels_train, optimizer, args.batch_train,
                                args.dsa_strategy if args.dsa else None).item()
        images_per_second = len(data.images_train) / (time.time() - start)
        test_acc = accuracy(net, data.images_test, data.labels_test)
        snapshots[epoch + 1] = flatten_params(net).cpu().numpy()
        if args.decay and epoch == args.train_epochs // 2 + 1:
            optimizer = sgd(args.lr_teacher * 0.1)  # a new optimiser, so momentum restarts too
        yield train_acc, test_acc, images_per_second


def train(args):
    check_args(args)
    directory = buffer_dir(args.buffer_path, args.dataset, args.model, args.zca, args.subset, args.res)
    meta = open_directory(directory, describe(args, args.seed))
    device = pick_device(args.device)
    data = get_dataset(args.dataset, args.data_path, args.zca, args.subset, args.res)
    shape = [data.channel, list(data.im_size), data.num_classes]
    assert shape == [meta["channel"], meta["im_size"], meta["num_classes"]], "DatasetInfo.shape disagrees with the data"
    data = replace(data, images_train=data.images_train.to(device), labels_train=data.labels_train.to(device),
                   images_test=data.images_test.to(device), labels_test=data.labels_test.to(device))
    print(f"{args.num_experts} {args.model} experts x {args.train_epochs} epochs on {args.dataset} "
          f"({len(data.images_train)} images, {device}) -> {directory}")
    start, done, total = time.time(), 0, args.num_experts * args.train_epochs
    for first in range(0, args.num_experts, args.save_interval):
        count = min(args.save_interval, args.num_experts - first)
        path = next_file(directory, meta)
        entries = []
        with new_buffer_file(path, (count, args.train_epochs + 1, meta["num_params"])) as array:
            for row in range(count):
                index = len(meta["experts"]) + row
                seed = expert_seed(args.seed, index)
                set_seed(seed)
                entry = {"file": path.name, "index": index, "row": row, "seed": seed, "train_acc": [], "test_acc": []}
                for epoch, (train_acc, test_acc, speed) in enumerate(train_expert(args, data, array[row]), 1):
                    entry["train_acc"].append(train_acc)
                    entry["test_acc"].append(test_acc)
                    done += 1
                    print(f"expert {first + row + 1}/{args.num_experts} (#{index}) epoch {epoch}/{args.train_epochs}"
                          f": train acc {train_acc:.4f} test acc {test_acc:.4f}, {speed:.0f} images/s, "
                          f"{eta(time.time() - start, done, total)}", flush=True)
                entries.append(entry)
        meta["experts"] += entries
        save_json(meta, Path(directory) / SIDECAR)
        print(f"wrote {path} ({count} expert{'s' * (count != 1)})")


# ---------------------------------------------------------------------------------------------
# Import of the original's buffers


def read_original(path, shapes, train_epochs):
    """The original's replay_buffer_{n}.pt, checked against the model's parameter shapes."""
    try:
        experts = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise UsageError(f"cannot read {path} as the original's buffer: {str(err).splitlines()[0]}") from err
    for e, expert in enumerate(experts):
        if len(expert) != train_epochs + 1:
            raise UsageError(f"{path}: expert {e} has {len(expert)} snapshots, not train_epochs + 1 = "
                             f"{train_epochs + 1}; pass --train_epochs {len(expert) - 1}")
        for t, snapshot in enumerate(expert):
            found = [list(p.shape) for p in snapshot]
            if found != shapes:
                raise UsageError(f"{path}: expert {e} snapshot {t} has parameter shapes {found}, "
                                 f"but this --model and --dataset give {shapes}")
    return experts


def import_pt(args):
    sources = numbered_files(args.import_pt, "pt")
    if not sources:
        raise UsageError(f"no replay_buffer_{{n}}.pt files in {args.import_pt}")
    directory = buffer_dir(args.buffer_path, args.dataset, args.model, args.zca, args.subset, args.res)
    meta = open_directory(directory, describe(args, seed=None))
    for source in sources:
        experts = read_original(source, meta["param_shapes"], args.train_epochs)
        path = next_file(directory, meta)
        with new_buffer_file(path, (len(experts), args.train_epochs + 1, meta["num_params"])) as array:
            for row, expert in enumerate(experts):
                for epoch, snapshot in enumerate(expert):
                    array[row, epoch] = torch.cat([p.reshape(-1) for p in snapshot]).float().numpy()
        meta["experts"] += [{"file": path.name, "index": len(meta["experts"]) + row, "row": row, "seed": None,
                             "train_acc": [], "test_acc": [], "source": str(source)} for row in range(len(experts))]
        save_json(meta, Path(directory) / SIDECAR)
        print(f"{source} -> {path} ({len(experts)} experts)")


def main(argv=None):
    args = parse_args(argv)
    try:
        (import_pt if args.import_pt else train)(args)
    except UsageError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
