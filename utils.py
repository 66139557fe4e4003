"""Plumbing the scripts share that is not the method: errors, seeds, devices, safe files, main().
It imports no other module of the project."""
import ctypes
import importlib.util
import errno
import fcntl
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


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


# Of the free memory, the part no forecast may take: cuDNN's workspaces, the allocator's rounding and
# the forecast's own error (its constants were fitted on CPU peaks).
MARGIN = 0.1
CGROUP_FILES = {"v2": ("", "memory.max", "memory.current", "inactive_file"),
                "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def free_memory(device):
    """Bytes this process can still allocate on `device`. A GPU: its free memory plus what torch's
    caching allocator holds but has freed (reserved, not allocated: free to torch, used to the
    driver). The CPU: MemAvailable, or what the process's memory cgroup still allows where that is
    less (a container, a Slurm job), shared by the torchrun processes of this machine."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    room = cgroup_room()
    return min(available, available if room is None else room) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cgroup_room(root=Path("/sys/fs/cgroup"), membership=Path("/proc/self/cgroup")):
    """Bytes the process's memory cgroup (v2 or v1) lets it allocate still: its limit less what it
    uses, page cache the kernel can drop not counted (the kubelet's working set); None without a
    limit. The group's folder is the one /proc/self/cgroup names, or the mount's root (inside a
    container the mount is the container's own group)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, group = line.split(":", 2)
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
        if version is None:
            continue
        mount, limit_file, usage_file, cache_key = CGROUP_FILES[version]
        for folder in (root / mount / group.lstrip("/"), root / mount):
            try:
                limit, usage = (folder / limit_file).read_text().strip(), int((folder / usage_file).read_text())
                stat = dict(row.split() for row in (folder / "memory.stat").read_text().splitlines())
            except (OSError, ValueError):
                continue
            if not limit.isdigit() or int(limit) >= 2**62:  # v2's "max", v1's 2^63 rounded to a page: no limit
                break
            return int(limit) - usage + int(stat.get(cache_key, 0))
    return None


def gigabytes(n):
    return f"{n / 2**30:.2f} GB"


def check_room(tensors, device, what):
    """Refuse, in one line, tensors that would not fit in the GPU's free memory when moved there,
    before any work. Those on the device already count nothing (on the CPU, all of them)."""
    needed = sum(tensor.nbytes for tensor in tensors if tensor.device.type != device.type)
    free = free_memory(device) if needed else 0
    if needed > free:
        raise UsageError(f"{what} need {gigabytes(needed)} on {device}, more than its {gigabytes(free)} free; free the "
                         f"GPU or use --device cpu")


def is_main():
    """Whether this is the process that prints and writes: the only one, or torchrun's rank 0."""
    return os.environ.get("RANK", "0") == "0"


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
    activations are that large faults them in again, 4 KB at a time, at every step (BENCHMARKS.md
    section 8). The cost: freed blocks that later requests do not fit stay resident. No effect
    where the C library is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_MAX, 0)  # every block from the heap, which is reused
        mallopt(M_TRIM_THRESHOLD, -1)  # and never shrunk, so what the next step needs is mapped already


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


def exit_status(main):
    """main()'s exit status: Ctrl-C and SIGTERM end with Interrupted's one line (on rank 0 only) and
    130, not a traceback; sys.exit's status is kept, and its message printed with 1."""
    def terminate(signum, frame):
        raise KeyboardInterrupt("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, terminate)
    try:
        main()
    except KeyboardInterrupt as stop:
        if is_main():
            print(str(stop) or "stopped by Ctrl-C", file=sys.stderr)
        return 130
    except SystemExit as leaving:
        if leaving.code is None or isinstance(leaving.code, int):
            return leaving.code or 0
        print(leaving.code, file=sys.stderr)  # as Python does for sys.exit("error: ...")
        return 1
    return 0


def entry(main):
    """`if __name__ == "__main__": entry(main)`. It exits without the interpreter's teardown, which
    spends seconds freeing the modules torch loads: every file the script wrote is closed, and the
    process group left, by the time main() returns."""
    status = exit_status(main)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


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


def schema_problem(value, types):
    """What makes `value` other than a dict holding types' keys, each of its type(s), or None."""
    if not isinstance(value, dict):
        return f"it holds a {type(value).__name__}"
    wrong = [key for key, kind in types.items() if not isinstance(value.get(key), kind)
             or (kind in (int, float) and isinstance(value.get(key), bool))]
    return f"missing or mistyped {', '.join(wrong)}" if wrong else None


def open_array(path, dtype, fits, mode="r", expected=""):
    """The .npy array in `path`, memory-mapped (mode "c": copy-on-write, so that torch may write
    to it and nothing reaches the file), or a UsageError: it is no .npy file, or not one of `dtype`
    whose shape passes fits(shape) (`expected` says what was)."""
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
def folder_lock(folder, what, wait=False, finish=None):
    """Hold an exclusive lock on `folder` (fcntl on folder/.lock) while the block runs, so that
    two processes never write one folder; the lock goes with the process, however it ends. Taking
    it first runs finish(folder), which completes what a killed writer left half done (a run
    folder's commit renames the temporary files its journal lists), then removes the partial
    writes of killed processes (remove_stale_temps). Held already by this process: nothing more;
    held by another: a UsageError, or with `wait` (a cache, which the second process then reads
    instead of doing the work again) a wait for it."""
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
            removed = remove_stale_temps(folder)
            if removed:
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
