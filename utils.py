"""What the three scripts share that is not the method: flags, seeds, devices, safe files, main()."""
import argparse
import ctypes
import errno
import fcntl
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

import config
import parallel
from augment import DSA_GROUPS, DSA_STRATEGY, strategy_groups
from networks import MODELS, get_network

REPO = Path(__file__).resolve().parent
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
NUMPY_SEEDS = 2**32  # numpy takes seeds below this
TORCH_SEEDS = 2**63  # torch.manual_seed takes seeds below this


class UsageError(Exception):
    """Bad input (a missing file, an impossible flag) or a failure the user can act on (a full disk):
    the scripts print it as one line and exit. `rank`: the torchrun rank it happened on."""

    def __init__(self, message, rank=None):
        super().__init__(message)
        self.rank = rank


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (a cluster's pre-emption), with the one line that says what was kept."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default in --help (unless its help says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: {'none' if action.default is None else action.default})".lstrip()


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
    parse.kind = kind  # what a --cfg file must hold for this flag
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


boolean.kind = bool


def folder_path(text):
    """A path to write to or read from: an empty one would mean the current folder, unasked."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (it would mean the current folder); give a folder")
    return text


def dsa_strategy(text):
    try:
        strategy_groups(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def switch(parser, name, help, default=False):
    """A boolean flag: --name alone means True, and --name True / --name False say which."""
    parser.add_argument(name, nargs="?", const=True, default=default, type=boolean, metavar="{True,False}", help=help)


def add_common_args(parser, model_default="ConvNet"):
    """The flags buffer.py, distill.py and eval.py share, with the original's names and defaults
    (eval.py's --model defaults to the set's own)."""
    from data import DATASETS, IMAGENET_SUBSETS  # here, not at the top: data.py imports this module
    parser.add_argument("--dataset", default="CIFAR10", choices=list(DATASETS),
                        help="MNIST to CIFAR100 are downloaded into --data_path; Tiny and ImageNet are read from it")
    parser.add_argument("--subset", default="imagenette", choices=list(IMAGENET_SUBSETS),
                        help="ImageNet subset (with --dataset ImageNet)")
    parser.add_argument("--model", default=model_default, choices=list(MODELS), metavar="MODEL",
                        help=f"network: {', '.join(MODELS)}" + ("" if model_default else
                                                               " (default: the set's run.json model, else ConvNet)"))
    parser.add_argument("--res", type=positive_int, default=128,
                        help="image side of ImageNet subsets, squashed to res x res as the original does")
    parser.add_argument("--data_path", default="data", type=folder_path, help="where datasets are found or downloaded")
    switch(parser, "--zca", "ZCA-whiten the data (eps 0.1, fitted on the training set)")
    switch(parser, "--dsa", "differentiable Siamese augmentation on every batch", default=True)
    parser.add_argument("--dsa_strategy", default=DSA_STRATEGY, type=dsa_strategy,
                        help=f"DSA groups joined by _, one drawn per batch (from {', '.join(DSA_GROUPS)})")
    parser.add_argument("--batch_train", type=positive_int, default=256, help="batch size for training networks")
    parser.add_argument("--seed", type=seed_value, default=0, help="seeds python, numpy and torch")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    switch(parser, "--deterministic", "deterministic CUDA kernels (bit-identical CUDA runs, somewhat slower)")
    parser.add_argument("--cfg", metavar="FILE.yaml", help="flags from a YAML file, one `flag: value` line each "
                        "(DATM's format; its files load as they are); flags given here win (config.py)")
    return parser


def parse(parser, argv, ignore=lambda values: {}):
    """The flags, after those of a --cfg file (config.apply; `ignore` as there), with `augmentation`
    resolved once: the DSA strategy, or None without --dsa."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = config.cfg_path(argv)
    if path is not None:
        try:
            ignored = config.apply(parser, path, ignore)
        except config.ConfigError as err:
            raise UsageError(f"--cfg {path}: {err}") from None
        if ignored:
            announce(f"--cfg {path}: ignored " + "; ".join(f"{key}: {why}" for key, why in ignored.items()))
    args = parser.parse_args(argv)
    args.augmentation = args.dsa_strategy if args.dsa else None
    return args


def check_model(model, dataset, res):
    """The network's parameter count, checked that it builds for the dataset's images (a deep
    ConvNet on small ones has no pixels left)."""
    from data import DATASETS
    channel, im_size, num_classes = DATASETS[dataset].shape(res)
    try:
        with torch.device("meta"):  # shapes only, no memory
            return sum(p.numel() for p in get_network(model, channel, num_classes, im_size).parameters())
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--model {model} does not fit {dataset}'s {im_size[0]}x{im_size[1]} images: "
                         f"{str(err).splitlines()[0]}") from None


