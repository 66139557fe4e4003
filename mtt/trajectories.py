"""Expert trajectories on disk: the buffer directory buffer.py writes and distill.py reads, and the original's
replay_buffer_{n}.pt files that convert to and from it. A buffer directory is
{buffer_path}/{dataset}[_NO_ZCA]/{model}/ (ImageNet adds {subset}/{res}):

    replay_buffer_{n}.npy  float32 (experts, train_epochs + 1, num_params): flat parameters
                           (networks.flatten_params) at init and after every epoch
    buffer.json            the sidecar: the settings, parameter shapes, next_index and one entry
                           per expert ({"file", "row", "index", "seed", "train_acc", "test_acc"})

The sidecar is the one source of truth: a reader uses exactly the files and rows it lists, so a
file that a killed run renamed into place but never listed is not an expert.
"""
import io
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from networks import unflatten
from utils import UsageError, atomic_path, load_json, load_torch, open_array, save_torch, say, schema_problem

SIDECAR = "buffer.json"
NUMBERED = re.compile(r"replay_buffer_(\d+)\.(npy|pt)")  # ours, the original's; .orphan after it: set aside
# What a reader needs from the sidecar, with the JSON type buffer.py writes.
SIDECAR_KEYS = {"dataset": str, "model": str, "zca": bool, "num_params": int, "param_shapes": list,
                "train_epochs": int, "experts": list}


def buffer_dir(buffer_path, dataset, model, zca, subset="imagenette", res=128):
    """The original's expert directory: {buffer_path}/{dataset}[/{subset}/{res}][_NO_ZCA]/{model}."""
    name = os.path.join(dataset, subset, str(res)) if dataset == "ImageNet" else dataset
    return os.path.join(buffer_path, name + "_NO_ZCA" * (dataset in ("CIFAR10", "CIFAR100") and not zca), model)


def experts_of(flags):
    """The buffer directory a script's flags (or a run.json's "args", as a Namespace) name."""
    return buffer_dir(flags.buffer_path, flags.dataset, flags.model, flags.zca, flags.subset, flags.res)


def fill_command(directory, zca=False):
    """The buffer.py command that trains experts into `directory` (buffer_dir inverted; --zca is in
    the name of CIFAR's directories only, the original's layout, so the reader's own --zca is given)."""
    parts = Path(directory).parts
    if len(parts) < 2:
        return "python buffer.py --dataset DATASET --model MODEL --buffer_path BUFFER_PATH"
    *root, name, model = parts
    if len(root) >= 2 and root[-2] == "ImageNet":  # .../ImageNet/{subset}/{res}/{model}
        *root, _, subset = root
        flags = f"--dataset ImageNet --subset {subset} --res {name}"
    else:
        dataset = name.removesuffix("_NO_ZCA")
        zca = zca or dataset in ("CIFAR10", "CIFAR100") and dataset == name
        flags = f"--dataset {dataset}" + " --zca" * zca
    return f"python buffer.py {flags} --model {model} --buffer_path {os.path.join(*root) if root else '.'}"


def file_number(name):
    return int(NUMBERED.match(name)[1])


def numbered_files(directory, suffix):
    """replay_buffer_{n}.{suffix} in directory, sorted by n as a number (10 after 9)."""
    found = [p for p in Path(directory).glob(f"replay_buffer_*.{suffix}") if NUMBERED.fullmatch(p.name)]
    return sorted(found, key=lambda p: file_number(p.name))


def buffer_file(directory, number):
    return Path(directory) / f"replay_buffer_{number}.npy"


def next_number(directory, meta):
    """The number after every numbered file on disk (set-aside ones too) or in the sidecar: none is ever reused."""
    names = [p.name for p in Path(directory).glob("replay_buffer_*")] + [e["file"] for e in meta["experts"]]
    return max((file_number(name) for name in names if NUMBERED.match(name)), default=-1) + 1


def read_sidecar(directory, zca=False):
    """The sidecar of a buffer directory, or a UsageError saying how to fill the directory."""
    path = Path(directory) / SIDECAR
    if not path.exists():
        if numbered_files(directory, "pt"):
            raise UsageError(f"{directory} holds the original's .pt buffers: convert them with "
                             f"{fill_command(directory, zca)} --import_pt {directory}")
        raise UsageError(f"no expert trajectories in {directory}: train them with {fill_command(directory, zca)}")
    meta = load_json(path, "a buffer.py sidecar")
    problem = schema_problem(meta, SIDECAR_KEYS)
    for k, entry in enumerate([] if problem else meta["experts"]):
        if schema_problem(entry, {"file": str, "row": int}) or not NUMBERED.fullmatch(entry["file"]) \
                or not entry["file"].endswith(".npy") or entry["row"] < 0:
            problem = f"expert entry {k} is not {{\"file\": \"replay_buffer_N.npy\", \"row\": R, ...}}"
            break
    if problem:
        raise UsageError(f"{path} is not a buffer.py sidecar: {problem}")
    return meta


