"""{data_path}/cache/: what is slow to make from the data is made once and kept, one file per name.

A file is {name}-{key}{suffix}, its key a hash of everything that determines its contents (the
image files' names, sizes and times of change, or the images' bytes), so a changed folder or
--res never reads a stale file: it is made again, replacing the old one. Files are written
atomically under the folder's lock, which a second process waits for and then reads what the
first wrote. Deleting the folder only costs the time to rebuild it.
"""
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from utils import UsageError, atomic_path, say

VERSION = 1  # part of every key: raise it when what a cache file holds changes
KEY_CHARS = 16


@functools.cache
def folder(data_path):
    """{data_path}/cache, created; None (said once) where it cannot be written: nothing is cached."""
    path = Path(data_path) / "cache"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as err:
        say(f"cannot write the cache folder {path} ({err.strerror or err}): decoding and ZCA fits are not kept")
        return None
    return path


def hash_images(images, chunk=4096):
    """sha256 of uint8 images' shape and bytes, a chunk at a time (a second for a GB)."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    for rows in torch.split(images, chunk):
        digest.update(rows.contiguous().numpy())
    return digest.hexdigest()


def entry(in_folder, name, suffix, *key):
    """The file of `name` whose contents the key's parts determine."""
    digest = hashlib.sha256("\n".join(map(str, [VERSION, *key])).encode()).hexdigest()
    return in_folder / f"{name}-{digest[:KEY_CHARS]}{suffix}"


def older_entries(path):
    """The files of the same name as `path` with other keys: stale, since `path` is what is current."""
    pattern = path.name[:-len(path.suffix) - KEY_CHARS] + "?" * KEY_CHARS + path.suffix
    return [old for old in path.parent.glob(pattern) if old != path]


def replacing(path):
    older = older_entries(path)
    return f" (replacing {', '.join(old.name for old in older)}: its files have changed)" if older else ""


def read(path, load, redo):
    """load(path), or None when there is no such file; a damaged one is said (with `redo`, what is
    done instead) and None."""
    if not path.exists():
        return None
    try:
        return load(path)
    except UsageError as err:
        say(f"the cache {path} is damaged ({err}); {redo}")
        return None


def write(path, write_to):
    """write_to(temporary path), then rename it to `path` and delete the stale entries it replaces; a
    failure (a full disk) is said, not raised: the run goes on without the file."""
    try:
        with atomic_path(path) as tmp:
            write_to(tmp)
    except (OSError, UsageError) as err:
        say(f"could not write {path} ({getattr(err, 'strerror', None) or err}); going on without caching it")
        return
    for old in older_entries(path):
        old.unlink(missing_ok=True)


def save_npy(array, path):
    with open(path, "wb") as f:  # a file, not a name, or numpy appends .npy to the temporary name
        np.save(f, array)
