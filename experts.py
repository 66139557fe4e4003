"""The expert buffer directory: its format, and reading it.

buffer.py writes a directory {buffer_path}/{dataset}[_NO_ZCA]/{model}/ (ImageNet adds {subset}/{res}):

    replay_buffer_{n}.npy  float32 (experts, train_epochs + 1, num_params): flat parameters
                           (networks.flatten_params) at init and after every epoch
    buffer.json            the sidecar: the settings, parameter shapes and one entry per expert
                           ({"file", "row", "index", "seed", ...})

The sidecar is the one source of truth: a reader uses exactly the files and rows it lists, so a
file that a killed run renamed into place but never listed is not an expert.

    experts = Experts(directory)
    theta = torch.from_numpy(np.array(experts.trajectory(k)[epoch]))   # expert k at that epoch
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from utils import UsageError

SIDECAR = "buffer.json"
FILE_NAME = re.compile(r"replay_buffer_(\d+)\.(npy|pt)")

# What a reader needs from the sidecar, with the JSON type buffer.py writes.
SIDECAR_KEYS = {"dataset": str, "model": str, "zca": bool, "num_params": int, "param_shapes": list,
                "train_epochs": int, "experts": list}


def numbered_files(directory, suffix):
    """replay_buffer_{n}.{suffix} in directory, sorted by n as a number (10 after 9)."""
    found = [p for p in Path(directory).glob(f"replay_buffer_*.{suffix}") if FILE_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: file_number(p.name))


def file_number(name):
    return int(FILE_NAME.fullmatch(name)[1])


def expert_files(directory):
    """The replay_buffer_{n}.npy files on disk, listed by the sidecar or not."""
    return numbered_files(directory, "npy")


def fill_command(directory):
    """The buffer.py command that trains experts into `directory` (utils.buffer_dir inverted)."""
    parts = Path(directory).parts
    if len(parts) < 2:
        return "python buffer.py --dataset DATASET --model MODEL --buffer_path BUFFER_PATH"
    *root, name, model = parts
    if len(root) >= 2 and root[-2] == "ImageNet":  # .../ImageNet/{subset}/{res}/{model}
        *root, _, subset = root
        flags = f"--dataset ImageNet --subset {subset} --res {name}"
    else:
        dataset = name.removesuffix("_NO_ZCA")
        zca = " --zca" if dataset in ("CIFAR10", "CIFAR100") and dataset == name else ""
        flags = f"--dataset {dataset}{zca}"
    return f"python buffer.py {flags} --model {model} --buffer_path {os.path.join(*root) if root else '.'}"


def sidecar_problem(meta):
    """What makes `meta` something other than a sidecar buffer.py wrote, or None."""
    if not isinstance(meta, dict):
        return f"it holds a JSON {type(meta).__name__}, not an object"
    wrong = [key for key, kind in SIDECAR_KEYS.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        return f"missing or mistyped {', '.join(wrong)}"
    for k, entry in enumerate(meta["experts"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("row"), int)
                and FILE_NAME.fullmatch(entry["file"]) and entry["file"].endswith(".npy") and entry["row"] >= 0):
            return f"expert entry {k} is not {{\"file\": \"replay_buffer_N.npy\", \"row\": R, ...}}"
    return None


def read_sidecar(directory):
    """The sidecar of a buffer directory, or a UsageError saying how to fill the directory."""
    path = Path(directory) / SIDECAR
    if not path.exists():
        if numbered_files(directory, "pt"):
            raise UsageError(f"{directory} holds the original's .pt buffers: convert them with "
                             f"{fill_command(directory)} --import_pt {directory}")
        raise UsageError(f"no expert trajectories in {directory}: train them with {fill_command(directory)}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}") from err
    problem = sidecar_problem(meta)
    if problem:
        raise UsageError(f"{path} is not a buffer.py sidecar: {problem}")
    return meta


def open_checked(path, rows, num_snapshots, num_params):
    """The memory-mapped array of a listed file, checked against what the sidecar says of it."""
    if not path.is_file():
        raise UsageError(f"{path} is listed in {SIDECAR} but missing")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"{path} is truncated or not a buffer.py array: numpy cannot map it as a .npy") from err
    if array.dtype != np.float32 or array.ndim != 3 or array.shape[0] < rows \
            or array.shape[1:] != (num_snapshots, num_params):
        raise UsageError(f"{path} holds {array.dtype} of shape {array.shape}, but {SIDECAR} expects float32 of "
                         f"shape (at least {rows}, {num_snapshots}, {num_params})")
    return array


def choose(count, limit, generator):
    """Indices 0..count-1, or `limit` of them drawn at random (kept in order)."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


class Experts:
    """The trajectories a buffer directory's sidecar lists, memory-mapped (an iteration reads only
    the snapshots it uses) or, with load_all, read into RAM.

    max_files: a random subset of that many files, drawn from a generator seeded with `seed`, so
    the global RNG stream is untouched; max_experts: the first that many experts of each file.
    Experts are numbered by file number, then row."""

    def __init__(self, directory, max_files=None, max_experts=None, load_all=False, seed=0):
        for flag, limit in (("--max_files", max_files), ("--max_experts", max_experts)):
            if limit is not None and limit < 1:
                raise UsageError(f"{flag} must be at least 1")
        self.meta = read_sidecar(directory)
        if not self.meta["experts"]:
            raise UsageError(f"{Path(directory) / SIDECAR} lists no experts: train them with "
                             f"{fill_command(directory)}")
        self.num_snapshots = self.meta["train_epochs"] + 1
        rows = {}
        for entry in self.meta["experts"]:
            rows.setdefault(entry["file"], []).append(entry["row"])
        files = sorted(rows, key=file_number)
        chosen = choose(len(files), max_files, torch.Generator().manual_seed(seed))
        self.trajectories = []  # (array, row) per expert
        for name in (files[i] for i in chosen):
            wanted = sorted(rows[name])[:max_experts]
            array = open_checked(Path(directory) / name, max(wanted) + 1, self.num_snapshots,
                                 self.meta["num_params"])
            if load_all:
                array, wanted = array[wanted], range(len(wanted))  # a fancy index copies into RAM
            self.trajectories += [(array, row) for row in wanted]

    def __len__(self):
        return len(self.trajectories)

    def trajectory(self, k):
        """Expert k's snapshots: a (num_snapshots, num_params) array, mapped or in RAM."""
        array, row = self.trajectories[k]
        return array[row]
