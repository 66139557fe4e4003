"""Plumbing the scripts share that is not the method: errors, the rank that prints, seeds, and files written whole,
read with one line for what is wrong, one writer per folder. It imports no other module of the project."""
import importlib.util
import errno
import fcntl
import io
import json
import os
import random
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent
TORCH_SEEDS = 2**63  # torch.manual_seed takes seeds below this


class UsageError(Exception):
    """Bad input or a failure the user can act on (a full disk), said in one line; `rank`: the torchrun rank it hit."""

    def __init__(self, message, rank=None):
        super().__init__(message)
        self.rank = rank


def rank():
    """This process's torchrun rank (0 under plain python): the one answer every module asks."""
    return int(os.environ.get("RANK", "0"))


def is_main():
    """Whether this is the process that prints and writes: the only one, or torchrun's rank 0."""
    return rank() == 0


def say(line):
    """Print a line once per job (under torchrun, on rank 0)."""
    if is_main():
        print(line, flush=True)


def installed(package):
    """Whether `package` can be imported (found, and not made unimportable), without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # sys.modules holds None for it
        return False


def cpu_threads():
    """The CPU threads this process may run on (torch uses only the physical cores by default)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def set_seed(seed):
    """Seed python, numpy and torch (every device) so that a run repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes seeds below 2**32
    torch.manual_seed(seed)


def run_seed(seed, index):
    """The seed of the index-th run (an evaluation network or iteration): the same whatever else the command does."""
    return seed * 1_000_003 + index


# Files: written whole or not at all, read with one line for what is wrong, one writer per folder

TEMP = re.compile(r"\.(.+)\.mtt-partial-(\d+)")  # .{name}.mtt-partial-{pid}: hidden, and no name a user picks


def temp_path(path):
    """Where `path` is written before it is renamed into place (the writing process's id in the name)."""
    return Path(path).with_name(f".{Path(path).name}.mtt-partial-{os.getpid()}")


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
    """Yield a temporary name to write to, which replaces `path` only if the writing finished; fsynced before the rename
    and the folder after it, so that after a power loss `path` holds its old or all its new contents, never nothing."""
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
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
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


def schema_problem(value, types):
    """What makes `value` other than a dict holding types' keys, each of its type(s), or None."""
    if not isinstance(value, dict):
        return f"it holds a {type(value).__name__}"
    wrong = [key for key, kind in types.items() if not isinstance(value.get(key), kind)
             or (kind in (int, float) and isinstance(value.get(key), bool))]
    return f"missing or mistyped {', '.join(wrong)}" if wrong else None


def open_array(path, dtype, fits, mode="r", expected=""):
    """The .npy array in `path`, memory-mapped (mode "c": copy-on-write, so that torch may write to it and nothing
    reaches the file), or a UsageError: not a .npy file, or not of `dtype` with a shape that passes fits(shape)."""
    try:
        array = np.load(path, mmap_mode=mode)
    except (OSError, ValueError, EOFError):
        raise UsageError(f"{path} is truncated or not a .npy array: numpy cannot map it") from None
    if array.dtype != dtype or not fits(array.shape):
        raise UsageError(f"{path} holds {array.dtype} of shape {array.shape}{expected}")
    return array


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        pass
    return True


def remove_stale_temps(folder):
    """Delete the partial writes (named by temp_path; a buffer's can be hundreds of MB) of dead processes in folder."""
    removed = []
    for path in Path(folder).glob(".*.mtt-partial-*"):
        match = TEMP.fullmatch(path.name)
        if match and path.is_file() and not process_alive(int(match[2])):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


_locked = set()  # the folders this process holds the lock of


@contextmanager
def folder_lock(folder, what, wait=False, finish=None):
    """Hold an exclusive lock on `folder` (fcntl on folder/.lock, which goes with the process, however it ends) while
    the block runs. Taking it runs finish(folder), which completes what a killed writer left half done (a run folder's
    commit), then remove_stale_temps. Held already by this process: nothing more; by another: a UsageError, or with
    `wait` (a cache, which the second process then reads instead of doing the work again) a wait for it."""
    key = Path(folder).resolve()
    if key in _locked:
        yield
        return
    try:
        handle = open(key / ".lock", "a")
    except OSError as err:
        raise UsageError(f"{folder} cannot be written ({err.strerror}): a {what} needs to write there") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise UsageError(f"{folder} is in use by another {what} (it holds {folder}/.lock); wait for it to "
                                 f"finish or choose another folder") from None
            say(f"waiting for another process to finish writing {folder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        _locked.add(key)
        try:
            if finish:
                finish(folder)
            if removed := remove_stale_temps(folder):
                say(f"removed the temporary files of killed runs in {folder}: {', '.join(sorted(removed))}")
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