def check_fits(needed, what, folder=None):
    """Refuse, in one line, what needs more bytes than this machine's memory (or, with `folder`,
    the free space of its disk) before anything is allocated or written."""
    if folder is None:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory"
    else:
        existing = next(p for p in [Path(folder).absolute(), *Path(folder).absolute().parents] if p.exists())
        have, where = shutil.disk_usage(existing).free, f"free space in {existing}"
    if needed > have:
        raise UsageError(f"{what} needs {needed / 2**30:.3g} GB, more than the {have / 2**30:.3g} GB of {where}")


def announce(line):
    """Print a line once per job: under torchrun, on the first process only (before any process group)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


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


def keep_freed_memory():
    """Make glibc's malloc keep the memory torch frees for its next tensors. By default it maps
    every block over 32 MB afresh from the kernel and unmaps it when freed, so a CPU step whose
    activations are that large (500 images through ConvNetW32 at 32x32: 65 MB a layer) faults them
    in again, 4 KB at a time, at every step: 1.5 million page faults per ipc-50 iteration of 2
    steps, half of its CPU time (buffer.py's batches of 256: a quarter). The cost: freed blocks that
    later requests do not fit stay resident (a 30% higher peak at ipc 50, steady over iterations).
    No effect where the C library is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_MAX, 0)  # every block from the heap, which is reused
        mallopt(M_TRIM_THRESHOLD, -1)  # and never shrunk, so what the next step needs is mapped already


def setup_device(args):
    """The device this process works on: --device (cuda:LOCAL_RANK under torchrun, which also
    joins the process group), with --deterministic's settings; on the CPU, freed memory is kept
    for reuse (keep_freed_memory)."""
    step_timeout = timedelta(seconds=getattr(args, "step_timeout", parallel.STEP_TIMEOUT.total_seconds()))
    device = parallel.setup(pick_device(args.device), step_timeout)
    if device.type == "cpu":
        keep_freed_memory()
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


def run_script(parse_args, run, argv=None, interrupted=lambda args: "nothing was written"):
    """The three scripts' main(): parse and check the flags, set up the device, run. Bad input
    (a UsageError) ends the script with one line, `error: ...`, printed by one process: rank 0,
    naming the rank it happened on, or the rank itself when the others cannot know. Ctrl-C and
    SIGTERM become Interrupted with interrupted(args), the line saying what is kept."""
    args = None
    try:
        args = parse_args(argv)
        result = run(args, setup_device(args))
    except UsageError as err:
        grouped = parallel.world() > 1  # before the process group, every rank parsed the same flags
        here = parallel.rank() if grouped else int(os.environ.get("RANK", "0"))
        if here != 0 and (err.rank is not None or not grouped):
            sys.exit(1)  # a verdict every rank reached: rank 0 says it
        rank = here if err.rank is None else err.rank
        sys.exit(f"error{f' (rank {rank})' if rank else ''}: {err}")
    except KeyboardInterrupt as stop:
        said = interrupted(args) if args else "nothing was written"
        raise Interrupted(f"{str(stop) or 'stopped by Ctrl-C'}: {said}") from None
    parallel.teardown()
    return result


