"""{data_path}/cache/: what is slow to make from the data is made once and kept, one file per name. A file is
{name}-{key}{suffix}, its key a hash of everything that determines its contents (the image files' names, sizes
and times of change, or the images' bytes), so a changed folder or --res never reads a stale file: it is made
again, replacing the old one. Files are written atomically under the folder's lock, which a second process waits
for and then reads what the first wrote. Deleting the folder only costs the time to rebuild it.
"""
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from utils import UsageError, atomic_path, folder_lock, open_array, say

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


def file_for(in_folder, name, suffix, *key):
    digest = hashlib.sha256("\n".join(map(str, [VERSION, *key])).encode()).hexdigest()
    return in_folder / f"{name}-{digest[:KEY_CHARS]}{suffix}"


def get_or_make(path, load, make, save, doing):
    """load(path), or make() it, said in one line (`doing`: "decoding X: N images"), and keep it with save(value,
    temporary path). A damaged file is said and made again; a failed write (a full disk) is said, not raised."""
    with folder_lock(path.parent, "cache", wait=True):
        if path.exists():
            try:
                return load(path)
            except UsageError as err:
                say(f"the cache {path} is damaged ({err}); {doing.split()[0]} again")
        older = [old.name for old in path.parent.glob(path.name[:-len(path.suffix) - KEY_CHARS] + "?" * KEY_CHARS
                                                      + path.suffix) if old != path]
        said = f" (replacing {', '.join(older)}: its files have changed)" if older else ""
        say(f"{doing}, once: later starts read {path}{said}")
        value = make()
        try:
            with atomic_path(path) as tmp:
                save(value, tmp)
        except (OSError, UsageError) as err:
            say(f"could not write {path} ({getattr(err, 'strerror', None) or err}); going on without caching it")
            return value
        for name in older:
            (path.parent / name).unlink(missing_ok=True)
        return value


def cached_array(path, shape, dtype, make, doing):
    """get_or_make for an array of exactly this shape and dtype, as a tensor mapped copy-on-write from the file:
    torch wants a writable array, and a write must never reach the file."""
    def save(array, tmp):
        with open(tmp, "wb") as f:  # a file, not a name, or numpy appends .npy to the temporary name
            np.save(f, array)
    load = lambda path: open_array(path, dtype, lambda found: found == shape, mode="c")
    return torch.from_numpy(get_or_make(path, load, make, save, doing))