def open_checked(path, rows, num_snapshots, num_params):
    """The memory-mapped array of a listed file, checked against what the sidecar says of it."""
    if not path.is_file():
        raise UsageError(f"{path} is listed in {SIDECAR} but missing")
    expected = f", but {SIDECAR} expects float32 of shape (at least {rows}, {num_snapshots}, {num_params})"
    return open_array(path, np.float32, lambda shape: len(shape) == 3 and shape[0] >= rows
                      and shape[1:] == (num_snapshots, num_params), expected=expected)


@contextmanager
def new_buffer_file(path, shape):
    """A float32 array memory-mapped onto a temporary file (a big buffer never sits whole in RAM) that becomes
    `path` when the block completes, deleted if it raises. Its blocks are allocated before it is mapped: a disk
    too small is then one line here, not a SIGBUS at the first page written to it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    offset = len(header.getvalue())
    size = offset + 4 * math.prod(shape)
    with atomic_path(path, size) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.getvalue())
            os.posix_fallocate(f.fileno(), 0, size)
        array = np.memmap(tmp, dtype=np.float32, mode="r+", offset=offset, shape=shape)
        yield array
        array.flush()  # the pages reach the file before atomic_path fsyncs and renames it


def set_aside(path, reason):
    """Rename a file that is no expert of the directory to *.orphan: never delete user data."""
    orphan = path.with_name(path.name + ".orphan")
    if orphan.exists():
        raise UsageError(f"{path} is not listed in {SIDECAR} and {orphan} is in the way: move them both aside")
    os.rename(path, orphan)
    say(f"set {path} aside as {orphan.name}: it is not listed in {SIDECAR} and {reason}")


class Experts:
    """The trajectories a buffer directory's sidecar lists, memory-mapped (an iteration reads only the snapshots
    it uses) or, with load_all, read into RAM; max_files: that many files drawn by a generator seeded with `seed`
    (not the global RNG); max_experts: the first that many of each file. Numbered by file number, then row."""

    def __init__(self, directory, max_files=None, max_experts=None, load_all=False, seed=0, zca=False):
        self.meta = read_sidecar(directory, zca)
        if not self.meta["experts"]:
            raise UsageError(f"{Path(directory) / SIDECAR} lists no experts: train them with "
                             f"{fill_command(directory, zca)}")
        self.num_snapshots = self.meta["train_epochs"] + 1
        rows = {}
        for entry in self.meta["experts"]:
            rows.setdefault(entry["file"], []).append(entry["row"])
        files = sorted(rows, key=file_number)
        if max_files is not None and max_files < len(files):  # drawn at random, kept in order
            drawn = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:max_files]
            files = [files[i] for i in sorted(drawn.tolist())]
        self.trajectories = []  # (array, row) per expert
        for name in files:
            wanted = sorted(rows[name])[:max_experts]
            array = open_checked(Path(directory) / name, max(wanted) + 1, self.num_snapshots, self.meta["num_params"])
            if load_all:
                array, wanted = array[wanted], range(len(wanted))  # a fancy index copies into RAM
            self.trajectories += [(array, row) for row in wanted]

    def __len__(self):
        return len(self.trajectories)

    def trajectory(self, k):
        """Expert k's snapshots: a (num_snapshots, num_params) array, mapped or in RAM."""
        array, row = self.trajectories[k]
        return array[row]

    def snapshot(self, k, epoch, device):
        """Expert k's flat parameters at `epoch`, a tensor on `device` (read from the map only now)."""
        return torch.from_numpy(np.array(self.trajectory(k)[epoch])).to(device)


def read_original(path, shapes, train_epochs):
    """The original's replay_buffer_{n}.pt (a list of experts, each a list of snapshots, each a list of
    per-parameter tensors), checked against the model's parameter shapes and for snapshots all one tensor."""
    experts = load_torch(path, "the original's buffer")
    if not (isinstance(experts, list) and all(isinstance(expert, list) for expert in experts)):
        raise UsageError(f"{path} is not the original's buffer (a list of experts, each a list of snapshots)")
    for e, expert in enumerate(experts):
        if len(expert) != train_epochs + 1:
            raise UsageError(f"{path}: expert {e} has {len(expert)} snapshots, not train_epochs + 1 = "
                             f"{train_epochs + 1}; pass --train_epochs {len(expert) - 1}")
        for t, snapshot in enumerate(expert):
            found = [list(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in snapshot]
            if found != shapes:
                raise UsageError(f"{path}: expert {e} snapshot {t} has parameter shapes {found}, "
                                 f"but this --model and --dataset give {shapes}")
        if all(torch.equal(a, b) for snapshot in expert[1:] for a, b in zip(snapshot, expert[0])):
            raise UsageError(f"{path}: expert {e}'s {len(expert)} snapshots are all equal: aliased snapshots from "
                             f"the original's buffer.py on CPU (.cpu() does not copy a CPU tensor); retrain, or "
                             f"fix the original with .clone()")
    return experts


def write_original(path, trajectories, shapes):
    """Flat trajectories (experts x snapshots x params) as the original's file: CPU tensors, each its own storage."""
    save_torch([[[p.clone() for p in unflatten(torch.from_numpy(np.array(snapshot)), shapes)]
                 for snapshot in trajectory] for trajectory in trajectories], path)