def exit_status(main):
    """main()'s exit status: Ctrl-C and SIGTERM end with Interrupted's one line (on rank 0 only) and
    130, not a traceback; sys.exit's status is kept, and its message printed with 1."""
    def terminate(signum, frame):
        raise KeyboardInterrupt("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, terminate)
    try:
        main()
    except KeyboardInterrupt as stop:
        if os.environ.get("RANK", "0") == "0":
            print(str(stop) or "stopped by Ctrl-C", file=sys.stderr)
        return 130
    except SystemExit as leaving:
        if leaving.code is None or isinstance(leaving.code, int):
            return leaving.code or 0
        print(leaving.code, file=sys.stderr)  # as Python does for sys.exit("error: ...")
        return 1
    return 0


def entry(main):
    """`if __name__ == "__main__": entry(main)`. It exits without the interpreter's teardown: freeing
    the modules torch loads took 1.3-1.6 s a run on a 2-core CPU, and every file the script wrote is
    closed, and the process group left, by the time main() returns."""
    status = exit_status(main)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextmanager
def stalls_are_one_line():
    """A training-step collective that timed out (torchrun: a rank stopped or hangs) becomes one
    line naming the silent rank, found by a monitored barrier, instead of a wait of hours."""
    try:
        yield
    except RuntimeError as err:
        if parallel.world() == 1 or "timed out" not in str(err).lower():
            raise
        silent = parallel.silent_ranks()
        who = f"rank {', '.join(map(str, silent))}" if silent and silent != [-1] else "another rank"
        here = None if 0 in silent else parallel.rank()
        raise UsageError(f"{who} stopped answering: a training step's collective waited for it past its timeout "
                         f"(--step_timeout); the job stops here", rank=here) from None


def main_decides(work):
    """work() on rank 0 alone, its result on every rank, and a UsageError it raises on every rank
    too (said by rank 0): the others never wait in a collective for a rank that stopped."""
    outcome = None
    if parallel.is_main():
        try:
            outcome = (work(), None)
        except UsageError as err:
            outcome = (None, str(err))
    result, failure = parallel.broadcast_object(outcome)
    if failure is not None:
        raise UsageError(failure, rank=0)
    return result


@contextmanager
def one_verdict():
    """Run the block on every rank; when it fails on any of them with a UsageError, it fails on
    all of them alike (rank 0 saying why, naming the rank), so that no rank is left waiting in a
    collective for one that stopped: a torchrun job with bad input ends with one line. The block
    must hold no collective (a rank that failed would skip it and wait in the verdict's)."""
    failure = None
    try:
        yield
    except UsageError as err:
        failure = (parallel.rank() if err.rank is None else err.rank, str(err))
    failures = [found for found in parallel.gather_objects(failure) if found]
    if failures:
        rank, message = failures[0]
        raise UsageError(message, rank=rank)


# ---------------------------------------------------------------------------------------------
# Files: written whole or not at all, read with one line for what is wrong, one writer per folder

TEMP = re.compile(r"\.(.+)\.mtt-partial-(\d+)")  # .{name}.mtt-partial-{pid}: hidden, and no name a user picks
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def temp_path(path):
    """Where `path` is written before it is renamed into place (the writing process's id in the name)."""
    path = Path(path)
    return path.with_name(f".{path.name}.mtt-partial-{os.getpid()}")


def is_ours(name):
    """A file this project keeps beside the user's (a lock, a partial write), not one of theirs."""
    return name == ".lock" or TEMP.fullmatch(name) is not None


def fsync(path):
    """Flush a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, size=None):
    """Yield a temporary name to write to; it replaces `path` only if the writing finished.
    The file is fsynced before the rename and the folder after it, so that after a power loss
    `path` holds either the old contents or the complete new ones, never an empty file."""
    path, tmp = Path(path), temp_path(path)
    try:
        with full_disk_is_one_line(path, size):
            yield tmp
            fsync(tmp)
            os.replace(tmp, path)
            fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def full_disk_is_one_line(path, size=None):
    """A full disk while writing `path`: one line naming the folder and the bytes needed."""
    try:
        yield
    except OSError as err:
        if err.errno not in FULL_DISK:
            raise
        needed = f" ({size / 2**20:.1f} MB)" if size else ""
        raise UsageError(f"no space left in {Path(path).parent} for {Path(path).name}{needed}; free some space and "
                         f"run the command again (nothing written before it was changed)") from None


def write_bytes(path, data):
    with atomic_path(path, len(data)) as tmp:
        Path(tmp).write_bytes(data)


def torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_json(obj, path):
    write_bytes(path, json.dumps(obj, indent=1).encode())


def save_torch(obj, path):
    write_bytes(path, torch_bytes(obj))


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
    """Delete the partial writes of processes killed mid-write in `folder` (a buffer's can be
    hundreds of MB): only files named by temp_path, and only of processes no longer alive."""
    removed = []
    for path in Path(folder).glob(".*.mtt-partial-*"):
        match = TEMP.fullmatch(path.name)
        if match and path.is_file() and not process_alive(int(match[2])):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


_locked = set()  # the folders this process holds the lock of


@contextmanager
def folder_lock(folder, what):
    """Hold an exclusive lock on `folder` (fcntl on folder/.lock) while the block runs, so that
    two processes never write one folder; the lock goes with the process, however it ends. A
    folder this process holds already is not locked again."""
    key = Path(folder).resolve()
    if key in _locked:
        yield
        return
    with open(key / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{folder} is in use by another {what} (it holds {folder}/.lock); wait for it to "
                             f"finish or choose another folder") from None
        _locked.add(key)
        try:
            yield
        finally:
            _locked.discard(key)


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
