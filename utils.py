"""What the three scripts share that is not the method: flags, seeds, devices, safe files, main()."""
import argparse
import fcntl
import json
import math
import os
import random
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import parallel
from augment import DSA_GROUPS, DSA_STRATEGY, strategy_groups
from networks import MODELS

REPO = Path(__file__).resolve().parent
NUMPY_SEEDS = 2**32  # numpy takes seeds below this
TORCH_SEEDS = 2**63  # torch.manual_seed takes seeds below this


class UsageError(Exception):
    """Bad input (a missing file, an impossible flag): the scripts print it as one line and exit."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


class Parser(argparse.ArgumentParser):
    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        raise UsageError(message)


def checked(kind, test, requirement):
    """An argparse type: the text as `kind`, refused unless test(value) holds."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, not {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, not {text}")
        return value
    return parse


positive_int = checked(int, lambda v: v >= 1, "at least 1")
non_negative_int = checked(int, lambda v: v >= 0, "0 or more")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive finite number")
non_negative_float = checked(float, lambda v: 0 <= v < math.inf, "a finite number of 0 or more")
fraction = checked(float, lambda v: 0 < v < 1, "in (0, 1)")
seed_value = checked(int, lambda v: 0 <= v < TORCH_SEEDS, "in 0..2^63-1")
BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def boolean(text):
    """--flag True / --flag False (the original's spelling; also true/false, 1/0, yes/no)."""
    if str(text).lower() not in BOOLEANS:
        raise argparse.ArgumentTypeError(f"expected True or False, not {text!r}")
    return BOOLEANS[str(text).lower()]


def dsa_strategy(text):
    try:
        strategy_groups(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def switch(parser, name, help, default=False):
    """A boolean flag: --name alone means True, and --name True / --name False say which."""
    parser.add_argument(name, nargs="?", const=True, default=default, type=boolean, metavar="{True,False}", help=help)


def add_common_args(parser):
    """The flags buffer.py, distill.py and eval.py share, with the original's names and defaults."""
    from data import DATASETS, IMAGENET_SUBSETS  # here, not at the top: data.py imports this module
    parser.add_argument("--dataset", default="CIFAR10", choices=list(DATASETS))
    parser.add_argument("--subset", default="imagenette", choices=list(IMAGENET_SUBSETS),
                        help="ImageNet subset (with --dataset ImageNet)")
    parser.add_argument("--model", default="ConvNet", choices=list(MODELS), metavar="MODEL",
                        help=f"network: {', '.join(MODELS)}")
    parser.add_argument("--res", type=positive_int, default=128,
                        help="image side of ImageNet subsets, squashed to res x res (the original's default)")
    parser.add_argument("--data_path", default="data", help="where datasets are found or downloaded")
    switch(parser, "--zca", "ZCA-whiten the data (eps 0.1, fitted on the training set)")
    switch(parser, "--dsa", "differentiable Siamese augmentation on every batch", default=True)
    parser.add_argument("--dsa_strategy", default=DSA_STRATEGY, type=dsa_strategy,
                        help=f"DSA groups joined by _, one drawn per batch (from {', '.join(DSA_GROUPS)})")
    parser.add_argument("--batch_train", type=positive_int, default=256, help="batch size for training networks")
    parser.add_argument("--seed", type=seed_value, default=0, help="seeds python, numpy and torch")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    switch(parser, "--deterministic", "deterministic CUDA kernels (bit-identical CUDA runs, somewhat slower)")
    return parser


def parse(parser, argv):
    """The flags, with `augmentation` resolved once: the DSA strategy, or None without --dsa."""
    args = parser.parse_args(argv)
    args.augmentation = args.dsa_strategy if args.dsa else None
    return args


def set_seed(seed):
    """Seed python, numpy and torch (every device) so that a run repeats."""
    random.seed(seed)
    np.random.seed(seed % NUMPY_SEEDS)
    torch.manual_seed(seed)


def run_seed(seed, index):
    """The seed of the index-th run of a command seeded with `seed` (an evaluation network, an
    evaluation iteration): distinct for each index, and the same whatever else the command does."""
    return seed * 1_000_003 + index


def pick_device(device=None):
    """torch.device for --device: cuda when present unless given; a device that is absent or
    unknown is a UsageError, not a traceback from the first tensor moved to it."""
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


def setup_device(args):
    """The device this process works on: --device (cuda:LOCAL_RANK under torchrun, which also
    joins the process group), with --deterministic's settings."""
    device = parallel.setup(pick_device(args.device))
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device


def run_info(device):
    """What a results file should say about where it came from: code version, torch, device."""
    git = lambda *argv: subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = commit and bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"git_commit": commit, "git_dirty": dirty, "torch_version": torch.__version__, "device": str(device),
            "device_name": name}


def run_script(parse_args, run, argv=None):
    """The three scripts' main(): parse and check the flags, set up the device, run. Bad input on
    any rank (a UsageError) ends the script with one line, `error: ...`, naming the rank under torchrun."""
    try:
        args = parse_args(argv)
        result = run(args, setup_device(args))
    except UsageError as err:
        sys.exit(f"error{f' (rank {parallel.rank()})' if parallel.rank() else ''}: {err}")
    parallel.teardown()
    return result


# ---------------------------------------------------------------------------------------------
# Files: written whole or not at all, read with one line for what is wrong, one writer per folder

TEMP_SUFFIX = re.compile(r"\.tmp(\d+)$")


def fsync(path):
    """Flush a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temporary name to write to; it replaces `path` only if the writing finished.
    The file is fsynced before the rename and the folder after it, so that after a power loss
    `path` holds either the old contents or the complete new ones, never an empty file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def save_torch(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_json(path, what, fix=""):
    """The JSON object in `path`, or a UsageError saying that it is not `what` (and `fix`, how to mend it)."""
    fix = f"; {fix}" if fix else ""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path} as {what} ({err}){fix}") from err
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not {what}: it holds a JSON {type(value).__name__}, not an object{fix}")
    return value


def load_torch(path, what, fix="", device="cpu"):
    """What torch.load finds in `path` (tensors and plain containers only), or a UsageError."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UsageError(f"cannot read {path} as {what} ({type(err).__name__}){f'; {fix}' if fix else ''}") from err


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        pass
    return True


def remove_stale_temps(folder):
    """Delete the `*.tmpPID` files that processes killed mid-write left in `folder` (a buffer's
    can be hundreds of MB); a live process's temporary file is left alone."""
    removed = []
    for path in Path(folder).glob("*.tmp*"):
        match = TEMP_SUFFIX.search(path.name)
        if match and path.is_file() and not process_alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


@contextmanager
def folder_lock(folder, what):
    """Hold an exclusive lock on `folder` (fcntl on folder/.lock) while the block runs, so that
    two processes never write one folder; the lock goes with the process, however it ends."""
    with open(Path(folder) / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{folder} is in use by another {what} (it holds {folder}/.lock); wait for it to "
                             f"finish or choose another folder") from None
        yield


def make_folder(folder, flag):
    """Create `folder` (and parents) or say in one line why it cannot be written to."""
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{flag} {folder}: a file is in the way (not a folder)") from None
    except OSError as err:
        raise UsageError(f"{flag} {folder}: cannot create it ({err.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: not writable")
    return Path(folder)


def eta(elapsed, done, total):
    """'12m05s left' when `done` of `total` units of work took `elapsed` seconds."""
    seconds = elapsed / max(done, 1e-9) * (total - done)
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s left"
