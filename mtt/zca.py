"""ZCA whitening as the original applies it (kornia's ZCAWhitening, eps 0.1, fitted on the training
set): the transform, where it is fitted, and its fit and whitened images kept in the cache."""
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch

from mtt import cache
from mtt.memory import free_memory, gigabytes
from mtt.progress import progress
from utils import UsageError, cpu_threads, load_torch, say

ZCA_EPS = 0.1  # the original's kornia ZCAWhitening(eps=0.1)
ZCA_MATRICES = 6  # d x d float64 matrices at the fit's peak: the covariance, eigh's vectors and work, two products


def fit_device(features, device):
    """Where the ZCA of `features` pixels is fitted: `device`, else the CPU where only it has the room
    (said in one line), else a UsageError before any work (ImageNet at 128 px: 49,152 pixels)."""
    needed = ZCA_MATRICES * 8 * features**2
    free = {where: free_memory(where) for where in dict.fromkeys([device, torch.device("cpu")])}
    if needed <= free[device]:
        return device
    if needed <= free[torch.device("cpu")]:
        say(f"ZCA: the fit on {features} pixels needs about {gigabytes(needed)}, more than the "
            f"{gigabytes(free[device])} free on {device}: fitting it on the CPU")
        return torch.device("cpu")
    raise UsageError(f"--zca on {features} pixels: fitting the whitening needs about {gigabytes(needed)}, more than "
                     + " or ".join(f"the {gigabytes(room)} free on {where}" for where, room in free.items())
                     + "; lower --res or drop --zca")


class ZCA:
    """x -> (x - mean) T, T = U diag(1 / sqrt(S + eps)) U^T where U S U^T is the covariance (kornia's, compute_inv)."""

    def __init__(self, mean, transform, inverse_transform, eps):
        self.mean, self.transform, self.inverse_transform, self.eps = mean, transform, inverse_transform, eps

    @classmethod
    def fit(cls, images, eps=ZCA_EPS, chunk=4096, device=None):
        """Fit on N x C x H x W images in [0, 1], or uint8 ones scaled by 1/255 a chunk at a time (as get_dataset
        scales them, without a float copy of the set); the float64 covariance is decomposed on `device`."""
        device = fit_device(images[0].numel(), torch.device(device or images.device))
        pixels = lambda rows: (rows.to(device).float().div_(255) if rows.dtype == torch.uint8
                               else rows.to(device).float()).flatten(1).double()
        with all_cpu_threads(device):
            mean = sum(pixels(rows).sum(0) for rows in torch.split(images, chunk)) / len(images)
            cov = torch.zeros(len(mean), len(mean), dtype=torch.float64, device=device)
            with progress(total=len(images), desc="ZCA covariance", unit="img") as bar:
                for rows in torch.split(images, chunk):
                    centred = pixels(rows) - mean
                    cov += centred.T @ centred
                    bar.update(len(rows))
            cov /= len(images) - 1
            if len(mean) >= 4096:  # minutes on a CPU, with nothing to count
                say(f"ZCA: eigendecomposition of the {len(mean)} x {len(mean)} covariance on {device}")
            s, u = torch.linalg.eigh(cov)
            s = s.clamp_min(0)  # a rank-deficient covariance has tiny negative eigenvalues from rounding
            transform = (u * (s + eps).rsqrt()) @ u.T
            inverse = (u * (s + eps).sqrt()) @ u.T
        return cls(*(t.float().cpu() for t in (mean, transform, inverse)), eps)

    def __call__(self, images):
        return ((images.flatten(1) - self.mean) @ self.transform).view_as(images)

    def apply_(self, images, device=None, chunk=4096):
        """Whiten CPU images in place, a chunk at a time on `device` (the GPU takes seconds where a
        CPU takes minutes for Tiny ImageNet), without a second copy of the set."""
        device = torch.device(device or "cpu")
        on_device = self.to(device)
        with all_cpu_threads(device):
            for rows in torch.split(images, chunk):
                rows.copy_(on_device(rows.to(device)))
        return images

    def inverse(self, images):
        return (images.flatten(1) @ self.inverse_transform + self.mean).view_as(images)

    def state_dict(self):
        return {key: getattr(self, key) for key in ("mean", "transform", "inverse_transform", "eps")}

    @classmethod
    def load(cls, path, features=None, fix=""):
        """The ZCA whose state_dict `path` holds, checked to transform `features` (C x H x W) pixels
        (default: as many as its mean has), or a UsageError saying what it is not (and `fix`)."""
        state = load_torch(path, "a ZCA transform", fix)
        state = state if isinstance(state, dict) else {}  # a tensor indexed by a name warns before it fails
        try:
            zca = cls(state["mean"], state["transform"], state["inverse_transform"], state["eps"])
            d = zca.mean.numel() if features is None else features
            fits = (zca.mean.shape, zca.transform.shape, zca.inverse_transform.shape) == ((d,), (d, d), (d, d))
        except (TypeError, KeyError, AttributeError):
            fits = False
        if not fits:
            raise UsageError(f"{path} is not a ZCA transform of {features or 'its'} pixels" + (f"; {fix}" * bool(fix)))
        return zca

    def to(self, device):
        return ZCA(self.mean.to(device), self.transform.to(device), self.inverse_transform.to(device), self.eps)


@contextmanager
def all_cpu_threads(device):
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cached_zca(images, data_path, name, device=None, eps=ZCA_EPS):
    """ZCA.fit on uint8 training images, kept as {data_path}/cache/zca-{name}-{key}.pt (key: the images' bytes
    and eps). Returns the ZCA, its file and the images' hash, which key their whitened copy (None, None: not kept)."""
    folder = cache.folder(data_path) if data_path is not None else None
    if folder is None:
        return ZCA.fit(images, eps, device=device), None, None
    digest = cache.hash_images(images)
    path = cache.file_for(folder, f"zca-{name}", ".pt", eps, digest)
    shape = "x".join(map(str, images.shape[1:]))
    whitener = cache.get_or_make(path, partial(ZCA.load, features=images[0].numel()),
                                 lambda: ZCA.fit(images, eps, device=device),
                                 lambda zca, tmp: torch.save(zca.state_dict(), tmp),
                                 f"fitting ZCA on {len(images)} images of {shape} on {device or 'cpu'}")
    return whitener, path if path.exists() else None, digest


def whitened(images, whitener, zca_file, name, device=None, digest=None):
    """uint8 images scaled to [0, 1] and whitened, float32, kept as whitened-{name}-{key}.npy beside the ZCA's file:
    at Tiny ImageNet's size that is a 12288 x 12288 product per image, half a minute of every start on a CPU. The
    key covers that file, the images (`digest`, if taken) and the device type (another rounds differently)."""
    # contiguous: CIFAR arrives channels last, and whitened images always were N x C x H x W
    whiten = lambda: whitener.apply_(images.float().div_(255).contiguous(), device)
    if zca_file is None:
        return whiten()
    path = cache.file_for(zca_file.parent, f"whitened-{name}", ".npy", zca_file.name, zca_file.stat().st_mtime_ns,
                       digest or cache.hash_images(images), torch.device(device or "cpu").type)
    return cache.cached_array(path, tuple(images.shape), np.float32, lambda: whiten().numpy(),
                              f"whitening {name}: {len(images)} images")
